"""visor_offline(_mc): the project's own metrics (exact match, per task, per difficulty) in lmms-eval."""
import ast

TASKS = ("background", "large", "spatial", "read", "count")


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def _breakdown(doc, correct: float) -> dict:
    """`acc` for all, `acc_<task>` / `acc_<difficulty>` only for the sample's own (None elsewhere,
    left out by `mean_present`)."""
    out = {"acc": correct}
    out.update({f"acc_{t}": correct if doc["task"] == t else None for t in TASKS})
    out.update({f"acc_{d}": correct if doc["difficulty"] == d else None for d in ("easy", "hard")})
    return out


def process_results(doc, results):
    """Generation: the answer exactly, after stripping whitespace."""
    return _breakdown(doc, float(results[0].strip() == doc["answer"].strip()))


def process_choice_results(doc, results):
    """Multiple choice: results are (loss, greedy) per choice (the plugin returns the NLL, as
    lmms-eval's own models do); the prediction is the choice of least loss."""
    losses = [_loss(r) for r in results]
    assert len(losses) == len(doc["choices"]), (len(losses), doc["choices"])
    return _breakdown(doc, float(losses.index(min(losses)) == doc["label"]))


def _loss(result) -> float:
    """A loglikelihood result's loss. lmms-eval 0.7.3 hands it over as the text of the (loss, greedy)
    tuple (evaluator.py passes every model output through `unwrap_generation_output`, which
    stringifies what is not text), so its own multiple_choice scoring misreads it; parse either."""
    if isinstance(result, str):
        result = ast.literal_eval(result)
    return float(result[0])


def mean_present(items):
    """The mean of the values that are not None (NaN when there are none)."""
    present = [x for x in items if x is not None]
    return sum(present) / len(present) if present else float("nan")
