"""visor_offline: the project's own metrics (exact match, per task, per difficulty) in lmms-eval."""
TASKS = ("background", "large", "spatial", "read", "count")


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    """Every metric per sample: `acc` for all, `acc_<task>` / `acc_<difficulty>` only for the
    sample's own (None elsewhere, left out by `mean_present`)."""
    correct = float(results[0].strip() == doc["answer"].strip())
    out = {"acc": correct}
    out.update({f"acc_{t}": correct if doc["task"] == t else None for t in TASKS})
    out.update({f"acc_{d}": correct if doc["difficulty"] == d else None for d in ("easy", "hard")})
    return out


def mean_present(items):
    """The mean of the values that are not None (NaN when there are none)."""
    present = [x for x in items if x is not None]
    return sum(present) / len(present) if present else float("nan")
