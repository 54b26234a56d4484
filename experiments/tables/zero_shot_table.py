"""Token reduction without fine-tuning: the shipped base validated as is, with each reducer applied
(how VisionZip and FastV are usually deployed: training-free).

    python experiments/tables/zero_shot_table.py [--only full,full_pool2,...]

Each row is `python -m src.cli validate` with configs/visor.yaml + configs/full.yaml (+ a
token-reduction delta) on the shipped base, logged under outputs/zeroshot/<row>; a row with results is not rerun. Writes
experiments/results/zero_shot.{md,csv}.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.tables.committed_rows import merge_committed, weights_fingerprint  # noqa: E402
from experiments.tables.headline_table import FITS  # noqa: E402
from experiments.tables.runs import parse_row_args  # noqa: E402
from experiments.tables.tb_scalars import latest_scalars  # noqa: E402
from src.data.generator import TASKS  # noqa: E402

ROWS = {name: spec for name, spec in FITS.items() if name.startswith("full")}  # VISOR needs training


def logdir(name: str) -> Path:
    return ROOT / "outputs" / "zeroshot" / name / "run"


def run(name: str) -> None:
    if logdir(name).exists() and latest_scalars(str(logdir(name)), "val/acc"):
        print(f"[{name}] has results: {logdir(name)}", flush=True)
        return
    cmd = [sys.executable, "-m", "src.cli", "validate", *FITS[name][1],
           "--trainer.logger.init_args.save_dir", "outputs/zeroshot", "--trainer.logger.init_args.name", name,
           "--trainer.logger.init_args.version", "run"]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


COLUMNS = [f"acc/{t}" for t in TASKS] + ["acc/easy", "acc/hard", "gflops"]


def collect(names) -> list:
    """One record per row with results on this machine (keys: the CSV's columns)."""
    records = []
    for name in names:
        if not logdir(name).exists():
            continue
        v = {k: e.value for k, e in latest_scalars(str(logdir(name)), "val/").items()}
        if v.get("val/gflops") is not None:
            records.append(dict(row=name, **{c: v.get(f"val/{c}") for c in COLUMNS}))
    return records


def write(records: list, out_dir: Path, base: str) -> str:
    """Writes zero_shot.{md,csv} from `records` (measured on base `base`) and the committed rows of
    the same base that were not measured now (experiments/tables/committed_rows.py)."""
    lines = ["The shipped base validated with each reducer and no fine-tuning (500 images, 3000 questions; "
             "accuracy %, LLM GFLOPs per sample).", "",
             "| row | what | " + " | ".join(c.replace("acc/", "") for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    out_dir.mkdir(parents=True, exist_ok=True)
    records = merge_committed(records, out_dir / "zero_shot.csv", ["row"], base, list(ROWS))
    with open(out_dir / "zero_shot.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row"] + COLUMNS + ["base"])
        for r in records:
            vals = [r.get(c) for c in COLUMNS]
            cells = ["-" if x is None else (f"{x:.3f}" if c == "gflops" else f"{100 * x:.1f}") for c, x in zip(COLUMNS, vals)]
            lines.append(f"| {r['row']} | {FITS[r['row']][0]} | " + " | ".join(cells) + " |")
            w.writerow([r["row"]] + vals + [base])
    text = "\n".join(lines) + "\n"
    (out_dir / "zero_shot.md").write_text(text)
    return text


def main() -> None:
    args, names = parse_row_args(__doc__, ROWS, steps=False)
    if not args.table_only:
        for name in names:
            run(name)
    print(write(collect(names), ROOT / "experiments" / "results", weights_fingerprint()))


if __name__ == "__main__":
    main()
