"""experiments/tables/budget_report.py: a policy's operating point against the fixed-budget curves."""
import pytest

from experiments.tables.budget_report import curve_gaps, interpolate


def test_interpolate_is_linear_inside_the_curve_and_none_outside():
    curve = [(0.4, 0.9), (0.2, 0.8)]  # any order
    assert interpolate(curve, 0.3) == pytest.approx(0.85)
    assert interpolate(curve, 0.2) == pytest.approx(0.8)
    assert interpolate(curve, 0.5) is None and interpolate(curve, 0.1) is None


def test_policy_rows_get_their_gap_to_both_curves():
    records = [dict(row="universal", budget=0, acc=0.80, gflops=0.2), dict(row="universal", budget=2, acc=0.90, gflops=0.4),
               dict(row="fixed0", budget=0, acc=0.84, gflops=0.2), dict(row="fixed2", budget=2, acc=0.88, gflops=0.4),
               dict(row="policy_reinforce", budget="policy", acc=0.86, gflops=0.25),
               dict(row="policy_pseudo", budget="policy", acc=0.80, gflops=0.1)]  # cheaper than any budget
    curve_gaps(records)
    rl = records[4]
    assert rl["vs_universal"] == pytest.approx(0.86 - 0.825) and rl["vs_fixed"] == pytest.approx(0.86 - 0.85)
    assert records[5]["vs_universal"] is None and "vs_universal" not in records[0]


def test_a_seed_fits_every_row_in_its_own_folders_and_its_policy_reads_its_universal_export():
    from experiments.tables.budget_report import EXPORT, rows

    seed0, seed2 = rows(), rows(2)
    assert "--seed_everything" not in seed0["universal"] and "--trainer.callbacks.dirpath" not in seed0["universal"]
    policy0 = seed0["policy_reinforce"]
    assert policy0[policy0.index("--model.init_args.universal_checkpoint") + 1] == EXPORT
    for name, args in seed2.items():
        assert args[args.index("--seed_everything") + 1] == "2", name
        dirs = [a for a in args if a.startswith("outputs/")]
        assert dirs and all(d.startswith("outputs/budgets_seed2/") for d in dirs), (name, dirs)
    universal2 = seed2["universal"][seed2["universal"].index("--trainer.callbacks.dirpath") + 1]
    policy2 = seed2["policy_reinforce"]
    assert policy2[policy2.index("--model.init_args.universal_checkpoint") + 1] == universal2


def _rec(row, budget, seed, hard, acc=0.9, **tasks):
    return dict(row=row, budget=budget, seed=seed, hard=hard, acc=acc, easy=acc, gflops=0.2 + 0.1 * budget,
                **{t: tasks.get(t, hard) for t in ("spatial", "read", "count")})


def test_universal_gaps_are_paired_by_seed_and_budget_gains_per_task():
    from experiments.tables.budget_report import budget_gains, seed_summary

    records = [_rec("universal", 0, 0, 0.88), _rec("universal", 0, 1, 0.90), _rec("universal", 2, 0, 0.92),
               _rec("fixed0", 0, 0, 0.94, spatial=0.3), _rec("fixed0", 0, 1, 0.93, spatial=0.2),
               _rec("fixed2", 2, 0, 0.95, spatial=0.9), _rec("fixed2", 2, 2, 0.99)]  # seed 2: no universal
    lines = seed_summary(records)
    assert "| universal | 0 | 0, 1 | -4.5 [-6.0, -3.0] |" in "\n".join(lines)
    assert "| universal | 2 | 0 | -3.0 [-3.0, -3.0] |" in "\n".join(lines)
    gains = "\n".join(budget_gains(records))
    # fixed 0 -> 2 at seed 0 only (seed 1 has no fixed2): spatial +60, hard +1
    assert "| fixed | 0 -> 2 | 0 | +0.0 [+0.0, +0.0] | +1.0 [+1.0, +1.0] | +60.0 [+60.0, +60.0] |" in gains
    assert "| universal | 0 -> 2 | 0 | " in gains and "0 -> 1" not in gains
