"""experiments/tables/headline_table.py: one line per row and seed, committed seeds kept."""
from experiments.tables.headline_table import write
from experiments.tables.runs import seed_group


def _record(row, seed, hard):
    return dict(row=row, what=row, seed=seed, easy=0.5, hard=hard, read=None, count=None,
                llm_gflops=0.8 if row == "full" else 0.2)


def _lines(out):
    """(row, seed, hard) of the per-seed table (the first one)."""
    first = (out / "headline.md").read_text().split("\n\n")[1]
    return [tuple(c.strip() for c in line.split("|")[1:6:2]) for line in first.splitlines()
            if line.startswith(("| full", "| visor"))]


def test_each_seed_is_a_line_and_a_rewrite_keeps_the_other_seeds(tmp_path):
    write([_record("visor", 1, 0.9), _record("full", 0, 0.95), _record("visor", 0, 0.92)], tmp_path, "b1")
    assert _lines(tmp_path) == [("full", "0", "95.0"), ("visor", "0", "92.0"), ("visor", "1", "90.0")]
    # seed 1 of visor measured again: it replaces that line only; the other seeds stay (same base)
    write([_record("visor", 1, 0.8)], tmp_path, "b1")
    assert [l[2] for l in _lines(tmp_path)] == ["95.0", "92.0", "80.0"]
    assert "| visor | visor | 1 |" in (tmp_path / "headline.md").read_text()
    assert seed_group("table", 0) == "table" and seed_group("table", 2) == "table_seed2"


def test_rows_at_several_seeds_get_mean_and_range_and_the_paired_gap_to_full(tmp_path):
    write([_record("full", 0, 0.96), _record("full", 1, 0.98), _record("visor", 0, 0.93), _record("visor", 1, 0.94),
           _record("visor", 2, 0.90)], tmp_path, "b1")
    summary = (tmp_path / "headline.md").read_text().split("Across seeds")[1]
    assert "| full | 0, 1 | 50.0 [50.0, 50.0] | 97.0 [96.0, 98.0] | - |" in summary
    # seeds 0 and 1 are paired with full's (-3.0, -4.0); seed 2 has no full fit at that seed
    assert "| visor | 0, 1, 2 | 50.0 [50.0, 50.0] | 92.3 [90.0, 94.0] | -3.5 [-4.0, -3.0] |" in summary
