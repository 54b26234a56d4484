"""Faults, with real processes: a fit killed with SIGKILL between checkpoints and resumed from
last.ckpt ends with the weights and losses of the run that was never stopped (the data stream
resumes at its batch, mid-epoch); SIGTERM saves last.ckpt and exits with 143; a checkpoint write
that dies halfway leaves the previous checkpoint loadable; a sharded (FSDP2) universal fit on two
processes, stopped midway, resumes to the weights and losses of the uninterrupted one."""
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
# 20 images, one 6-turn sequence each, batches of 4: 5 batches an epoch, so step 6 is mid-epoch 2;
# two loader workers (one shard each), so the resumed stream is the workers' interleaved batches
DATA = ["--data.train_images", "20", "--data.val_images", "4", "--data.images_per_shard", "10",
        "--data.num_workers", "2", "--data.batch_size", "4", "--data.val_batch_size", "8"]
STEPS = 8


@pytest.fixture
def fit(cli_process):
    """A fit as a process of its own: `run` below."""
    def run(tmp_path, name, *extra_callbacks, ckpt_path=None, configs=(), args=(), data=DATA, every=3):
        """configs/visor.yaml for STEPS steps (stage 2 from step 4), a checkpoint every `every` steps into
        tmp_path/ckpt, the final weights into tmp_path/<name> -> the finished process. configs: deltas
        stacked on visor.yaml (before this test's own), args: more overrides, data: the data overrides."""
        callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": every,
                                    "save_top_k": 0}},
                     {"class_path": "tests.ddp_record.Record", "init_args": {"out": str(tmp_path / name)}},
                     *extra_callbacks]
        tmp_path.mkdir(parents=True, exist_ok=True)
        delta = tmp_path / f"{name}.yaml"
        delta.write_text(yaml.safe_dump({"trainer": {
            "callbacks": callbacks, "max_steps": STEPS, "val_check_interval": 100, "limit_val_batches": 0,
            "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "logs"), "name": name}}}}))
        stack = [a for c in ("visor.yaml", *configs) for a in ("--config", str(ROOT / "configs" / c))]
        cmd = ["fit", *stack, "--config", str(delta),
               "--model.base_checkpoint", str(ROOT / "checkpoints/base"), "--model.new_params_only_steps", "4",
               "--model.warmup_steps", "2", "--data.root", str(tmp_path / "data"), *data, *args,
               *(["--ckpt_path", str(ckpt_path)] if ckpt_path else [])]
        return cli_process(*cmd, cwd=tmp_path)
    return run


def _losses(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for run in sorted(logdir.glob("version_*")):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars("train/loss")} if "train/loss" in acc.Tags()["scalars"] else {})
    return out


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = torch.load(a / "rank0_weights.pt"), torch.load(b / "rank0_weights.pt")
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def test_killed_and_terminated_fits_resume_to_the_uninterrupted_result(tmp_path, fit):
    whole = fit(tmp_path / "whole", "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "killed"
    killed = fit(run, "killed", {"class_path": "tests.ddp_record.SignalAt", "init_args": {"step": 7, "signal": "SIGKILL"}})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert torch.load(run / "ckpt/last.ckpt", weights_only=False)["global_step"] == 6  # the step-6 checkpoint
    resumed = fit(run, "resumed", ckpt_path=run / "ckpt/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    diff = _max_diff(tmp_path / "whole/whole", run / "resumed")
    print(f"SIGKILL at step 7, resumed from step 6: max abs weight difference {diff:.3g}")
    assert diff == 0.0
    want, got = _losses(tmp_path / "whole/logs/whole"), _losses(run / "logs/resumed")
    assert set(got) == {6, 7}  # steps 7 and 8 (0-based 6, 7) were trained again
    assert all(got[s] == want[s] for s in got), (got, want)

    run = tmp_path / "terminated"
    stopped = fit(run, "stopped", {"class_path": "tests.ddp_record.SignalAt", "init_args": {"step": 5, "signal": "SIGTERM"}})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "resume with the same command and --ckpt_path" in stopped.stderr + stopped.stdout
    assert torch.load(run / "ckpt/last.ckpt", weights_only=False)["global_step"] == 5  # saved at SIGTERM, not step 3
    resumed = fit(run, "resumed", ckpt_path=run / "ckpt/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _max_diff(tmp_path / "whole/whole", run / "resumed") == 0.0


# two ranks, 4 shards of 5 images: each rank reads 2 shards (3 batches an epoch), one per loader worker
SHARDED_DATA = DATA[:DATA.index("--data.images_per_shard")] + ["--data.images_per_shard", "5"] + \
    DATA[DATA.index("--data.images_per_shard") + 2:]
SHARDED = dict(configs=("universal.yaml", "strategy/fsdp.yaml"), args=("--trainer.accelerator", "cpu", "--trainer.devices", "2"),
               data=SHARDED_DATA, every=2)


@pytest.mark.slow  # three fits on two processes: about 100 s
def test_a_sharded_universal_fit_stopped_midway_resumes_to_the_uninterrupted_result(tmp_path, fit):
    """FSDP2 over two gloo processes, a budget drawn per step, stage 2 from step 4: stopped on both
    ranks after step 5 (a rank killed alone leaves the other waiting in a collective: a cluster
    restarts the whole job), resumed from the step-4 last.ckpt, mid-epoch (sharded parameters and
    optimizer state saved whole, re-sharded on load) with the same max_steps (the LR schedule
    depends on it)."""
    def sharded_fit(run, name, *callbacks, ckpt_path=None):
        out = fit(run, name, *callbacks, ckpt_path=ckpt_path, **SHARDED)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    sharded_fit(tmp_path / "whole", "whole")
    run = tmp_path / "stopped"
    sharded_fit(run, "stopped", {"class_path": "tests.ddp_record.StopAt", "init_args": {"step": 5}})
    assert torch.load(run / "ckpt/last.ckpt", weights_only=False)["global_step"] == 4
    sharded_fit(run, "resumed", ckpt_path=run / "ckpt/last.ckpt")
    diff = _max_diff(tmp_path / "whole/whole", run / "resumed")
    print(f"sharded, stopped after step 5, resumed from step 4: max abs weight difference {diff:.3g}")
    assert diff == 0.0
    ranks = [torch.load(run / f"resumed/rank{r}_weights.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    want, got = _losses(tmp_path / "whole/logs/whole"), _losses(run / "logs/resumed")
    assert set(got) == {4, 5, 6, 7}  # steps 5..8 (0-based 4..7) trained again
    assert all(got[s] == want[s] for s in got), (got, want)


def test_a_checkpoint_write_that_dies_leaves_the_previous_one(tmp_path):
    from src.lit.faults import AtomicCheckpointIO

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed halfway through the write")

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="halfway"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["step"] == 1
