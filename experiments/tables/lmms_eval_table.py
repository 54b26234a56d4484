"""The offline task through lmms-eval's own CLI: full, the shipped VISOR model and the router side
by side, with LLM GFLOPs per sample and the wall time of each run.

    python experiments/tables/lmms_eval_table.py [--only full,visor,...] [--table-only] [--limit N] [--batch-size B]

Each row runs `python -m lmms_eval eval --model visor` on `visor_offline` (generation, exact match)
and `visor_offline_mc` (multiple choice by least answer NLL, --force_simple) with the row's
checkpoint, under outputs/lmms_eval/<row>/<task> (a DONE file: not rerun). The checkpoints are the
fits of experiments/tables/headline_table.py and experiments/tables/budget_report.py, and checkpoints/visor (the
shipped export of the `visor` row); `validate hard` is that fit's own last validation, for the
cross-check (the export's rounds its weights to half precision, as the manifest's figures do).
Writes experiments/results/lmms_eval_offline.md. Needs data/lmms_eval/visor_val
(`python -m src.eval.offline_task --config configs/visor.yaml`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.tables.runs import parse_row_args, run_logdir  # noqa: E402
from experiments.tables.tb_scalars import latest_scalars  # noqa: E402
from src.flops import CONVENTION  # noqa: E402

TASKS = {"visor_offline": [], "visor_offline_mc": ["--force_simple"]}
PER_TASK = ("background", "large", "spatial", "read", "count")

# row -> (what, model_args without stats_path, where its own validation was logged or the export)
ROWS: Dict[str, tuple] = {
    "full": ("full (every layer self)",
             "checkpoint=outputs/table/full/run/checkpoints/last.ckpt,config=configs/visor.yaml+configs/full.yaml,budget=max",
             run_logdir("table", "full")),
    "visor": ("VISOR S C C T C C, the shipped export (checkpoints/visor)", "checkpoint=checkpoints/visor,budget=max",
              ROOT / "checkpoints/visor"),
    "universal_min": ("VISOR universal, budget 0",
                      "checkpoint=outputs/universal/export,config=configs/visor.yaml+configs/universal.yaml,budget=min", run_logdir("budgets", "universal")),
    "universal_max": ("VISOR universal, budget 2",
                      "checkpoint=outputs/universal/export,config=configs/visor.yaml+configs/universal.yaml,budget=max", run_logdir("budgets", "universal")),
    "policy_reinforce": ("VISOR universal + REINFORCE router",
                         "checkpoint=outputs/budgets/policy_reinforce/run/checkpoints/last.ckpt,"
                         "config=configs/policy.yaml,budget=policy", run_logdir("budgets", "policy_reinforce")),
}
TRAINED_BY = {"full": "python experiments/tables/headline_table.py --only full",
              "visor": "make fit, then python -m src.export; or checkout checkpoints/visor",
              "universal_min": "python experiments/tables/budget_report.py --only universal",
              "universal_max": "python experiments/tables/budget_report.py --only universal",
              "policy_reinforce": "python experiments/tables/budget_report.py --only universal,policy_reinforce"}
VALIDATE_TAG = {"universal_min": "val/acc/hard@budget=0", "universal_max": "val/acc/hard@budget=2"}


def out_dir(row: str, task: str, limit: Optional[int] = None) -> Path:
    """outputs/lmms_eval/<row>/<task>, or .../<task>_limit<N> for a run over the first N questions."""
    return ROOT / "outputs" / "lmms_eval" / row / (task if limit is None else f"{task}_limit{limit}")


def run(row: str, task: str, limit: Optional[int], batch_size: int) -> None:
    out = out_dir(row, task, limit)
    if (out / "DONE").exists():
        print(f"[{row} {task}] finished earlier: {out}", flush=True)
        return
    source = ROWS[row][2]  # a finished fit (its DONE marker: not a checkpoint of a fit still running) or an export
    if not ((source / "DONE").exists() or (source / "manifest.json").exists()):
        sys.exit(f"[{row}] {source} has no finished fit: fit it first ({TRAINED_BY[row]})")
    out.mkdir(parents=True, exist_ok=True)
    model_args = f"{ROWS[row][1]},stats_path={out / 'stats.jsonl'}"
    cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", "visor", "--model_args", model_args,
           "--include_path", str(ROOT / "src/eval/tasks"), "--tasks", task, "--batch_size", str(batch_size),
           "--output_path", str(out), *TASKS[task], *(["--limit", str(limit)] if limit else [])]
    print(f"[{row} {task}] {' '.join(cmd)}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    (out / "DONE").write_text("ok\n")


def _results(row: str, task: str, limit: Optional[int]) -> Optional[dict]:
    out = out_dir(row, task, limit)
    if not (out / "DONE").exists():
        return None
    found = sorted(out.rglob("*_results.json"))
    results = json.loads(found[-1].read_text())
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()] if (
        out / "stats.jsonl").exists() else []
    return {"metrics": {k.split(",")[0]: v for k, v in results["results"][task].items() if "," in k},
            "n": results.get("n-samples", {}).get(task, {}).get("effective"), "stats": stats,
            "wall_s": float((out / "wall_s.txt").read_text())}


def _validate_hard(row: str) -> Optional[float]:
    source = ROWS[row][2]
    if (source / "manifest.json").exists():
        return json.loads((source / "manifest.json").read_text()).get("validation", {}).get("val/acc/hard")
    if not (source / "DONE").exists():
        return None
    v = latest_scalars(str(source), "val/")
    tag = VALIDATE_TAG.get(row, "val/acc/hard")
    return v[tag].value if tag in v else None


def write(rows: List[str], path: Path, limit: Optional[int] = None) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [("The offline task (the embedded default's validation: 500 images, 3000 questions)" if limit is None else
              f"The first {limit} questions of the offline task") + " scored by "
             "lmms-eval 0.7.3's own CLI through the `visor` plugin, from experiments/tables/lmms_eval_table.py. "
             "Generation: exact match, greedy, 8 new tokens at most; MC: the least-NLL answer of up to 4 "
             f"(its own and 3 other answers of its task). LLM GFLOPs per sample {CONVENTION}, the prompt's prefill "
             "(the plugin's stats_path). Wall: the whole lmms-eval command, loading included, on this machine.", "",
             "| row | what | acc | easy | hard | " + " | ".join(PER_TASK) + " | validate hard | MC acc | MC hard "
             "| LLM GFLOPs | budgets | wall gen / MC (s) |",
             "|---|---|" + "---|" * (len(PER_TASK) + 10)]
    for row in rows:
        gen, mc = _results(row, "visor_offline", limit), _results(row, "visor_offline_mc", limit)
        if gen is None:
            continue
        m, stats = gen["metrics"], gen["stats"]
        gflops = sum(s["gflops"] for s in stats) / len(stats) if stats else None
        mix: Dict[str, int] = {}
        for s in stats:
            mix[s["budget_layers"]] = mix.get(s["budget_layers"], 0) + 1
        budgets = ", ".join(f"{k} {100 * n / len(stats):.0f}%" for k, n in sorted(mix.items())) if stats else "-"
        mm = mc["metrics"] if mc else {}
        lines.append(f"| {row} | {ROWS[row][0]} | {pct(m.get('acc'))} | {pct(m.get('acc_easy'))} | {pct(m.get('acc_hard'))} | "
                     + " | ".join(pct(m.get(f"acc_{t}")) for t in PER_TASK)
                     + f" | {pct(_validate_hard(row))} | {pct(mm.get('acc'))} | {pct(mm.get('acc_hard'))} | "
                     f"{'-' if gflops is None else f'{gflops:.3f}'} | {budgets} | "
                     f"{gen['wall_s']:.0f} / {'-' if mc is None else round(mc['wall_s'])} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _options(ap) -> None:
    ap.add_argument("--limit", type=int, default=None, help="lmms-eval's --limit: the first N questions only")
    ap.add_argument("--batch-size", type=int, default=32)


def main() -> None:
    args, names = parse_row_args(__doc__, ROWS, steps=False, extra=_options)
    if args.limit is not None and args.limit < 1:
        sys.exit(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        sys.exit(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.table_only:
        for name in names:
            for task in TASKS:
                run(name, task, args.limit, args.batch_size)
    name = "lmms_eval_offline.md" if args.limit is None else f"lmms_eval_offline_limit{args.limit}.md"
    print(write(names, ROOT / "experiments" / "results" / name, args.limit))


if __name__ == "__main__":
    main()
