"""Two real processes (DDP over gloo, CPU) through the command line: a fit that goes through both
training stages and validates must not hang, and must leave both ranks with the same weights; a
validate on two processes reports what one reports on the same data (each rank its share of the
images, metrics reduced across ranks)."""
import json
from pathlib import Path

import pytest
import torch

from tests.fit_args import TWO_RANK_DATA as DATA, on_cpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(cli_process, tmp_path):
    """run(*args, devices=2): a command on `devices` CPU processes (DDP for 2) on tiny data in
    tmp_path/data; asserts it succeeded -> its output."""
    def run(*args, devices=2, timeout=420):
        out = cli_process(*args, *on_cpu(devices, "ddp" if devices > 1 else None), "--data.root", tmp_path / "data",
                          *DATA, timeout=timeout)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr
    return run


def _metrics(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("universal", [False, True])
def test_ddp_fit_two_processes_stays_in_step(tmp_path, cli, universal):
    """Stage 1 (new parts only) for 2 steps, then stage 2, with a validation between (the ranks hold
    different numbers of validation batches); universal: a random budget per step, optional layers skipped."""
    out = tmp_path / "record"
    delta = ["--config", str(ROOT / "configs/universal.yaml")] if universal else []
    cli("fit", "--config", str(ROOT / "configs/visor.yaml"), *delta,
        "--model.base_checkpoint", str(ROOT / "checkpoints/base"), "--trainer.max_steps", "4",
        "--model.new_params_only_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.callbacks+=tests.ddp_record.Record", f"--trainer.callbacks.out={out}")
    w0, w1 = (torch.load(out / f"rank{r}_weights.pt") for r in (0, 1))
    assert w0.keys() == w1.keys()
    differ = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert not differ, differ[:10]  # every update averaged across ranks: stage 2's base parameters too
    from safetensors.torch import load_file
    base = load_file(str(ROOT / "checkpoints/base/model.safetensors"))
    moved = [k for k in base if k in w0 and not torch.equal(base[k].to(w0[k].dtype), w0[k])]
    assert any(k.startswith("decoder.layers.") for k in moved)  # stage 2 trained the base decoder
    assert _metrics(out / "rank0_metrics.json") == _metrics(out / "rank1_metrics.json")


def test_validate_on_two_processes_reports_what_one_does(tmp_path, cli):
    out1, out2 = tmp_path / "one", tmp_path / "two"
    args = ["validate", "--config", str(ROOT / "configs/visor.yaml"), "--model.base_checkpoint",
            str(ROOT / "checkpoints/base"), "--trainer.callbacks+=tests.ddp_record.Record"]
    cli(*args, f"--trainer.callbacks.out={out1}", devices=1)
    cli(*args, f"--trainer.callbacks.out={out2}", devices=2)
    one, two = _metrics(out1 / "rank0_metrics.json"), _metrics(out2 / "rank0_metrics.json")
    assert two == _metrics(out2 / "rank1_metrics.json")
    assert {k for k in one if k.startswith("val/acc")} == {k for k in two if k.startswith("val/acc")}
    for k, v in one.items():
        assert two[k] == pytest.approx(v, abs=1e-6 if k.startswith("val/acc") or "gflops" in k else 1e-4), k


def test_policy_validate_on_two_processes_reports_what_one_does(tmp_path, cli, monkeypatch):
    """The policy stage's epoch statistics (GFLOPs, budget mix per task, reward) are gathered from
    every rank (src.lit.distributed.gather_lists): 2 processes report what 1 does. The router: a
    2-step fit (its feature statistics learnt), then random weights, so that its choices vary."""
    from src.cli import main
    from src.lit.checkpoint_io import export_checkpoint
    from src.models import DecoderConfig, LayerPlan, VisionEncoder, VisorLVLM

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    universal = VisorLVLM(VisionEncoder("lcnet_075", 2, 128, pos_embed="sincos", feature_norm=True),
                          DecoderConfig(preset="tiny"), LayerPlan(6, self_layers=[0, 2, 4], optional_self=[2, 4],
                                                                  cross_layers=[1, 5], skip_kind="cross"), pos_conv=True)
    policy = ["--config", str(ROOT / "configs/policy.yaml"), "--model.init_args.universal_checkpoint",
              str(export_checkpoint(universal, tmp_path / "universal", {})), "--data.root", str(tmp_path / "data"), *DATA]
    fit = main(["fit", *policy, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    with torch.no_grad():
        for p in fit.model.lvlm.policy.parameters():
            p.normal_(0, 1)
    ckpt = tmp_path / "policy.ckpt"
    fit.trainer.save_checkpoint(str(ckpt))
    out1, out2 = tmp_path / "one", tmp_path / "two"
    args = ["validate", *policy[:4], "--ckpt_path", str(ckpt), "--trainer.callbacks+=tests.ddp_record.Record"]
    cli(*args, f"--trainer.callbacks.out={out1}", devices=1)
    cli(*args, f"--trainer.callbacks.out={out2}", devices=2)
    one, two = _metrics(out1 / "rank0_metrics.json"), _metrics(out2 / "rank0_metrics.json")
    assert two == _metrics(out2 / "rank1_metrics.json")
    assert one.keys() == two.keys()
    assert max(one[f"val/budget_frac/{k}"] for k in range(3)) < 1, one  # the router's choices vary
    for k, v in one.items():
        assert two[k] == pytest.approx(v, abs=1e-6), k
