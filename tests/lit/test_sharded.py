"""Sharded training (FSDP2 over gloo, two CPU processes): per-sample budgets that differ between
ranks must not make one rank enter a layer more often than another (a unit's entry is an
all-gather), and the sharded gradient must be the one the unsharded model gets; through the
command line, a sharded fit equals a DDP fit on the same data, and its last.ckpt is an ordinary
checkpoint that a one-process validate reads."""
import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.fit_args import TWO_RANK_DATA, on_cpu

ROOT = Path(__file__).resolve().parents[2]
# rank 0: mixed budgets (optional layers 2 and 4 run as two row groups); rank 1: one budget for both
BUDGETS = {0: [0, 2], 1: [2, 2]}


def _model():
    from src.models import DecoderConfig, LayerPlan, VisionEncoder, VisorLVLM

    torch.manual_seed(0)
    lvlm = VisorLVLM(VisionEncoder("lcnet_075", 2, 64, pos_embed="sincos", feature_norm=True),
                     DecoderConfig(preset="tiny"), LayerPlan(6, self_layers=[0, 2, 4], optional_self=[2, 4],
                                                             cross_layers=[1, 5], skip_kind="cross"), pos_conv=True)
    lvlm.vision.requires_grad_(False)  # frozen: outside the sharded units
    return lvlm


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 64, (2, 9), generator=g)


def _loss(lvlm, rank):
    images, ids = _inputs(rank)
    return lvlm(images, ids, budget=torch.tensor(BUDGETS[rank])).float().square().mean()


def _rank(rank, world, init_file, out, same_calls, checkpointed):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from src.lit.distributed import shard_lvlm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    try:
        lvlm = _model()
        shard_lvlm(lvlm, init_device_mesh("cpu", (world,)), activation_checkpointing=checkpointed)
        lvlm.decoder.same_calls_on_every_rank = same_calls
        _loss(lvlm, rank).backward()
        grads = {n: p.grad.full_tensor() for n, p in lvlm.named_parameters() if p.grad is not None}
        torch.save(grads, Path(out) / f"grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path, same_calls, checkpointed=False):
    """-> (rank 0's gathered gradients or None when the ranks failed, the error text)."""
    out = tmp_path / f"run_{same_calls}_{checkpointed}"
    out.mkdir()
    try:
        mp.spawn(_rank, args=(2, str(out / "init"), str(out), same_calls, checkpointed), nprocs=2, join=True)
    except Exception as e:  # a rank raised (a collective timed out or mismatched)
        return None, str(e)
    return torch.load(out / "grads0.pt"), ""


def _reference_grads():
    """The unsharded model's gradient of the mean of both ranks' losses (FSDP averages over ranks)."""
    lvlm = _model()
    ((_loss(lvlm, 0) + _loss(lvlm, 1)) / 2).backward()
    return {n: p.grad for n, p in lvlm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointed", [False, True])
def test_per_sample_budgets_that_differ_between_ranks_shard_exactly(tmp_path, checkpointed):
    grads, error = _run_two_ranks(tmp_path, same_calls=True, checkpointed=checkpointed)
    assert grads is not None, error
    ref = _reference_grads()
    assert grads.keys() == ref.keys()
    assert not any(n.startswith("vision.") for n in grads)  # the frozen tower has no gradient
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_without_equal_layer_entries_the_ranks_fall_out_of_step(tmp_path):
    """The control: with mixed budgets on rank 0 only, rank 0 enters layers 2 and 4 twice and rank 1
    once, so their all-gathers pair up wrongly: the ranks fail (a mismatch or the 20 s collective
    timeout) or the gradient is wrong."""
    grads, _ = _run_two_ranks(tmp_path, same_calls=False)
    if grads is not None:
        ref = _reference_grads()
        assert any(not torch.allclose(grads[n], g, rtol=1e-4, atol=1e-6) for n, g in ref.items())


def _cli(cli_process, tmp_path, *args, strategy=None, devices=2):
    out = cli_process(*args, *on_cpu(devices, strategy), "--data.root", tmp_path / "data", *TWO_RANK_DATA, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_sharded_fit_equals_ddp_and_writes_an_ordinary_checkpoint(tmp_path, cli_process):
    """A universal fit (a random budget per step) through both training stages with a validation
    between, under configs/strategy/fsdp.yaml and under ddp.yaml on the same data."""
    fit = ["fit", "--config", str(ROOT / "configs/visor.yaml"), "--config", str(ROOT / "configs/universal.yaml"),
           "--model.base_checkpoint", str(ROOT / "checkpoints/base"), "--trainer.max_steps", "4",
           "--model.new_params_only_steps", "2", "--trainer.val_check_interval", "2",
           "--trainer.callbacks+=tests.ddp_record.Record"]
    runs = {}
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / strategy
        _cli(cli_process, tmp_path, *fit, f"--trainer.callbacks.out={out}", "--trainer.default_root_dir", str(out),
             "--trainer.logger.init_args.save_dir", str(out), strategy=strategy)
        runs[strategy] = out
        if strategy == "fsdp":  # configs/universal.yaml's export at the end of fit: the gathered weights
            from safetensors.torch import load_file
            export = load_file(str(tmp_path / "outputs/universal/export/model.safetensors"))
            recorded = torch.load(out / "rank0_weights.pt")
            assert export and all(torch.equal(v, recorded[k].to(v.dtype)) for k, v in export.items())
    weights = {s: torch.load(runs[s] / "rank0_weights.pt") for s in runs}
    assert weights["fsdp"].keys() == weights["ddp"].keys()
    worst = max((weights["fsdp"][k].float() - weights["ddp"][k].float()).abs().max().item() for k in weights["ddp"])
    print(f"sharded vs DDP after 4 steps: max abs weight difference {worst:.2e}")
    assert worst < 1e-5  # the same updates, up to the order of float reductions
    metrics = {s: json.loads((runs[s] / "rank0_metrics.json").read_text()) for s in runs}
    assert metrics["fsdp"] == json.loads((runs["fsdp"] / "rank1_metrics.json").read_text())
    for k, v in metrics["ddp"].items():
        assert metrics["fsdp"][k] == pytest.approx(v, abs=1e-4), k

    ckpt = next(runs["fsdp"].rglob("last.ckpt"))
    state = torch.load(ckpt, weights_only=True)["state_dict"]  # one full file, no shards
    assert {k[len("lvlm."):] for k in state if k.startswith("lvlm.")} == weights["fsdp"].keys()
    assert all(torch.equal(state["lvlm." + k], v) for k, v in weights["fsdp"].items())
    one = tmp_path / "one"
    _cli(cli_process, tmp_path, "validate", *fit[1:7], "--ckpt_path", str(ckpt), "--trainer.callbacks+=tests.ddp_record.Record",
         f"--trainer.callbacks.out={one}", "--trainer.logger.init_args.save_dir", str(one), devices=1)
    read = json.loads((one / "rank0_metrics.json").read_text())
    for k, v in metrics["fsdp"].items():
        assert read[k] == pytest.approx(v, abs=1e-4 if k == "val/loss" else 1e-6), k
