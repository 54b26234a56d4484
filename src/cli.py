"""LightningCLI entry point: python -m src.cli {fit,validate,test,predict} --config configs/visor.yaml

One scheme for every stage: `model` and `data` are subclass arguments, and each stage's first
config names its classes (`class_path`, arguments under `init_args`): `src.lit.VisorLitModule` and
`src.data.VQADataModule` for the LVLM stages (base, VISOR, full, universal), `src.lit.PolicyLitModule`
for the router (configs/policy.yaml), the encoder's pretraining on generated scenes
(configs/encoder.yaml). There is no default class: a default's argument values would carry over
into another class that shares their names. Later configs are deltas on earlier ones, and
`--model.lr 1e-3` is short for `--model.init_args.lr 1e-3`:
    python -m src.cli fit --config configs/visor.yaml --config configs/full.yaml

`predict` answers the questions of a shard set (`data.predict_shards`, default the val split) with
cached greedy generation and writes JSONL (`--predict_writer.output_path`; see src/lit/predict.py):
    python -m src.cli predict --config configs/visor.yaml --ckpt_path <last.ckpt> \
        --predict_writer.output_path outputs/predictions.jsonl
"""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.lit.faults import AtomicCheckpointIO, StopOnSigterm
from src.lit.predict import JsonlPredictionWriter

# Where a model keeps its vision encoder: the LVLM stages and the policy stage under `lvlm`, the
# encoder's pretraining directly. `data.image_size` is the one statement of the input size.
VISION_IMAGE_SIZE = ("model.init_args.lvlm.init_args.vision.init_args.image_size",
                     "model.init_args.vision.init_args.image_size")
# The initialisations read from elsewhere at construction (`main(..., weights_later=True)` skips them).
WEIGHT_SOURCES = {"base_checkpoint": None, "new_params_only_steps": 0, "universal_checkpoint": None}


class StageParser(LightningArgumentParser):
    """Names the fix when no config chose the LightningModule or datamodule (a delta given alone)."""

    def error(self, message: str, *args, **kwargs):
        if any(f"class_path 'lightning.{base}'" in message for base in ("LightningModule", "LightningDataModule")):
            message += ("\nNo config named model.class_path / data.class_path: the first --config must be a "
                        "stage's own (configs/visor.yaml, base.yaml, policy.yaml, encoder.yaml, llava_ov_0.5b.yaml); "
                        "deltas stack on it, e.g. --config configs/visor.yaml --config configs/full.yaml")
        return super().error(message, *args, **kwargs)


class VisorCLI(LightningCLI):
    """`--ckpt_path` supplies the weights only: the model is built from the configs and command line
    as given. (Lightning's CLI would parse the checkpoint's saved hyperparameters over them, so an
    override such as `--model.max_new_tokens 4` given with `predict --ckpt_path` would be lost silently.)
    Every trainer writes its checkpoints atomically and saves `last.ckpt` on SIGTERM (src/lit/faults.py).
    weights_later: build the model without reading its base or universal checkpoint (the caller loads
    a trained checkpoint's weights over it)."""

    def __init__(self, *args, weights_later: bool = False, **kwargs) -> None:
        self.weights_later = weights_later
        super().__init__(LightningModule, LightningDataModule, *args, subclass_mode_model=True,
                         subclass_mode_data=True, parser_class=StageParser, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for target in VISION_IMAGE_SIZE:  # a model without that encoder field is left alone
            parser.link_arguments("data.init_args.image_size", target)
        # `predict` writes JSONL through this callback: `--predict_writer.output_path FILE` (default
        # `<log dir>/predictions.jsonl`); it does nothing in the other subcommands.
        parser.add_lightning_class_args(JsonlPredictionWriter, "predict_writer")

    def before_instantiate_classes(self) -> None:
        if self.weights_later:
            config = self.config[self.subcommand] if self.subcommand else self.config
            init_args = config["model"]["init_args"]
            for key, value in WEIGHT_SOURCES.items():
                if key in init_args:
                    init_args[key] = value

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # a subclass's own error, wrapped by jsonargparse's union check
            if isinstance(e.__cause__, Exception) and "validate against any of the Union subtypes" in str(e):
                raise e.__cause__ from None  # its message names the config field
            raise

    def _parse_ckpt_path(self) -> None:
        return None

    def _instantiate_trainer(self, config: Dict[str, Any], callbacks: List[Any]):
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, [*callbacks, StopOnSigterm()])


STAGE_CLASSES = {"model": "src.lit.VisorLitModule", "data": "src.data.VQADataModule"}


def with_class_paths(recipe_text: str) -> str:
    """A stage config written before this scheme (its `model:` / `data:` naming no class_path, as the
    recipes in older checkpoints' manifests do: those were the LVLM stage's classes) in this scheme."""
    import yaml

    config = yaml.safe_load(recipe_text) or {}
    changed = False
    for section, class_path in STAGE_CLASSES.items():
        block = config.get(section)
        if isinstance(block, dict) and "class_path" not in block:
            config[section] = {"class_path": class_path, "init_args": block}
            changed = True
    return yaml.safe_dump(config, sort_keys=False) if changed else recipe_text


def main(args: Optional[List[str]] = None, run: bool = True, weights_later: bool = False) -> LightningCLI:
    """The CLI on `args` (default sys.argv[1:]); run=False: no subcommand, the model and datamodule
    only instantiated from the configs (as src.export and the lmms-eval plugin build them);
    weights_later: see `VisorCLI`."""
    kwargs = dict(save_config_kwargs={"overwrite": True}, args=args, run=run, weights_later=weights_later)
    if not run:
        kwargs.update(save_config_callback=None)
    try:
        return VisorCLI(**kwargs)
    except SIGTERMException:
        sys.exit(143)  # 128 + SIGTERM: stopped, not finished (StopOnSigterm saved last.ckpt and said where)


if __name__ == "__main__":
    main()
