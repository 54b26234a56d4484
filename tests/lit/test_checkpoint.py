import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from src.lit.checkpoint_io import CheckpointMismatch, export_checkpoint, load_base_checkpoint
from src.models.lvlm import VisorLVLM
from src.models.plan import LayerPlan
from src.models.vision import VisionEncoder


def _model(cfg, plan, pos_conv):
    return VisorLVLM(VisionEncoder("test_byobnet", 2, 64), cfg, plan, pos_conv=pos_conv)


def test_base_to_visor_conversion_loads_every_tensor(tmp_path, tiny_decoder_config):
    torch.manual_seed(0)
    base = _model(tiny_decoder_config, LayerPlan(4, all_self=True), pos_conv=False)
    out = export_checkpoint(base, tmp_path / "base", {"note": "test"})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"]["plan"] == ["self"] * 4 and manifest["note"] == "test"
    assert all(v.dtype == torch.float16 for k, v in load_file(str(out / "model.safetensors")).items()
               if v.is_floating_point())
    visor = _model(tiny_decoder_config, LayerPlan(4, self_layers=[0], cross_layers=[1, 3]), pos_conv=True)
    report = load_base_checkpoint(visor, out)
    assert set(report["new"]) == set(visor.new_tensor_names())
    assert any(n.startswith("pos_conv.") for n in report["new"]) and any(".cross." in n for n in report["new"])
    base_half = base.decoder.layers[1].attn.q_proj.weight.half().float()
    assert torch.equal(visor.decoder.layers[1].attn.q_proj.weight, base_half)
    assert torch.equal(visor.decoder.cross["1"].q_proj.weight, base_half)  # re-copied from the loaded host
    # With gates at zero and the pos conv at identity, the converted model's S-layer output matches
    # the base's (up to fp16 rounding of the weights).
    images = torch.rand(2, 3, 64, 64)
    base.load_state_dict({k: v.half().float() for k, v in base.state_dict().items()})
    base.eval(), visor.eval()
    with torch.no_grad():
        assert torch.allclose(base.encode_images(images).tokens, visor.encode_images(images).tokens)


def test_an_export_in_bfloat16_keeps_a_bf16_model_bit_exact_and_a_bad_dtype_names_the_field(tmp_path,
                                                                                             tiny_decoder_config):
    from src.lit.callbacks import ExportCheckpoint

    torch.manual_seed(0)
    model = _model(tiny_decoder_config, LayerPlan(4, all_self=True), pos_conv=False).to(torch.bfloat16)
    model.decoder.norm.weight.data.fill_(3e38)  # beyond float16's range (65504): it would become inf
    out = export_checkpoint(model, tmp_path / "bf16", {}, dtype=torch.bfloat16)
    state = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.bfloat16}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert ExportCheckpoint(str(tmp_path), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"ExportCheckpoint.dtype must be one of \['float16', 'bfloat16', 'float32'\]"):
        ExportCheckpoint(str(tmp_path), dtype="float64")


def test_mismatches_are_listed(tmp_path, tiny_decoder_config):
    base = _model(tiny_decoder_config, LayerPlan(4, all_self=True), pos_conv=False)
    out = export_checkpoint(base, tmp_path / "base", {})
    state = load_file(str(out / "model.safetensors"))
    visor = _model(tiny_decoder_config, LayerPlan(4, self_layers=[0], cross_layers=[1]), pos_conv=True)
    missing = dict(state)
    del missing["decoder.layers.2.mlp.up_proj.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"missing: \['decoder.layers.2.mlp.up_proj.weight'\]"):
        load_base_checkpoint(visor, tmp_path / "missing.safetensors")
    bad = dict(state)
    bad["decoder.norm.weight"] = torch.ones(7, dtype=torch.float16)
    bad["extra.weight"] = torch.ones(1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"unexpected: \['extra.weight'\][\s\S]*decoder.norm.weight"):
        load_base_checkpoint(visor, tmp_path / "bad.safetensors")


def test_other_decoder_sizes_name_the_config_fields_to_set(tmp_path, tiny_decoder_config):
    """A checkpoint whose manifest records another vocabulary (LLaVA-OV's 152000 against the Qwen2
    preset's 151936) fails before any tensor is compared, naming each field and its value."""
    import dataclasses

    base = _model(tiny_decoder_config, LayerPlan(4, all_self=True), pos_conv=False)
    out = export_checkpoint(base, tmp_path / "base", {})
    other = dataclasses.replace(tiny_decoder_config, vocab_size=tiny_decoder_config.vocab_size + 8)
    model = _model(other, LayerPlan(4, all_self=True), pos_conv=False)
    want = (f"set model.lvlm.init_args.decoder.vocab_size: {tiny_decoder_config.vocab_size} "
            f"\\(the model has {other.vocab_size}\\)")
    with pytest.raises(CheckpointMismatch, match=want):
        load_base_checkpoint(model, out, field_prefix="model.lvlm.init_args.decoder.")
    load_base_checkpoint(_model(tiny_decoder_config, LayerPlan(4, all_self=True), pos_conv=False), out)  # same sizes load


class _Payload:
    """Unpickling this runs code: it writes a marker file (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_from_the_command_line_are_not_unpickled(tmp_path, cli_process):
    """A .ckpt whose pickle runs code is refused by every reader of user-supplied checkpoints
    (src.export, the evaluation loader, LightningCLI's --ckpt_path), and the code never runs."""
    from src.eval.checkpoints import load_for_eval
    from src.export import main as export_main
    from tests.fit_args import ROOT

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "payload": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="evil.ckpt: refused"):
        export_main(["--config", str(ROOT / "configs/visor.yaml"), "--ckpt", str(evil), "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="evil.ckpt: refused"):
        load_for_eval(str(evil), config=str(ROOT / "configs/visor.yaml"))
    run = cli_process("validate", "--config", ROOT / "configs/visor.yaml", "--model.base_checkpoint",
                      ROOT / "checkpoints/base", "--ckpt_path", evil, "--data.root", tmp_path / "data",
                      "--data.val_images", "4", "--data.train_images", "4", "--data.images_per_shard", "4", timeout=300)
    assert run.returncode != 0 and "weights_only" in run.stderr, run.stderr[-2000:]
    assert not marker.exists()
