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
