"""Recount the committed result tables' LLM GFLOPs under the FLOPs convention in src/flops.py.

    python experiments/tables/reflop.py [--check]

A row's LLM GFLOPs per validation sample depends on its plan, budget and token reduction and on
the validation split's text lengths, not on its trained weights, so the tables
(experiments/results/{headline,budgets,foundation}) can be recounted without refitting. For each
row this builds the row's model through LightningCLI (the arguments its fit used) and counts
every validation sample twice: under the convention the row was logged with (a causal attention
square counted whole) and under the current one (counted half). The old count must reproduce the
committed value (relative 1e-6): the proof that the recount sees the same samples, plan and
budget. Then the current count replaces it and each table is rewritten by its own writer (savings
and the budget report's curve gaps follow).

A router row (`policy*`) logged the mean over samples of each one's chosen budget, and which
sample got which budget is not in the table. In the committed rows the router gives nearly each
task one budget (the budget histograms read 0.00 / 1.00 per group), so the recount takes the task
-> budget assignment nearest the committed value and explains the rest as m samples moved one
budget up (or down): m must come out an integer (within 0.02) and small (at most 1% of the
samples), else it stops. Those m samples' lengths are unknown, so the new value is the midpoint of
the range their lengths allow, and the range is printed (far below the tables' 3 decimals).

`--check` only verifies and prints, writing nothing.
"""
from __future__ import annotations

import argparse
import collections
import csv
import itertools
import sys
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import src.flops as flops_module  # noqa: E402
from experiments.tables import budget_report, foundation_table, headline_table  # noqa: E402
from experiments.tables.committed_rows import read_rows, weights_fingerprint  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
UNIVERSAL = budget_report.UNIVERSAL
TOLERANCE = 1e-6


def _cli_model(args: List[str]):
    from src.cli import main
    return main(args + ["--data.num_workers", "0"], run=False)


def validation_samples() -> Dict[Tuple[str, int], int]:
    """(task, text tokens) -> how many validation samples, as the fits' validation saw them."""
    cli = _cli_model(["--config", "configs/visor.yaml"])
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("validate")
    counts = collections.Counter()
    for batch in dm.val_dataloader():
        lengths = (batch["input_ids"] != dm.tokenizer.pad_id).sum(1).tolist()
        counts.update(zip(batch["task"], lengths))
    return dict(counts)


def _whole_square(c, n_q, n_k, causal=False):
    return CURRENT_ATTENTION(c, n_q, n_k, False)


CURRENT_ATTENTION = flops_module.attention_flops


def per_task_gflops(lvlm, samples: Dict[Tuple[str, int], int]) -> Dict[str, Dict[int, Dict[str, float]]]:
    """convention ('old' | 'new') -> budget -> task -> summed LLM GFLOPs over that task's samples."""
    out = {}
    for convention, attention in (("old", _whole_square), ("new", CURRENT_ATTENTION)):
        flops_module.attention_flops = attention
        try:
            out[convention] = {k: _by_task(lvlm, k, samples) for k in range(lvlm.plan.n_budgets)}
        finally:
            flops_module.attention_flops = CURRENT_ATTENTION
    return out


def _by_task(lvlm, budget: int, samples) -> Dict[str, float]:
    sums = collections.defaultdict(float)
    for (task, length), n in samples.items():
        sums[task] += n * flops_module.sample_flops(lvlm, length, budget).llm / 1e9
    return dict(sums)


