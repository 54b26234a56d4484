"""Any checkpoint this project writes -> a model ready to answer questions, with its tokenizer and
its image preparation: what an evaluation harness (src/eval/lmms_plugin.py) needs, and nothing of
the training loop.

Accepted `checkpoint`s:
  - an export folder (`model.safetensors` + `manifest.json` with the recipe it was fit with: the
    shipped base, a VISOR or universal export): the model is built from that recipe (or `config`)
    and every tensor of the export is loaded; its `tokenizer.json` where it has one (src/export.py
    writes it), else the recipe's data's;
  - a Lightning `.ckpt` (a VISOR fit, a policy stage with its router): needs `config`, the YAML(s)
    it was fit with (`a.yaml+b.yaml` for a delta);
  - a converted LLaVA-OneVision folder (`python -m src.import_llava_ov`, manifest `lvlm_init_args`):
    needs `tokenizer` (its tokenizer.json), in the `llava_ov` chat layout unless told otherwise.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from src.data.tokenizer import ChatTokenizer, load_tokenizer
from src.models.anyres import TiledImages
from src.models.lvlm import VisorLVLM


@dataclass
class EvalModel:
    """lvlm (eval mode) and the tokenizer of its data; `anyres`: tile images as in training (the
    model's AnyRes settings), else resize each to one crop."""

    lvlm: VisorLVLM
    tokenizer: ChatTokenizer
    anyres: bool

    def images(self, pils: Sequence, device: torch.device):
        """PIL images -> (B, 3, S, S) in [0, 1] (one crop each, bicubic as the training data) or
        TiledImages (AnyRes, from each image at its own size)."""
        from PIL import Image

        tensors = []
        S = self.lvlm.vision.image_size
        for im in pils:
            im = im.convert("RGB")
            if not self.anyres and im.size != (S, S):
                im = im.resize((S, S), Image.BICUBIC)
            x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
            tensors.append(x.permute(2, 0, 1))  # (3, H, W) uint8
        if self.anyres:
            tiled = TiledImages.stack([self.lvlm.anyres.crops(x) for x in tensors], [tuple(x.shape[1:]) for x in tensors])
            return tiled.to(device)
        return torch.stack(tensors).float().div_(255.0).to(device)


def load_for_eval(checkpoint: str, config: Optional[str] = None, tokenizer: Optional[str] = None,
                  chat_template: Optional[str] = None) -> EvalModel:
    """See the module docstring. config: YAML path(s) joined by '+'; tokenizer / chat_template: for a
    converted LLaVA-OneVision (or to override the data's)."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint={checkpoint} does not exist")
    manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
    if "lvlm_init_args" in manifest:  # a converted LLaVA-OneVision
        from src.import_llava_ov import load_converted

        tok_path = tokenizer or (path / "tokenizer.json")
        if not Path(tok_path).exists():
            raise FileNotFoundError(f"checkpoint={checkpoint} is a converted LLaVA-OneVision without tokenizer.json: "
                                    "give tokenizer=<its tokenizer.json>")
        lvlm = load_converted(path)
        return EvalModel(lvlm, load_tokenizer(tok_path, chat_template or "llava_ov"), lvlm.anyres is not None)
    configs = _configs(path, manifest, config)
    module, dm = _instantiate(configs, path)
    if path.suffix == ".ckpt":
        from src.lit.checkpoint_io import read_lightning_checkpoint

        state = read_lightning_checkpoint(path)["state_dict"]
        module.load_state_dict(state)
    else:
        from src.lit.checkpoint_io import load_base_checkpoint

        load_base_checkpoint(module.lvlm, path, may_lack=[])  # every tensor of the model from the export
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, chat_template or dm.hparams.chat_template)
    elif (path / "tokenizer.json").exists():  # an export carries its data's tokenizer (src/export.py)
        tok = load_tokenizer(path / "tokenizer.json", chat_template or dm.hparams.chat_template)
    else:
        tok_path = Path(dm.hparams.tokenizer_path or Path(dm.hparams.root) / "tokenizer.json")
        if not tok_path.exists():
            raise FileNotFoundError(f"no tokenizer at {tok_path} (the data of {checkpoint}'s recipe): generate the data "
                                    "(`python -m src.eval.offline_task` or `make fit`) or give tokenizer=<file>")
        tok = load_tokenizer(tok_path, chat_template or dm.hparams.chat_template)
    return EvalModel(module.lvlm.eval(), tok, bool(dm.hparams.anyres))


def _configs(path: Path, manifest: dict, config: Optional[str]) -> List[str]:
    if config:
        configs = config.split("+")
        missing = [c for c in configs if not Path(c).exists()]
        if missing:
            raise FileNotFoundError(f"config: {missing} do not exist")
        return configs
    texts = manifest.get("recipe_texts") or ([manifest["recipe_text"]] if manifest.get("recipe_text") else None)
    if path.suffix == ".ckpt" or not texts:
        raise ValueError(f"checkpoint={path}: give config=<the YAML(s) it was fit with, a.yaml+b.yaml> (a Lightning "
                         ".ckpt, or an export whose manifest.json records no recipe)")
    folder = Path(tempfile.mkdtemp(prefix="visor_recipe_"))
    recipes = [folder / f"recipe{i}.yaml" for i in range(len(texts))]
    from src.cli import with_class_paths

    texts = [with_class_paths(texts[0]), *texts[1:]]  # the first is the stage's own; the rest are deltas
    for recipe, text in zip(recipes, texts):
        recipe.write_text(text)
    return [str(r) for r in recipes]


def _instantiate(configs: List[str], path: Path):
    """The LightningModule and datamodule of the configs (no subcommand, no logger). The checkpoint's
    weights are loaded afterwards, so a recipe's own base (or universal) checkpoint is not read."""
    from src.cli import main

    args = [a for c in configs for a in ("--config", c)] + ["--trainer.logger", "false"]
    cli = main(args, run=False, weights_later=True)
    return cli.model, cli.datamodule
