"""Convert a Hugging Face LLaVA-OneVision checkpoint folder into our base checkpoint.

    python -m src.import_llava_ov --hf-dir checkpoints/hf/llava-onevision-qwen2-0.5b-ov-hf \
        --out checkpoints/llava_ov_0.5b [--dtype source|bfloat16|float16|float32]

The folder is what `huggingface-cli download llava-hf/llava-onevision-qwen2-0.5b-ov-hf` gives
(config.json + model.safetensors or shards with model.safetensors.index.json; no download here).
Writes `<out>/model.safetensors` (the base LVLM: every layer `self`, no positional conv, the
format `load_base_checkpoint` and `model.base_checkpoint` read) and `<out>/manifest.json` (the
architecture, the LightningCLI `init_args` that rebuild the model, the source config). Every
source tensor is accounted for or the conversion fails listing the names (src/models/hf_import.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from src.lit.checkpoint_io import DTYPES, export_checkpoint, load_base_checkpoint
from src.models.anyres import AnyRes
from src.models.decoder import DecoderConfig
from src.models.llava_ov import llava_ov_from_hf, lvlm_init_args
from src.models.plan import LayerPlan
from src.models.lvlm import VisorLVLM
from src.models.siglip import SiglipVisionEncoder

SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def source_dtype(hf_dir: Path) -> str:
    """The floating dtype the source checkpoint stores its tensors in (one of DTYPES' names): the
    published LLaVA-OV-0.5B is float16, and converting it to bfloat16 would round every weight."""
    from safetensors import safe_open

    found = set()
    for shard in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            found |= {f.get_slice(name).get_dtype() for name in f.keys()}
    floating = {SAFETENSORS_DTYPES[d] for d in found if d in SAFETENSORS_DTYPES}
    if len(floating) != 1:
        raise ValueError(f"{hf_dir}: cannot tell the source dtype (floating dtypes found: {sorted(floating) or 'none'}); "
                         f"pass --dtype {{{', '.join(DTYPES)}}}")
    return floating.pop()


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: str = "source") -> dict:
    """Convert and write; returns the manifest. dtype: a DTYPES name, or "source" (the source's own)."""
    if dtype != "source" and dtype not in DTYPES:
        raise ValueError(f"--dtype must be 'source' or one of {list(DTYPES)}, got {dtype!r}")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if dtype == "source":
        dtype = source_dtype(hf_dir)
    model, settings = llava_ov_from_hf(hf_dir, pos_conv=False)  # the base: all self, no pos conv
    source_config = json.loads((hf_dir / "config.json").read_text())
    manifest = {
        "lvlm_init_args": lvlm_init_args(model, settings["vision"]),
        "dtype": dtype,
        "source": {"hf_dir": str(hf_dir), "config": source_config},
        "image_token_index": settings["image_token_index"],
        "image_mode": "AnyRes (src.models.anyres.TiledImages: a base crop and tiles per image, settings in "
                      "lvlm_init_args.anyres) or one crop per image (its tokens then one image_newline); crops "
                      "image_size x image_size in [0, 1], mean/std 0.5 inside the encoder",
    }
    export_checkpoint(model, out_dir, manifest, dtype=DTYPES[dtype])
    return json.loads((out_dir / "manifest.json").read_text())


def load_converted(out_dir: str | Path, plan: Optional[LayerPlan] = None, pos_conv: bool = False,
                   cross_init: str = "host", dtype: torch.dtype = torch.float32) -> VisorLVLM:
    """Rebuild a converted model from its manifest and load it (cross sublayers copied from their host
    layers, positional conv zero-initialised) -> model in eval mode. plan default: all `self`."""
    out_dir = Path(out_dir)
    args = json.loads((out_dir / "manifest.json").read_text())["lvlm_init_args"]
    dc = DecoderConfig(**args["decoder"])
    plan = plan or LayerPlan(n_layers=dc.n_layers, all_self=True)
    anyres = AnyRes(**args["anyres"]) if args.get("anyres") else None
    model = VisorLVLM(SiglipVisionEncoder(**args["vision"]["init_args"]), dc, plan, pos_conv=pos_conv,
                      cross_init=cross_init, image_newline=args["image_newline"], anyres=anyres).to(dtype)
    load_base_checkpoint(model, out_dir)
    return model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="the Hugging Face checkpoint folder (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="where to write model.safetensors and manifest.json")
    ap.add_argument("--dtype", default="source", choices=["source", *sorted(DTYPES)],
                    help="stored dtype (default: the source checkpoint's own, lossless)")
    args = ap.parse_args(argv)
    manifest = convert(args.hf_dir, args.out, args.dtype)
    a = manifest["architecture"]
    print(f"wrote {args.out}: {a['parameters']:,} parameters, decoder {a['decoder']}, "
          f"{manifest['lvlm_init_args']['vision']['init_args']}")
    return manifest


if __name__ == "__main__":
    main()
