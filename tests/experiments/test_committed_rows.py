"""Table rewrites keep rows measured earlier on the same base (experiments/tables/committed_rows.py)."""
import csv

from experiments.tables.committed_rows import merge_committed, weights_fingerprint, read_rows


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_rows_not_measured_now_are_kept_only_for_the_same_base(tmp_path, capsys):
    path = tmp_path / "t.csv"
    _write(path, [dict(row="full", acc=0.5, note="", base="aaa"),
                  dict(row="pool2", acc=0.25, note="x", base="aaa"),
                  dict(row="pool4", acc=0.125, note="", base="bbb")])
    measured = [dict(row="full", acc=0.75, note="new")]
    rows = merge_committed(measured, path, ["row"], "aaa", order=["pool4", "full", "pool2"])
    assert [(r["row"], r["acc"]) for r in rows] == [("full", 0.75), ("pool2", 0.25)]
    assert rows[0]["base"] == "aaa" and rows[1]["note"] == "x"
    assert "left out 1 measured on another base" in capsys.readouterr().out


def test_composite_keys_and_parsed_values(tmp_path):
    path = tmp_path / "t.csv"
    _write(path, [dict(row="universal", budget=0, acc=0.5, frac="", base="aaa"),
                  dict(row="universal", budget=1, acc=0.6, frac="", base="aaa"),
                  dict(row="policy", budget="policy", acc=0.7, frac="1.00 / 0.00", base="aaa")])
    assert read_rows(path)[2] == dict(row="policy", budget="policy", acc=0.7, frac="1.00 / 0.00", base="aaa")
    assert read_rows(path)[0]["budget"] == 0 and read_rows(path)[0]["frac"] is None
    rows = merge_committed([dict(row="universal", budget=1, acc=0.9)], path, ["row", "budget"], "aaa")
    assert [(r["row"], r["budget"], r["acc"]) for r in rows] == [
        ("universal", 1, 0.9), ("universal", 0, 0.5), ("policy", "policy", 0.7)]


def test_missing_table_and_fingerprint(tmp_path):
    assert merge_committed([dict(row="a")], tmp_path / "none.csv", ["row"], "b") == [dict(row="a", base="b")]
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    assert weights_fingerprint(weights) == "ba7816bf8f01"