class Recount:
    """Old and new GFLOPs per sample of a (configuration, budget), cached per configuration."""

    def __init__(self, samples):
        self.samples = samples
        self.n = sum(samples.values())
        self.tasks = sorted({t for t, _ in samples})
        self._cache = {}
        self._models = {}

    def sums(self, args: List[str]):
        key = tuple(args)
        if key not in self._cache:
            self._cache[key] = per_task_gflops(self.model(args), self.samples)
        return self._cache[key]

    def model(self, args: List[str]):
        """The row's VisorLVLM, built once per configuration."""
        if tuple(args) not in self._models:
            self._models[tuple(args)] = _cli_model(args).model.lvlm
        return self._models[tuple(args)]

    def fixed(self, args: List[str], budget: int) -> Tuple[float, float]:
        s = self.sums(args)
        return tuple(sum(s[c][budget].values()) / self.n for c in ("old", "new"))

    def routed(self, args: List[str], committed: float, row: str) -> Tuple[float, float]:
        """The (old, new) mean GFLOPs of the routing that reproduces `committed` (module docstring)."""
        s = self.sums(args)
        budgets = sorted(s["old"])
        mean = {c: lambda choice, c=c: sum(s[c][k][t] for t, k in zip(self.tasks, choice)) / self.n
                for c in ("old", "new")}
        choice = min(itertools.product(budgets, repeat=len(self.tasks)), key=lambda ch: abs(mean["old"](ch) - committed))
        residual = committed - mean["old"](choice)
        assignment = dict(zip(self.tasks, choice))
        if abs(residual) <= TOLERANCE * committed:
            print(f"  {row}: budgets per task {assignment}")
            return mean["old"](choice), mean["new"](choice)
        # one budget step for a sample of any length: old and new FLOPs per sample, smallest and largest
        steps = {c: [self._one_sample(args, c, length, k + 1) - self._one_sample(args, c, length, k)
                     for (_, length) in self.samples for k in budgets[:-1]] for c in ("old", "new")}
        moved = residual * self.n / (sum(steps["old"]) / len(steps["old"]))
        m = round(moved)
        lo_old, hi_old = sorted((m * min(steps["old"]), m * max(steps["old"])))
        if m == 0 or abs(moved - m) > 0.02 or abs(m) > self.n / 100 or not lo_old <= residual * self.n <= hi_old:
            raise SystemExit(f"{row}: no task -> budget assignment reproduces the committed {committed:.6f} GFLOPs "
                             f"(nearest {assignment}, {moved:+.2f} samples off); recount it by refitting the row")
        lo, hi = sorted((m * min(steps["new"]), m * max(steps["new"])))
        base = mean["new"](choice)
        print(f"  {row}: budgets per task {assignment}, {m:+d} sample(s) one budget {'up' if m > 0 else 'down'} "
              f"({moved:+.3f}); new value in [{base + lo / self.n:.6f}, {base + hi / self.n:.6f}]")
        # the old value m moved samples of the mean length give: _check compares it with the committed one
        return mean["old"](choice) + m * sum(steps["old"]) / len(steps["old"]) / self.n, base + (lo + hi) / 2 / self.n

    def _one_sample(self, args: List[str], convention: str, length: int, budget: int) -> float:
        """GFLOPs of one sample of `length` text tokens at `budget` under `convention`."""
        key = (tuple(args), convention, length, budget)
        if key not in self._cache:
            lvlm = self.model(args)
            flops_module.attention_flops = CURRENT_ATTENTION if convention == "new" else _whole_square
            try:
                self._cache[key] = flops_module.sample_flops(lvlm, length, budget).llm / 1e9
            finally:
                flops_module.attention_flops = CURRENT_ATTENTION
        return self._cache[key]


def _check(row: str, committed: float, old: float, new: float) -> None:
    ok = abs(old - committed) <= TOLERANCE * committed
    print(f"  {row:32s} committed {committed:.6f}  recounted old {old:.6f} {'ok' if ok else 'MISMATCH'}  -> new {new:.6f}")
    if not ok:
        raise SystemExit(f"{row}: the recount does not reproduce the committed value; nothing written")


def _headline_args(row: str) -> Tuple[List[str], object]:
    """(fit arguments, budget index or 'routed') of a headline.csv row."""
    if row in headline_table.FITS:
        return headline_table.FITS[row][1], 0
    if row.startswith(("universal@", "fixed@")):
        return UNIVERSAL, int(row.split("@")[1])
    if row.startswith("policy"):
        return UNIVERSAL, "routed"
    raise SystemExit(f"headline.csv row {row!r}: no known configuration")


def _budgets_args(row: str, budget) -> Tuple[List[str], object]:
    if row.startswith("policy"):
        return UNIVERSAL, "routed"
    return UNIVERSAL, int(budget)


def recount_table(name: str, column: str, locate, recount: Recount) -> List[dict]:
    """The rows of results/<name>.csv with `column` recounted ([] when its table's header already
    states the current convention: nothing to recount)."""
    rows = read_rows(RESULTS / f"{name}.csv")
    if flops_module.CONVENTION in (RESULTS / f"{name}.md").read_text():
        print(f"{name}: already counted {flops_module.CONVENTION}")
        return []
    print(f"{name}.csv ({len(rows)} rows)")
    for r in rows:
        if r.get(column) is None:
            continue
        args, budget = locate(r)
        committed = float(r[column])
        label = f"{r['row']}" + (f" @ {r['budget']}" if "budget" in r else "")
        old, new = (recount.routed(args, committed, label) if budget == "routed" else recount.fixed(args, budget))
        _check(label, committed, old, new)
        r[column] = new
    return rows


def _write_csv(name: str, rows: List[dict]) -> None:
    path = RESULTS / f"{name}.csv"
    with open(path, newline="") as f:
        columns = next(csv.reader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="verify and print; write nothing")
    args = parser.parse_args()
    samples = validation_samples()
    print(f"validation: {sum(samples.values())} samples, tasks {sorted({t for t, _ in samples})}")
    recount = Recount(samples)
    tables = {
        "headline": recount_table("headline", "llm_gflops", lambda r: _headline_args(r["row"]), recount),
        "budgets": recount_table("budgets", "gflops", lambda r: _budgets_args(r["row"], r["budget"]), recount),
        "foundation": recount_table("foundation", "llm_gflops",
                                    lambda r: (foundation_table.ROWS[r["row"]], 0), recount),
    }
    if args.check:
        return
    base = weights_fingerprint()
    writers = {"headline": lambda: headline_table.write([], RESULTS, base),
               "budgets": lambda: budget_report.write([], RESULTS, base),
               "foundation": lambda: foundation_table.write_table({}, RESULTS, base)}
    for name, rows in tables.items():
        if rows:
            _write_csv(name, rows)
            writers[name]()
            print(f"rewrote {name}.{{csv,md}}")


if __name__ == "__main__":
    main()
