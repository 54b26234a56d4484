"""Base checkpoints: export a trained LVLM as safetensors (half precision unless asked) + manifest, and load one
into a (possibly VISOR-converted) LVLM with an explicit account of every tensor."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from safetensors.torch import load_file, save_file

from src.models.lvlm import VisorLVLM
from src.models.state_check import state_differences


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # by the names configs use


def dtype_named(name: str, field: str) -> torch.dtype:
    """The torch dtype of a DTYPES name; a ValueError naming `field` otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{field} must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


class CheckpointMismatch(RuntimeError):
    """Missing, unexpected or mis-shaped tensors; the message lists their names."""


def _tied_alias(model: VisorLVLM) -> Optional[str]:
    return "decoder.lm_head.weight" if model.decoder.config.tie_embeddings else None


def read_lightning_checkpoint(path: str | Path) -> dict:
    """A Lightning .ckpt read without unpickling arbitrary objects (torch.load(weights_only=True):
    tensors and plain containers only); a file that needs more is refused, naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused: it holds objects other than tensors and plain containers, which "
                         f"are not unpickled from a file given on the command line ({str(e).splitlines()[0]})") from e


def exportable_state(model: VisorLVLM, dtype: torch.dtype = torch.float16,
                     state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The state dict to ship (`state`, default the model's own): tied aliases dropped, floating
    tensors cast to `dtype`."""
    alias = _tied_alias(model)
    out = {}
    for k, v in (model.state_dict() if state is None else state).items():
        if k == alias:
            continue
        out[k] = (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
    return out


def architecture(model: VisorLVLM) -> dict:
    v = model.vision
    return {"vision": {"name": getattr(v, "name", type(v).__name__), "feature_layer": getattr(v, "feature_layer", None),
                       "image_size": v.image_size, "pos_embed": getattr(v, "pos_embed_kind", None),
                       "feature_norm": getattr(v, "feature_norm", None) is not None,
                       "weights_path": getattr(v, "weights_path", None)},
            "decoder": model.decoder.config.to_dict(), "plan": model.plan.kinds,
            "pos_conv": model.pos_conv is not None,
            "parameters": sum(p.numel() for p in model.parameters())}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_tokenizer(datamodule) -> Optional[Path]:
    """The tokenizer.json a datamodule reads (its tokenizer_path, else <root>/tokenizer.json), if any."""
    h = getattr(datamodule, "hparams", None)
    if h is None or "root" not in h:
        return None
    path = Path(h.get("tokenizer_path") or Path(h["root"]) / "tokenizer.json")
    return path if path.exists() else None


def recipe_record(config_path: Optional[str]) -> dict:
    """The recipe a manifest records: config_path (a YAML, or deltas joined by '+',
    `configs/visor.yaml+configs/universal.yaml`) and each file's text, in order."""
    paths = [p for p in (config_path or "").split("+") if p]
    # from the working directory, else the repository (the configs name their files repo-relative)
    files = [Path(p) if Path(p).exists() else Path(__file__).resolve().parents[2] / p for p in paths]
    texts = [f.read_text() for f in files if f.exists()]
    return {"recipe": config_path,
            "recipe_text": texts[0] if len(texts) == len(paths) == 1 else None,
            "recipe_texts": texts if len(texts) == len(paths) and texts else None}


def fit_manifest(trainer, config_path: Optional[str]) -> dict:
    """What a fit's export records beside the weights: the recipe (`recipe_record`), the data
    module's settings, the step and the last validation metrics."""
    dm = trainer.datamodule
    return {
        **recipe_record(config_path),
        "data": dict(dm.hparams) if dm is not None else None,
        "global_step": trainer.global_step,
        "validation": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }


def write_manifest(out_dir: str | Path, manifest: dict) -> dict:
    """out_dir/manifest.json: `manifest` with the commit it was made at; the one writer of the
    manifests beside exported weights (LVLM exports, converted checkpoints, the pretrained encoder)."""
    manifest = {"commit": git_commit(), **manifest}
    (Path(out_dir) / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def export_checkpoint(model: VisorLVLM, out_dir: str | Path, manifest: dict,
                      tokenizer: Optional[str | Path] = None, state: Optional[Dict[str, torch.Tensor]] = None,
                      dtype: torch.dtype = torch.float16) -> Path:
    """model.safetensors (in `dtype`, default half precision) + manifest.json (its architecture and
    `manifest`; + the data's tokenizer.json, copied, so the export answers questions on its own:
    src/eval/checkpoints.py) -> out_dir. state: the model's state dict when it is not
    `model.state_dict()` (a sharded model's, gathered whole)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(exportable_state(model, dtype, state), str(out_dir / "model.safetensors"))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    write_manifest(out_dir, {"architecture": architecture(model), **manifest})
    return out_dir


def decoder_differences(model: VisorLVLM, checkpoint_dir: Path, field_prefix: str) -> List[str]:
    """'set <field_prefix><field>: <checkpoint's value> (the model has <value>)' for every decoder size
    the checkpoint's manifest.json records differently from `model` ([] without a manifest)."""
    manifest = checkpoint_dir / "manifest.json"
    if not manifest.exists():
        return []
    recorded = json.loads(manifest.read_text()).get("architecture", {}).get("decoder") or {}
    ours = model.decoder.config.to_dict()
    return [f"set {field_prefix}{key}: {json.dumps(value)} (the model has {json.dumps(ours[key])})"
            for key, value in recorded.items() if key != "preset" and key in ours and ours[key] != value]


def load_base_checkpoint(model: VisorLVLM, path: str | Path, may_lack: Optional[Iterable[str]] = None,
                         field_prefix: str = "decoder.") -> Dict[str, list]:
    """Load an exported checkpoint into `model`. Every checkpoint tensor must land; the only model
    tensors the checkpoint may lack are `may_lack` (default: the ones VISOR adds to a base LVLM:
    cross sublayers, positional conv, router), which keep their initialisation (cross sublayers
    re-copied from their freshly loaded host layers). So a base loads into a VISOR model, and a
    universal VISOR checkpoint into the same model with a router (may_lack = the router's names).
    Returns {"loaded": [...], "new": [...]}; raises CheckpointMismatch listing any other difference,
    led by the config fields to set where the checkpoint's manifest records other decoder sizes
    (`field_prefix`: where the caller's config keeps the decoder, e.g. model.lvlm.init_args.decoder.)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    fixes = decoder_differences(model, path.parent, field_prefix)
    if fixes:
        raise CheckpointMismatch(f"{path.parent} was saved with other decoder sizes than the model's "
                                 f"(its manifest.json):\n  " + "\n  ".join(fixes))
    base = load_file(str(path))
    target = model.state_dict()
    alias = _tied_alias(model)
    allowed = model.new_tensor_names() if may_lack is None else may_lack
    model_keys = {k for k in target if k != alias}
    missing, unexpected, misshaped = state_differences({k: target[k] for k in model_keys}, base, allowed)
    if missing or unexpected or misshaped:
        raise CheckpointMismatch(f"{path} does not fit the model:\n  missing: {missing}\n"
                                 f"  unexpected: {unexpected}\n  mis-shaped: {misshaped}")
    loaded = model_keys & set(base)
    with torch.no_grad():
        for k in loaded:
            target[k].copy_(base[k].to(target[k].dtype))
    fresh_cross = {k.split(".")[2] for k in model_keys - loaded if k.startswith("decoder.cross.")}
    model.decoder.init_cross_from_host(only=fresh_cross)
    return {"loaded": sorted(loaded), "new": sorted(model_keys - loaded)}
