"""Rows measured in an earlier session survive a table rewrite.

The row runners rebuild their tables from the TensorBoard runs under outputs/, which is not
committed: on a fresh clone, rerunning one row would otherwise drop every other row of the
committed table. `merge_committed` keeps a committed CSV row that was not measured now, but only
when it was measured on the same shipped base (the `base` column: a fingerprint of
checkpoints/base/model.safetensors), so a new base never inherits numbers from an old one.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
BASE_WEIGHTS = ROOT / "checkpoints" / "base" / "model.safetensors"


def weights_fingerprint(weights: Path = BASE_WEIGHTS) -> str:
    """The first 12 hex digits of the sha256 of a weights file (default: the shipped base's)."""
    return hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]


def _parse(cell: str):
    """A CSV cell back to the value the writer put there: '' -> None, numbers -> int/float."""
    if cell in ("", "None"):
        return None
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def read_rows(csv_path: Path) -> List[Dict[str, object]]:
    """Every row of a table CSV as a dict of parsed values ([] when the file does not exist)."""
    if not Path(csv_path).exists():
        return []
    with open(csv_path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def merge_committed(measured: List[dict], csv_path: Path, key: Sequence[str], base: str,
                    order: Optional[Sequence] = None) -> List[dict]:
    """`measured` (each a dict with the CSV's columns, measured on base `base`) plus the rows of the
    committed `csv_path` that share `base` and whose `key` columns were not measured now.

    The result is sorted by `order` (a list of first key values; unknown ones go last, in their
    original order). Prints how many rows were kept and how many were left out for another base.
    """
    def key_of(row):
        return tuple(row.get(k) for k in key)

    for row in measured:
        row["base"] = base
    seen = {key_of(r) for r in measured}
    kept, other_base = [], 0
    for row in read_rows(csv_path):
        if key_of(row) in seen:
            continue
        if row.get("base") != base:
            other_base += 1
            continue
        kept.append(row)
    if kept or other_base:
        print(f"{Path(csv_path).name}: kept {len(kept)} committed row(s) measured earlier on base {base}"
              + (f"; left out {other_base} measured on another base" if other_base else ""), flush=True)
    rows = measured + kept
    if order is not None:
        rank = {name: i for i, name in enumerate(order)}
        rows = sorted(rows, key=lambda r: rank.get(r.get(key[0]), len(rank)))
    return rows
