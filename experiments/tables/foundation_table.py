"""The foundation comparison: VISOR, full, and full with 2x2-pooled visual tokens, every row
fine-tuned from the shipped base with the same recipe, run one after the other on this machine.

    python experiments/tables/foundation_table.py [--steps N] [--only visor,full,full_pool2] [--table-only]

Each row is a LightningCLI fit with its own TensorBoard run under outputs/table/<row>; a row
whose run finished is not rerun. Writes experiments/results/foundation.md and .csv with
accuracy per task and difficulty (final validation), LLM GFLOPs per sample, train steps/s.
"""
from __future__ import annotations

import csv
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.tables.committed_rows import merge_committed, weights_fingerprint  # noqa: E402
from experiments.tables.runs import parse_row_args, run_fit, run_logdir  # noqa: E402
from experiments.tables.tb_scalars import latest_scalars, scalar_values  # noqa: E402
from src.data.generator import TASKS  # noqa: E402
from src.flops import CONVENTION  # noqa: E402

ROWS = {
    "visor": ["--config", "configs/visor.yaml"],
    "full": ["--config", "configs/visor.yaml", "--config", "configs/full.yaml"],
    "full_pool2": ["--config", "configs/visor.yaml", "--config", "configs/full.yaml", "--config",
                   "configs/token_reduction/pool2.yaml"],
}


def row_logdir(name: str) -> Path:
    return run_logdir("table", name)


def row_metrics(logdir: Path) -> dict:
    s = latest_scalars(str(logdir))
    val = {k: v.value for k, v in s.items()}
    out = {f"acc/{t}": val.get(f"val/acc/{t}") for t in TASKS}
    speeds = sorted(scalar_values(str(logdir), "train/steps_per_sec"))
    out.update({"acc/easy": val.get("val/acc/easy"), "acc/hard": val.get("val/acc/hard"),
                "llm_gflops": val.get("val/gflops"), "steps_per_sec": speeds[len(speeds) // 2] if speeds else None,
                "step": max(v.step for v in s.values())})
    return out


def write_table(results: dict, out_dir: Path, base: str) -> str:
    """Writes foundation.{md,csv} from `results` (row -> metrics, measured on base `base`) and the
    committed rows of the same base that were not measured now (experiments/tables/committed_rows.py)."""
    cols = [f"acc/{t}" for t in TASKS] + ["acc/easy", "acc/hard", "llm_gflops", "savings", "steps_per_sec", "step"]
    out_dir.mkdir(parents=True, exist_ok=True)
    records = merge_committed([dict(m, row=name) for name, m in results.items()], out_dir / "foundation.csv",
                              ["row"], base, list(ROWS))
    full = next((r["llm_gflops"] for r in records if r["row"] == "full"), None)
    lines = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    with open(out_dir / "foundation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row"] + cols + ["base"])
        for m in records:
            m["savings"] = (full / m["llm_gflops"]) if full and m.get("llm_gflops") else None
            cells = []
            for c in cols:
                v = m.get(c)
                cells.append("-" if v is None else (f"{100 * v:.1f}" if c.startswith("acc/") else
                                                    f"{v:.3f}" if isinstance(v, float) else str(v)))
            lines.append(f"| {m['row']} | " + " | ".join(cells) + " |")
            w.writerow([m["row"]] + [m.get(c) for c in cols] + [base])
    header = (f"Machine: {platform.node()} ({platform.processor() or platform.machine()}), CPU only. "
              "Accuracy in %, exact match on the validation split; LLM GFLOPs per sample (analytical) "
              f"{CONVENTION}; "
              "savings = full / row LLM GFLOPs; steps/s: the median over the run of 20-step averages.\n\n")
    text = header + "\n".join(lines) + "\n"
    (out_dir / "foundation.md").write_text(text)
    return text


def main() -> None:
    args, names = parse_row_args(__doc__, ROWS)
    results = {}
    for name in names:
        logdir = row_logdir(name)
        if not args.table_only:
            run_fit("table", name, ROWS[name], args.steps)
        if logdir.exists():
            results[name] = row_metrics(logdir)
    print(write_table(results, ROOT / "experiments" / "results", weights_fingerprint()))


if __name__ == "__main__":
    main()
