"""Print the latest TensorBoard scalars of a run: python experiments/tables/tb_scalars.py outputs/base/run [tag-prefix]"""
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def latest_scalars(logdir: str, prefix: str = "") -> dict:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1] for tag in acc.Tags()["scalars"] if tag.startswith(prefix)}


def scalar_values(logdir: str, tag: str) -> list:
    """Every logged value of one scalar, in step order ([] if the run never logged it)."""
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


if __name__ == "__main__":
    for tag, ev in sorted(latest_scalars(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "").items()):
        print(f"{tag:40s} step {ev.step:6d}  {ev.value:.4f}")
