"""The budgets-and-policy comparison, side by side with one training budget per row.

    python experiments/tables/budget_report.py [--steps N] [--only universal,fixed0,...] [--table-only] [--seed K]

Rows (each a LightningCLI fit under outputs/budgets/<row>, resumable; `--seed K` (K > 0) fits them
with seed_everything K under outputs/budgets_seed<K>/<row>, the universal export in its own folder
there for that seed's policy rows):
- universal: configs/visor.yaml + configs/universal.yaml (one random budget per step), every
  budget evaluated; universal_sandwich: largest + smallest + random budget per step, 300 steps
  (the same forward/backward passes as universal's 900); universal_sandwich_distill: the same
  with in-place distillation (the smaller budgets learn the largest one's answer distribution);
  universal_sandwich_900: sandwich at universal's 900 steps (equal updates, 3x the passes);
- fixed<k>: the same recipe trained only at budget k (model.budget_sampling: k);
- policy_reinforce / policy_pseudo: configs/policy.yaml on the universal export;
  policy_reinforce_cw<w>: REINFORCE with cost weight w instead of the config's 0.3;
  policy_reinforce_cw0.1_greedy: the same at 0.1 with the greedy (self-critical) baseline;
  policy_pseudo_nll: pseudo-labels scored by minus the answer's NLL instead of exact match.
Writes experiments/results/budgets.{md,csv} (every row at every seed found, the curve gaps paired
by seed; across seeds: each universal row minus the one-budget model at the same budget and seed,
what each budget adds per task, and each router's budget mix per task) and budgets.png (seed 0:
accuracy vs LLM GFLOPs of the universal curve, the fixed-budget points, the policies' operating points).
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
from src.data.generator import TASKS  # noqa: E402
from src.flops import CONVENTION  # noqa: E402
from src.plots import xy_chart  # noqa: E402

GROUP = "budgets"
N_BUDGETS = 3  # configs/universal.yaml: S C C T C C (= configs/visor.yaml), S C S T C C, S C S T S C
UNIVERSAL = ["--config", "configs/visor.yaml", "--config", "configs/universal.yaml"]
EXPORT = "outputs/universal/export"  # configs/universal.yaml's ExportCheckpoint (seed 0)
COST_WEIGHTS = (0.1, 0.03)


def universal_export(seed: int) -> str:
    """The universal row's export at this seed, which that seed's policy rows load."""
    return EXPORT if seed == 0 else f"outputs/{seed_group(GROUP, seed)}/universal_export"


def rows(seed: int = 0) -> dict:
    """Row name -> fit arguments at `seed` (0: the configs' own seed and paths)."""
    group, universal = seed_group(GROUP, seed), UNIVERSAL + seed_args(seed)
    out = {"universal": universal + ([] if seed == 0 else ["--trainer.callbacks.dirpath", universal_export(seed)])}
    for k in range(N_BUDGETS):
        # trained at budget k only; its export must not replace the universal one
        out[f"fixed{k}"] = universal + ["--model.budget_sampling", str(k), "--trainer.callbacks.dirpath",
                                        f"outputs/{group}/fixed{k}_export"]
    # sandwich sampling at the same compute: 300 steps x 3 budgets = uniform's 900 steps x 1 budget
    # (stage 1, warmup and validation scaled by 1/3)
    out["universal_sandwich"] = universal + [
        "--model.budget_sampling", "sandwich", "--trainer.max_steps", "300", "--model.new_params_only_steps", "67",
        "--model.warmup_steps", "33", "--trainer.val_check_interval", "150",
        "--trainer.callbacks.dirpath", f"outputs/{group}/universal_sandwich_export"]
    # sandwich at universal's 900 steps (3x its forward/backward passes): equal updates, not equal compute
    out["universal_sandwich_900"] = universal + ["--model.budget_sampling", "sandwich", "--trainer.callbacks.dirpath",
                                                 f"outputs/{group}/universal_sandwich_900_export"]
    # the same with in-place distillation: the largest budget's answers teach the smaller ones
    out["universal_sandwich_distill"] = out["universal_sandwich"][:-1] + [
        f"outputs/{group}/universal_sandwich_distill_export", "--model.distill_weight", "1.0"]
    for mode, name in (("reinforce", "policy_reinforce"), ("pseudo_label", "policy_pseudo")):
        out[name] = ["--config", "configs/policy.yaml", *seed_args(seed), "--model.init_args.universal_checkpoint",
                     universal_export(seed), "--model.init_args.mode", mode]
    for cost_weight in COST_WEIGHTS:  # REINFORCE with a cheaper price on FLOPs (configs/policy.yaml: 0.3)
        out[f"policy_reinforce_cw{cost_weight}"] = out["policy_reinforce"] + ["--model.init_args.cost_weight",
                                                                             str(cost_weight)]
    # the self-critical baseline (the reward of the router's own argmax budget) at the middle cost weight
    out["policy_reinforce_cw0.1_greedy"] = out["policy_reinforce_cw0.1"] + ["--model.init_args.baseline", "greedy"]
    # pseudo-labels from each budget's answer NLL instead of its 0/1 exact match (fewer ties at budget 0)
    out["policy_pseudo_nll"] = out["policy_pseudo"] + ["--model.init_args.reward", "nll"]
    return out


TASK_COLUMNS = ["spatial", "read", "count"]  # the tasks the budgets change (background and large: ~100 everywhere)
FRACTION_COLUMNS = ["easy", "hard", "spatial"]  # a policy's budget mix in the main table: per difficulty, and for the
#                                                  task that gains most from a larger budget
FRACTION_GROUPS = ["easy", "hard", *TASKS]  # ... and in the CSV and the per-task table


def _fractions(values) -> str:
    """Budget fractions as 'f0 / f1 / f2' (the CSV and table cell)."""
    return " / ".join("-" if x is None else f"{x:.2f}" for x in values)


def collect(names, seed: int = 0) -> list:
    """One record per (row, budget or operating point) of `names` fitted at `seed` on this machine
    (keys: the CSV's columns)."""
    records = []
    for name in names:
        logdir = run_logdir(seed_group(GROUP, seed), name)
        if not (logdir / "DONE").exists():
            continue
        s = {k: v.value for k, v in latest_scalars(str(logdir)).items()}
        if name.startswith(("universal", "fixed")):
            budgets = range(N_BUDGETS) if name.startswith("universal") else [int(name[len("fixed"):])]
            for k in budgets:
                records.append({"row": name, "budget": k, "seed": seed, "acc": s.get(f"val/acc@budget={k}"),
                                "easy": s.get(f"val/acc/easy@budget={k}"), "hard": s.get(f"val/acc/hard@budget={k}"),
                                "gflops": s.get(f"val/gflops@budget={k}"),
                                **{t: s.get(f"val/acc/{t}@budget={k}") for t in TASK_COLUMNS}})
        else:
            rec = {"row": name, "budget": "policy", "seed": seed, "acc": s.get("val/acc"), "easy": s.get("val/acc/easy"),
                   "hard": s.get("val/acc/hard"), "gflops": s.get("val/gflops"),
                   **{t: s.get(f"val/acc/{t}") for t in TASK_COLUMNS}}
            for g in FRACTION_GROUPS:
                rec[f"frac_{g}"] = _fractions([s.get(f"val/budget_frac/{g}/{k}") for k in range(N_BUDGETS)])
            records.append(rec)
    return records


COLUMNS = ["row", "budget", "seed", "acc", "easy", "hard", *TASK_COLUMNS, "gflops", *(f"frac_{g}" for g in FRACTION_GROUPS),
           "vs_universal", "vs_fixed", "base"]


def interpolate(points, x):
    """Linear interpolation of the curve through `points` [(x, y), ...] at x; None outside its range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1] if len(pts) == 1 and abs(pts[0][0] - x) < 1e-9 else None


def curve_points(records: list, match, scale: float = 1.0) -> list:
    """[(gflops, scale x acc), ...] of the measured records whose row name satisfies `match`."""
    return [(r["gflops"], scale * r["acc"]) for r in records
            if match(r["row"]) and r["acc"] is not None and r["gflops"] is not None]


def curve_gaps(records: list) -> None:
    """Adds to each policy record its accuracy minus the accuracy, at its mean GFLOPs, of the curve
    interpolated between the universal model's budgets (`vs_universal`: what the router's choices add
    on the same weights) and between the models trained at one budget (`vs_fixed`: the issue's target),
    both of the policy's own seed."""
    for r in records:
        if not r["row"].startswith("policy") or r["acc"] is None or r["gflops"] is None:
            continue
        same_seed = [x for x in records if x.get("seed", 0) == r.get("seed", 0)]
        curves = {"vs_universal": curve_points(same_seed, lambda row: row == "universal"),
                  "vs_fixed": curve_points(same_seed, lambda row: row.startswith("fixed"))}
        for column, curve in curves.items():
            at = interpolate(curve, r["gflops"]) if curve else None
            r[column] = None if at is None else r["acc"] - at


def write(records: list, out_dir: Path, base: str) -> str:
    """Writes budgets.{md,csv,png} from `records` (measured on base `base`) and the committed rows
    of the same base that were not measured now (experiments/tables/committed_rows.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = merge_committed(records, out_dir / "budgets.csv", ["row", "budget", "seed"], base)
    rank = {name: i for i, name in enumerate(rows())}  # rows in table order, each row's seeds ascending
    records.sort(key=lambda r: (rank.get(r["row"], len(rank)), r["seed"]))
    curve_gaps(records)
    gap = lambda v: "" if v is None else f"{100 * v:+.1f}"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Accuracy in % (final validation); LLM GFLOPs per sample {CONVENTION}; budgets chosen: the "
             "router's fraction of samples at budget 0 / 1 / 2; curve gaps in accuracy points.", "",
             "| row | budget | seed | acc | easy | hard | spatial | read | count | LLM GFLOPs | budgets chosen (easy) | "
             "budgets chosen (hard) | budgets chosen (spatial) | acc vs universal curve | acc vs fixed curve |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    with open(out_dir / "budgets.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in records:
            g = "-" if r["gflops"] is None else f"{r['gflops']:.3f}"
            tasks = " | ".join(pct(r.get(t)) for t in TASK_COLUMNS)
            lines.append(f"| {r['row']} | {r['budget']} | {r['seed']} | {pct(r['acc'])} | {pct(r['easy'])} | "
                         f"{pct(r['hard'])} | {tasks} | {g} | " + " | ".join(r.get(f"frac_{x}") or "" for x in FRACTION_COLUMNS)
                         + f" | {gap(r.get('vs_universal'))} | {gap(r.get('vs_fixed'))} |")
            w.writerow([r.get(c) for c in COLUMNS])
    seed0 = [r for r in records if r["seed"] == 0]
    curve = curve_points(seed0, lambda row: row == "universal", 100)
    sandwich = curve_points(seed0, lambda row: row == "universal_sandwich", 100)
    distill = curve_points(seed0, lambda row: row == "universal_sandwich_distill", 100)
    fixed = curve_points(seed0, lambda row: row.startswith("fixed"), 100)
    points = {r["row"]: (r["gflops"], 100 * r["acc"]) for r in seed0
              if r["row"].startswith("policy") and r["acc"] is not None}
    if curve or fixed or points:
        xy_chart({"universal (every budget)": curve, "universal, sandwich (same compute)": sandwich,
                  "sandwich + in-place distillation": distill, "trained at one budget": fixed}, points,
                 title="accuracy vs LLM GFLOPs per sample", xlabel="LLM GFLOPs per sample",
                 ylabel="accuracy %").save(out_dir / "budgets.png")
    text = "\n".join(lines + seed_summary(records) + budget_gains(records) + router_mix(records)) + "\n"
    (out_dir / "budgets.md").write_text(text)
    return text


def _by(records: list) -> Dict[tuple, dict]:
    """(row, budget, seed) -> record."""
    return {(r["row"], r["budget"], r["seed"]): r for r in records}


def seed_summary(records: list) -> List[str]:
    """Markdown lines: each universal row at each budget minus the model trained at that budget
    alone, paired by seed (hard accuracy and accuracy), as mean [min, max] over the seeds both have."""
    by, lines = _by(records), []
    for name in [n for n in rows() if n.startswith("universal")]:
        for k in range(N_BUDGETS):
            pairs = [(r, by[(f"fixed{k}", k, r["seed"])]) for r in records if r["row"] == name and r["budget"] == k
                     and (f"fixed{k}", k, r["seed"]) in by and r["hard"] is not None]
            if pairs:
                seeds = ", ".join(str(r["seed"]) for r, _ in pairs)
                lines.append(f"| {name} | {k} | {seeds} | {mean_range([r['hard'] - f['hard'] for r, f in pairs], '+')} | "
                             f"{mean_range([r['acc'] - f['acc'] for r, f in pairs], '+')} |")
    if not lines:
        return []
    return ["", "Universal vs one-budget training, paired by seed: the universal row's accuracy minus that of the "
            "model trained at the same budget only (fixed<k>), same seed; mean [min, max] in points over the seeds.",
            "", "| row | budget | seeds | hard | acc |", "|---|---|---|---|---|", *lines]


def budget_gains(records: list) -> List[str]:
    """Markdown lines: what budgets 1 and 2 add over budget 0, per task, within one model (universal)
    or across the one-budget models of one seed (fixed), as mean [min, max] over seeds."""
    by, lines = _by(records), []
    columns = ["easy", "hard", *TASK_COLUMNS]
    for label, at in (("fixed", lambda k, seed: by.get((f"fixed{k}", k, seed))),
                      ("universal", lambda k, seed: by.get(("universal", k, seed)))):
        seeds = sorted({r["seed"] for r in records})
        for k in range(1, N_BUDGETS):
            pairs = [(at(k, s), at(0, s)) for s in seeds if at(k, s) and at(0, s)]
            pairs = [(a, b) for a, b in pairs if all(a.get(c) is not None and b.get(c) is not None for c in columns)]
            if pairs:
                cells = " | ".join(mean_range([a[c] - b[c] for a, b in pairs], '+') for c in columns)
                used = ", ".join(str(a["seed"]) for a, _ in pairs)
                lines.append(f"| {label} | 0 -> {k} | {used} | {cells} |")
    if not lines:
        return []
    return ["", "What a larger budget adds, per task: accuracy at budget k minus at budget 0 (fixed: the models trained "
            "at one budget, of one seed; universal: one model at both budgets); mean [min, max] in points over seeds.",
            "", f"| models | budgets | seeds | {' | '.join(columns)} |", "|---|---|---|" + "---|" * len(columns), *lines]


def router_mix(records: list) -> List[str]:
    """Markdown lines: each router's fraction of samples at budget 0 / 1 / 2, per task."""
    policy = [r for r in records if r["budget"] == "policy" and any(r.get(f"frac_{t}") for t in TASKS)]
    if not policy:
        return []
    lines = [f"| {r['row']} | {r['seed']} | " + " | ".join(r.get(f"frac_{t}") or "-" for t in TASKS) + " |"
             for r in policy]
    return ["", "The routers' budget mix per task: the fraction of validation samples given budget 0 / 1 / 2.", "",
            f"| row | seed | {' | '.join(TASKS)} |", "|---|---|" + "---|" * len(TASKS), *lines]


def main() -> None:
    args, names = parse_row_args(__doc__, rows(), seed=True)
    table = rows(args.seed)
    if not args.table_only:
        for name in names:
            run_fit(seed_group(GROUP, args.seed), name, table[name], args.steps)
    records = [r for seed in fitted_seeds(GROUP) for r in collect(table, seed)]
    print(write(records, ROOT / "experiments" / "results", weights_fingerprint()))


if __name__ == "__main__":
    main()
