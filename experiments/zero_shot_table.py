"""Token reduction without fine-tuning: the shipped base validated as is, with each reducer applied
(how VisionZip and FastV are usually deployed: training-free).

    python experiments/zero_shot_table.py [--only full,full_pool2,...]

Each row is `python -m src.cli validate` with configs/full.yaml (+ a token-reduction delta) on the
shipped base, logged under outputs/zeroshot/<row>; a row with results is not rerun. Writes
experiments/results/zero_shot.{md,csv}.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.headline_table import FITS  # noqa: E402
from experiments.runs import parse_row_args  # noqa: E402
from experiments.tb_scalars import latest_scalars  # noqa: E402
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


def write(names, out_dir: Path) -> str:
    cols = [f"acc/{t}" for t in TASKS] + ["acc/easy", "acc/hard", "gflops"]
    lines = ["The shipped base validated with each reducer and no fine-tuning (500 images, 3000 questions; "
             "accuracy %, LLM GFLOPs per sample).", "",
             "| row | what | " + " | ".join(c.replace("acc/", "") for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "zero_shot.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row"] + cols)
        for name in names:
            if not logdir(name).exists():
                continue
            v = {k: e.value for k, e in latest_scalars(str(logdir(name)), "val/").items()}
            vals = [v.get(f"val/{c}") for c in cols]
            if vals[-1] is None:
                continue
            cells = ["-" if x is None else (f"{x:.3f}" if c == "gflops" else f"{100 * x:.1f}") for c, x in zip(cols, vals)]
            lines.append(f"| {name} | {FITS[name][0]} | " + " | ".join(cells) + " |")
            w.writerow([name] + vals)
    text = "\n".join(lines) + "\n"
    (out_dir / "zero_shot.md").write_text(text)
    return text


def main() -> None:
    args, names = parse_row_args(__doc__, ROWS, steps=False)
    if not args.table_only:
        for name in names:
            run(name)
    print(write(names, ROOT / "experiments" / "results"))


if __name__ == "__main__":
    main()
