"""Export a Lightning checkpoint as a shippable base checkpoint, validating it first.

    python -m src.export --config configs/base.yaml --ckpt outputs/base/checkpoints/last.ckpt \
        --out checkpoints/base [--note "interim: ..."]
    python -m src.export --config configs/base.yaml --config configs/base_stage2.yaml \
        --ckpt outputs/base_stage2/checkpoints/last.ckpt --out checkpoints/base_stage2   # a stacked stage

The manifest records the recipe, commit, data seed, training step and the validation accuracy
per task measured here, on the exported weights (rounded to --dtype, default float16, first); the
data's tokenizer.json is copied beside them."""
from __future__ import annotations

import argparse

import torch

from src.cli import main as cli_main
from src.lit.checkpoint_io import (DTYPES, data_tokenizer, export_checkpoint, exportable_state,
                                  read_lightning_checkpoint, recipe_record)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, action="append",
                    help="the fit's config; repeat it for a stack of deltas, as the fit was given them")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES),
                    help="the exported weights' dtype (bfloat16 for a model trained in bf16: float16's range is smaller)")
    args, overrides = ap.parse_known_args(argv)  # the rest goes to the LightningCLI (e.g. --data.val_images 100)
    configs = [a for c in args.config for a in ("--config", c)]
    cli = cli_main([*configs, "--trainer.logger", "false", *overrides], run=False, weights_later=True)
    ckpt = read_lightning_checkpoint(args.ckpt)
    cli.model.load_state_dict(ckpt["state_dict"])
    lvlm = cli.model.lvlm
    # Validate what ships: round the weights to the export dtype first.
    dtype = DTYPES[args.dtype]
    with torch.no_grad():
        for k, v in exportable_state(lvlm, dtype).items():
            lvlm.state_dict()[k].copy_(v.to(lvlm.state_dict()[k].dtype))
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    manifest = {**recipe_record("+".join(args.config)),
                "data": dict(cli.datamodule.hparams), "source_checkpoint": args.ckpt,
                "global_step": ckpt.get("global_step"), "note": args.note,
                "validation": {k: round(float(v), 4) for k, v in metrics.items()}}
    export_checkpoint(lvlm, args.out, manifest, data_tokenizer(cli.datamodule), dtype=dtype)
    print(f"exported {args.out}: step {manifest['global_step']}, validation {manifest['validation']}")
    return manifest


if __name__ == "__main__":
    main()
