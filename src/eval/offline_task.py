"""The offline lmms-eval task's data: a config's validation shards -> a local `datasets` folder.

    python -m src.eval.offline_task --config configs/visor.yaml      # -> data/lmms_eval/visor_val

One row per question (the order and ids `key/n` of `python -m src.cli validate` and predict): image
(PIL), question, answer, task, difficulty, id, and for the multiple-choice task (`visor_offline_mc`)
`choices` (the answer among up to N_CHOICES - 1 other answers of the same task, `distractors`) and
`label` (the answer's index in them). The data are generated first where missing, as
`fit` would (the config's `data.*`; e.g. `--data.val_images 100`). lmms-eval then reads the folder
with `--include_path src/eval/tasks --tasks visor_offline` (dataset_kwargs.load_from_disk, no network).
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Dict, List

DEFAULT_OUT = "data/lmms_eval/visor_val"  # where tasks/visor_offline/visor_offline.yaml reads (from the repo root)
N_CHOICES = 4  # the multiple-choice task's options per question


def read_val_rows(shards: List[str]) -> List[Dict]:
    """Every well-formed question of the shards in reading order (the validation loop's)."""
    import webdataset as wds
    from PIL import Image

    from src.data.shards import QA_FIELDS

    rows = []
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"].decode("utf-8"))
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        for n, qa in enumerate(q for q in meta.get("qa", [meta])
                               if isinstance(q, dict) and all(isinstance(q.get(f), str) for f in QA_FIELDS)):
            rows.append({"id": f"{sample['__key__']}/{n}", "image": image, **{f: qa[f] for f in QA_FIELDS}})
    return rows


def distractors(rows: List[Dict], n_choices: int = N_CHOICES) -> List[Dict]:
    """Each row + `choices` (its answer and up to n_choices - 1 distinct other answers of its task in
    these rows, in an order fixed by the row's id) and `label` (the answer's index)."""
    import random

    by_task: Dict[str, List[str]] = {}
    for r in rows:
        by_task.setdefault(r["task"], [])
        if r["answer"] not in by_task[r["task"]]:
            by_task[r["task"]].append(r["answer"])
    out = []
    for r in rows:
        rng = random.Random(r["id"])  # str seeds are hashed deterministically (not by PYTHONHASHSEED)
        others = [a for a in by_task[r["task"]] if a != r["answer"]]
        choices = rng.sample(others, min(n_choices - 1, len(others))) + [r["answer"]]
        rng.shuffle(choices)
        out.append({**r, "choices": choices, "label": choices.index(r["answer"])})
    return out


def build(config_args: List[str], out: str = DEFAULT_OUT) -> Path:
    """config_args: `--config X.yaml [--data.field value ...]` -> the saved dataset folder."""
    import datasets

    from src.cli import main

    cli = main([*config_args, "--trainer.logger", "false"], run=False)
    dm = cli.datamodule
    dm.prepare_data()
    rows = read_val_rows(dm.shards("val"))
    if not rows:
        raise ValueError(f"no questions in the validation shards of {dm.hparams.root}")
    rows = distractors(rows)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  **{f: datasets.Value("string") for f in ("question", "answer", "task", "difficulty")},
                                  "choices": datasets.Sequence(datasets.Value("string")), "label": datasets.Value("int32")})
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    datasets.DatasetDict({"val": ds}).save_to_disk(out)
    print(f"wrote {out}: {len(ds)} questions about {len({r['id'].split('/')[0] for r in rows})} images "
          f"from {dm.hparams.root}")
    return Path(out)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args, config_args = ap.parse_known_args(argv)
    if "--config" not in config_args:
        ap.error("give --config <the YAML whose data to use>, e.g. --config configs/visor.yaml")
    return build(config_args, args.out)


if __name__ == "__main__":
    main()
