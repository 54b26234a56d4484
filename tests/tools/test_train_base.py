"""tools/train_base.sh: the resumable stage-by-stage base training runner."""
import os
import subprocess
import sys
from pathlib import Path

from tests.fit_args import ENCODER_FROM_REPO, ROOT, TINY_DATA

SCRIPT = ROOT / "tools/train_base.sh"
TINY = ["--trainer.fast_dev_run", "2", *TINY_DATA, *ENCODER_FROM_REPO]


def _run(cwd, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_chains_stages_then_skips_finished_ones(tmp_path):
    """Each later stage starts from the previous stage's export (its config's base_checkpoint,
    relative to the working directory); a second run finds every export and trains nothing."""
    (tmp_path / "configs").mkdir()
    names = ("base", "base_stage2", "base_stage3")
    for name in names:
        (tmp_path / f"configs/{name}.yaml").write_text((ROOT / f"configs/{name}.yaml").read_text())
    stages = [f"configs/{name}.yaml" for name in names]
    first = _run(tmp_path, *stages, "--", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("from the start") == 3 and "done" in first.stdout
    for name in names:
        assert (tmp_path / f"outputs/{name}/export/model.safetensors").exists()
    again = _run(tmp_path, *stages, "--", *TINY)
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == 3 and "from the start" not in again.stdout


def test_bad_arguments_are_named(tmp_path):
    usage = _run(tmp_path)
    assert usage.returncode == 2 and "usage" in usage.stderr
    missing = _run(tmp_path, "configs/nope.yaml")
    assert missing.returncode == 2 and "no such config: configs/nope.yaml" in missing.stderr
