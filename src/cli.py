"""LightningCLI entry point: python -m src.cli {fit,validate,test,predict} --config configs/visor.yaml

The LVLM stages (base, VISOR, full, universal) use `VisorLitModule` with its arguments directly
under `model:`. A config whose `model:` names a `class_path` (configs/policy.yaml:
`src.lit.PolicyLitModule`) selects that LightningModule instead, with its arguments under
`model.init_args`; likewise `data.class_path` selects the LightningDataModule (configs/encoder.yaml:
the vision encoder's pretraining on generated scenes).

`predict` answers the questions of a shard set (`data.predict_shards`, default the val split) with
cached greedy generation and writes JSONL (`--predict_writer.output_path`; see src/lit/predict.py):
    python -m src.cli predict --config configs/visor.yaml --ckpt_path <last.ckpt> \
        --predict_writer.output_path outputs/predictions.jsonl
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.data.datamodule import VQADataModule
from src.lit.faults import AtomicCheckpointIO, StopOnSigterm
from src.lit.visor_module import VisorLitModule
from src.lit.predict import JsonlPredictionWriter


def add_prediction_writer(parser) -> None:
    """`predict` writes JSONL through this callback: `--predict_writer.output_path FILE` (default
    `<log dir>/predictions.jsonl`); it does nothing in the other subcommands."""
    parser.add_lightning_class_args(JsonlPredictionWriter, "predict_writer")


class ConfigOverCheckpoint(LightningCLI):
    """`--ckpt_path` supplies the weights only: the model is built from the configs and command line
    as given. (Lightning's CLI would parse the checkpoint's saved hyperparameters over them, so an
    override such as `--model.max_new_tokens 4` given with `predict --ckpt_path` would be lost silently.)
    Every trainer writes its checkpoints atomically and saves `last.ckpt` on SIGTERM (src/lit/faults.py)."""

    def _parse_ckpt_path(self) -> None:
        return None

    def _instantiate_trainer(self, config: Dict[str, Any], callbacks: List[Any]):
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, [*callbacks, StopOnSigterm()])


class VisorCLI(ConfigOverCheckpoint):
    def add_arguments_to_parser(self, parser) -> None:
        # One shared size: the image resolution the data is decoded to is the encoder's input size.
        parser.link_arguments("data.image_size", "model.lvlm.init_args.vision.init_args.image_size")
        add_prediction_writer(parser)


class SubclassCLI(ConfigOverCheckpoint):
    """For a config that names its LightningModule (`model.class_path`)."""

    def add_arguments_to_parser(self, parser) -> None:
        add_prediction_writer(parser)


def _config_paths(argv: List[str]) -> List[str]:
    paths = []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif a.startswith("--config="):
            paths.append(a.split("=", 1)[1])
    return paths


def module_class_path(argv: List[str], section: str = "model") -> Optional[str]:
    """The `<section>.class_path` named by the last config that names one, else None."""
    found = None
    for path in _config_paths(argv):
        if Path(path).is_file():
            entry = (yaml.safe_load(Path(path).read_text()) or {}).get(section)
            if isinstance(entry, dict) and "class_path" in entry:
                found = entry["class_path"]
    return found


def _import(class_path: str) -> type:
    module_name, _, cls_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)


def main(args: Optional[List[str]] = None, run: bool = True) -> LightningCLI:
    """The CLI on `args` (default sys.argv[1:]); run=False: no subcommand, the model and datamodule
    only instantiated from the configs (as src.export and the lmms-eval plugin build them)."""
    argv = sys.argv[1:] if args is None else list(args)
    model_path, data_path = module_class_path(argv, "model"), module_class_path(argv, "data")
    kwargs = dict(save_config_kwargs={"overwrite": True}, args=args, run=run)
    if not run:
        kwargs.update(save_config_callback=None)
    try:
        if model_path is None and data_path is None:
            return VisorCLI(VisorLitModule, VQADataModule, **kwargs)
        return SubclassCLI(_import(model_path) if model_path else VisorLitModule,
                           _import(data_path) if data_path else VQADataModule,
                           subclass_mode_model=model_path is not None, subclass_mode_data=data_path is not None,
                           **kwargs)
    except SIGTERMException:
        sys.exit(143)  # 128 + SIGTERM: stopped, not finished (StopOnSigterm saved last.ckpt and said where)


if __name__ == "__main__":
    main()
