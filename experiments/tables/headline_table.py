"""The headline table: VISOR against token reduction, every row fine-tuned from the shipped base
with the vision encoder frozen and one recipe (configs/visor.yaml's: 900 steps, 200 of them new
parts only), seed 0, run one after the other on one machine.

    python experiments/tables/headline_table.py [--only full_fastv50,...] [--table-only] [--steps N] [--seed K]

Rows are fits under outputs/table/<row> (shared with experiments/tables/foundation_table.py: `visor`,
`full` and `full_pool2` are its rows, not rerun); `--seed K` (K > 0) fits them again with
seed_everything K, which orders the training stream, under outputs/table_seed<K>/<row>, and the
table lists every seed found, one line each. Plus rows read from experiments/tables/budget_report.py's
runs, at every seed it fitted: VISOR at each budget (the universal model), VISOR trained at one
budget, and VISOR with the REINFORCE router. A finished row is not rerun. Writes experiments/results/headline.{md,csv}
and headline.png (hard accuracy vs LLM GFLOPs per sample, Pareto front marked).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.tables.committed_rows import merge_committed, weights_fingerprint  # noqa: E402
from experiments.tables.runs import fitted_seeds, mean_range, parse_row_args, run_fit, run_logdir, seed_args, seed_group  # noqa: E402
from experiments.tables.tb_scalars import latest_scalars  # noqa: E402
from src.flops import CONVENTION  # noqa: E402
from src.plots import pareto_chart  # noqa: E402

FULL = ["--config", "configs/visor.yaml", "--config", "configs/full.yaml"]
VISOR = ["--config", "configs/visor.yaml"]


def _delta(name: str) -> List[str]:
    return ["--config", f"configs/token_reduction/{name}.yaml"]


# name -> (description, fit arguments); fits in outputs/table/<name>
FITS: Dict[str, tuple] = {
    "full": ("full (every layer self)", FULL),
    "visor": ("VISOR S C C T C C", VISOR),
    "visor_c135": ("VISOR S C T C T C", VISOR + ["--model.lvlm.init_args.plan.cross_layers", "[1, 3, 5]"]),
    "visor_crossrope": ("VISOR S C C T C C, RoPE in cross", VISOR + ["--model.lvlm.init_args.cross_rope", "true"]),
    "full_pool2": ("pool 2x2", FULL + _delta("pool2")),
    "full_pool4": ("pool 4x4", FULL + _delta("pool4")),
    "full_visionzip25": ("VisionZip-style 25%", FULL + _delta("visionzip25")),
    "full_visionzip11": ("VisionZip-style 11%", FULL + _delta("visionzip11")),
    "full_fastv50": ("FastV-style 50% dropped", FULL + _delta("fastv50")),
    "full_fastv75": ("FastV-style 75% dropped", FULL + _delta("fastv75")),
    "visor_pool2": ("VISOR + pool 2x2", VISOR + _delta("pool2")),
}
N_BUDGETS = 3  # configs/universal.yaml (experiments/tables/budget_report.py)
GROUP, BUDGETS_GROUP = "table", "budgets"  # outputs/<group>[_seed<K>]/<row>: this table's fits, budget_report's


def _values(logdir: Path) -> dict:
    return {k: v.value for k, v in latest_scalars(str(logdir), "val/").items()}


def collect() -> List[dict]:
    """One record per row and seed that has results on this machine (keys: the CSV's columns)."""
    records = []
    for name, (what, _) in FITS.items():
        for seed in fitted_seeds(GROUP):
            logdir = run_logdir(seed_group(GROUP, seed), name)
            if (logdir / "DONE").exists():
                v = _values(logdir)
                records.append(dict(row=name, what=what, seed=seed, easy=v.get("val/acc/easy"),
                                    hard=v.get("val/acc/hard"), llm_gflops=v.get("val/gflops"),
                                    read=v.get("val/acc/read"), count=v.get("val/acc/count")))
    # experiments/tables/budget_report.py's fits: the universal model at every budget, models trained at one
    # budget, the REINFORCE router; at every seed fitted there
    for seed in fitted_seeds(BUDGETS_GROUP):
        for fit, row, budgets, what in [("universal", "universal", range(N_BUDGETS), "VISOR universal, budget {k}")] + [
                (f"fixed{k}", "fixed", [k], "VISOR trained at budget {k} only") for k in range(N_BUDGETS)]:
            logdir = run_logdir(seed_group(BUDGETS_GROUP, seed), fit)
            if not (logdir / "DONE").exists():
                continue
            v = _values(logdir)
            for k in budgets:
                records.append(dict(row=f"{row}@{k}", what=what.format(k=k), seed=seed,
                                    easy=v.get(f"val/acc/easy@budget={k}"), hard=v.get(f"val/acc/hard@budget={k}"),
                                    llm_gflops=v.get(f"val/gflops@budget={k}"), read=v.get(f"val/acc/read@budget={k}"),
                                    count=v.get(f"val/acc/count@budget={k}")))
        policy = run_logdir(seed_group(BUDGETS_GROUP, seed), "policy_reinforce")
        if (policy / "DONE").exists():
            v = _values(policy)
            records.append(dict(row="policy_reinforce", what="VISOR universal + REINFORCE router", seed=seed,
                                easy=v.get("val/acc/easy"), hard=v.get("val/acc/hard"), llm_gflops=v.get("val/gflops"),
                                read=v.get("val/acc/read"), count=v.get("val/acc/count")))
    return [r for r in records if None not in (r["easy"], r["hard"], r["llm_gflops"])]


ROW_ORDER = (list(FITS) + [f"{fit}@{k}" for fit in ("universal", "fixed") for k in range(N_BUDGETS)]
             + ["policy_reinforce"])
COLUMNS = ["row", "what", "seed", "easy", "hard", "read", "count", "llm_gflops", "savings", "base"]


def write(records: List[dict], out_dir: Path, base: str) -> str:
    """Writes headline.{md,csv,png} from `records` (measured on base `base`) and the committed rows
    of the same base that were not measured now (experiments/tables/committed_rows.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = merge_committed(records, out_dir / "headline.csv", ["row", "seed"], base)
    rank = {name: i for i, name in enumerate(ROW_ORDER)}  # rows in ROW_ORDER, each row's seeds ascending
    records.sort(key=lambda r: (rank.get(r["row"], len(rank)), r["seed"]))
    full = next((r["llm_gflops"] for r in records if r["row"] == "full"), None)
    lines = ["Every row fine-tuned from the shipped base (encoder frozen, configs/visor.yaml's recipe; the seed "
             "orders the training stream). Accuracy in % (exact match, final validation: 500 images, 3000 questions); "
             f"LLM GFLOPs per sample {CONVENTION}; savings = full / row. The hard tasks are `read` and `count` (their columns: `-` "
             "where the run logs no per-task accuracy per budget).", "",
             "| row | what | seed | easy | hard | read | count | LLM GFLOPs | savings |",
             "|---|---|---|---|---|---|---|---|---|"]
    with open(out_dir / "headline.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        for r in records:
            r["savings"] = savings = full / r["llm_gflops"] if full else None
            lines.append(f"| {r['row']} | {r['what']} | {r['seed']} | {pct(r['easy'])} | {pct(r['hard'])} | {pct(r.get('read'))} | "
                         f"{pct(r.get('count'))} | {r['llm_gflops']:.3f} | {'-' if savings is None else f'{savings:.2f}x'} |")
            w.writerow([r.get(c) for c in COLUMNS])
    if records:
        label = lambda r: r["row"] if r["seed"] == 0 else f"{r['row']} (seed {r['seed']})"  # noqa: E731
        pareto_chart({label(r): (r["llm_gflops"], 100 * r["hard"]) for r in records},
                     title="hard accuracy vs LLM GFLOPs per sample", xlabel="LLM GFLOPs per sample",
                     ylabel="hard accuracy %").save(out_dir / "headline.png")
    text = "\n".join(lines + seed_summary(records)) + "\n"
    (out_dir / "headline.md").write_text(text)
    return text


def seed_summary(records: List[dict]) -> List[str]:
    """Markdown lines: for every row fitted at more than one seed, easy and hard accuracy as mean
    [min, max] over its seeds, and its hard accuracy minus full's at the same seed (paired), as the
    README's claims are stated against ([] when no row has two seeds)."""
    by_row: Dict[str, Dict[int, dict]] = {}
    for r in records:
        by_row.setdefault(r["row"], {})[r["seed"]] = r
    full = by_row.get("full", {})
    lines = []
    for row, seeds in by_row.items():
        if len(seeds) < 2:
            continue
        gaps = [r["hard"] - full[k]["hard"] for k, r in seeds.items() if k in full and row != "full"]
        lines.append(f"| {row} | {', '.join(map(str, sorted(seeds)))} | {mean_range([r['easy'] for r in seeds.values()])} | "
                     f"{mean_range([r['hard'] for r in seeds.values()])} | "
                     f"{mean_range(gaps, '+') if gaps else '-'} |")
    if not lines:
        return []
    return ["", "Across seeds (rows fitted at more than one seed): mean [min, max] in %; hard vs full: the row's hard "
            "accuracy minus full's at the same seed.", "",
            "| row | seeds | easy | hard | hard vs full |", "|---|---|---|---|---|", *lines]


def main() -> None:
    args, names = parse_row_args(__doc__, FITS, seed=True)
    if not args.table_only:
        for name in names:
            run_fit(seed_group(GROUP, args.seed), name, FITS[name][1] + seed_args(args.seed), args.steps)
    print(write(collect(), ROOT / "experiments" / "results", weights_fingerprint()))


if __name__ == "__main__":
    main()
