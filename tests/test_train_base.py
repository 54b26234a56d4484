"""experiments/train_base.sh: the resumable stage-by-stage base training runner."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments/train_base.sh"
TINY = ["--trainer.fast_dev_run", "2", "--data.train_images", "40", "--data.val_images", "8",
        "--data.images_per_shard", "20", "--data.num_workers", "0", "--data.batch_size", "4",
        "--data.val_batch_size", "8",
        "--model.lvlm.init_args.vision.init_args.weights_path", str(ROOT / "checkpoints/encoder/model.safetensors")]


def _run(cwd, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_chains_stages_then_skips_finished_ones(tmp_path):
    """Stage 2 starts from stage 1's export (its config's base_checkpoint, relative to the working
    directory); a second run finds both exports and trains nothing."""
    (tmp_path / "configs").mkdir()
    for name in ("base_restated", "base_restated_stage2"):
        (tmp_path / f"configs/{name}.yaml").write_text((ROOT / f"configs/{name}.yaml").read_text())
    stages = ["configs/base_restated.yaml", "configs/base_restated_stage2.yaml"]
    first = _run(tmp_path, *stages, "--", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("from the start") == 2 and "done" in first.stdout
    for name in ("base_restated", "base_restated_stage2"):
        assert (tmp_path / f"outputs/{name}/export/model.safetensors").exists()
    again = _run(tmp_path, *stages, "--", *TINY)
    assert again.returncode == 0 and again.stdout.count("exists, skipped") == 2 and "from the start" not in again.stdout


def test_bad_arguments_are_named(tmp_path):
    usage = _run(tmp_path)
    assert usage.returncode == 2 and "usage" in usage.stderr
    missing = _run(tmp_path, "configs/nope.yaml")
    assert missing.returncode == 2 and "no such config: configs/nope.yaml" in missing.stderr
