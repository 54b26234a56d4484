"""One of lmms-eval's own tasks over a local copy of its data (no network): a task YAML that
includes the installed task (its prompt, generation settings, scoring) and reads the data from a
folder instead of the Hugging Face Hub.

    python -m src.eval.local_task --task docvqa_val --data /data/DocVQA          # -> src/eval/tasks/local/docvqa_val_local.yaml
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval eval --model visor --model_args checkpoint=... \
        --include_path src/eval/tasks/local --tasks docvqa_val_local

--data: the dataset repo's files as a folder (`huggingface-cli download lmms-lab-encoder/DocVQA
--repo-type dataset --local-dir /data/DocVQA` on a machine with network; a README.md whose
`configs:` name the parquet files, as on the Hub). --name: the dataset config (default: the task's
`dataset_name`). The task's `dataset_kwargs` (a Hub token, say) are dropped. The YAML includes the
installed task file by its absolute path: write it again after reinstalling lmms-eval elsewhere.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

DEFAULT_OUT = "src/eval/tasks/local"


def installed_task_yaml(task: str) -> Path:
    """The YAML file of the installed lmms-eval that defines `task: <task>`."""
    import lmms_eval

    pattern = re.compile(rf"^task:\s*[\"']?{re.escape(task)}[\"']?\s*$", re.MULTILINE)
    root = Path(lmms_eval.__file__).parent / "tasks"
    found = [p for p in sorted(root.rglob("*.yaml")) if pattern.search(p.read_text(errors="ignore"))]
    if not found:
        raise ValueError(f"--task {task}: no task of that name in {root} (the names `lmms_eval --tasks list` prints)")
    return found[0]


def write_local_task(task: str, data: str, name: Optional[str] = None, out: str = DEFAULT_OUT) -> Path:
    """-> the written <out>/<task>_local.yaml."""
    import yaml

    folder = Path(data).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {data} is not a folder (the dataset repo's files: README.md and its data files)")
    source = installed_task_yaml(task)
    lines = [f"# lmms-eval's {task} ({source.name}) on the local copy {folder}: written by python -m src.eval.local_task",
             f"include: {source}", f"task: {task}_local", f"dataset_path: {folder}"]
    if name is not None:
        lines.append(f"dataset_name: {yaml.safe_dump(name).strip()}")
    lines.append("dataset_kwargs: {}")
    path = Path(out) / f"{task}_local.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}: run it with --include_path {path.parent} --tasks {task}_local")
    return path


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="an lmms-eval task name, e.g. docvqa_val, chartqa, textvqa_val")
    ap.add_argument("--data", required=True, help="the local folder with the dataset repo's files")
    ap.add_argument("--name", default=None, help="the dataset config name (default: the task's own)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    return write_local_task(args.task, args.data, args.name, args.out)


if __name__ == "__main__":
    main()
