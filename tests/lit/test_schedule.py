import pytest
import torch

from src.lit.visor_module import warmup_cosine
from src.models.decoder import DecoderConfig


def test_warmup_cosine_with_a_delayed_start():
    kw = dict(warmup=10, total=110, min_ratio=0.1)
    assert warmup_cosine(0, start=0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(9, start=0, **kw) == pytest.approx(1.0)
    assert warmup_cosine(109, start=0, **kw) == pytest.approx(0.1, abs=1e-3)
    # base parameters unfrozen at step 50: nothing before, then their own warmup from ~0
    assert warmup_cosine(49, start=50, **kw) == 0.0
    assert warmup_cosine(50, start=50, **kw) == pytest.approx(0.1)
    assert warmup_cosine(59, start=50, **kw) == pytest.approx(1.0)
    assert warmup_cosine(109, start=50, **kw) == pytest.approx(0.1, abs=1e-3)
    values = [warmup_cosine(s, start=50, **kw) for s in range(60, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warmup


def test_odd_head_dim_is_rejected():
    with pytest.raises(ValueError, match="must be even"):
        DecoderConfig(d_model=36, n_heads=4)


def test_freeze_embeddings_keeps_the_vocabulary_matrix_out_of_training(tiny_decoder_config):
    """model.freeze_embeddings: no gradient for the (tied) embedding / LM head, and not in the optimizer."""
    from types import SimpleNamespace

    from src.lit.visor_module import VisorLitModule
    from src.models import LayerPlan, VisionEncoder, VisorLVLM
    c = tiny_decoder_config
    lvlm = VisorLVLM(VisionEncoder("test_byobnet", 2, 64), c, LayerPlan(c.n_layers, self_layers=[0], cross_layers=[1]))
    module = VisorLitModule(lvlm, freeze_embeddings=True)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    emb = lvlm.decoder.embed_tokens.weight
    assert id(emb) not in in_opt and not emb.requires_grad and lvlm.decoder.lm_head.weight is emb
    assert len(in_opt) == sum(1 for p in lvlm.parameters() if p.requires_grad)
    batch = {"images": torch.rand(2, 3, 64, 64), "input_ids": torch.randint(1, c.vocab_size, (2, 6)),
             "labels": torch.randint(1, c.vocab_size, (2, 6))}
    loss, _ = module._loss(batch)
    loss.backward()
    assert emb.grad is None and lvlm.decoder.layers[0].mlp.up_proj.weight.grad is not None


def test_the_summary_counts_the_phase_trainable_parameters(base_export):
    """With new_params_only_steps, the flags of stage 1 are set at setup, before Lightning's model
    summary: it reports the new parts (cross sublayers, positional conv), not the whole model."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.model_summary import ModelSummary

    from src.lit.visor_module import VisorLitModule
    from src.models import DecoderConfig, LayerPlan, VisionEncoder, VisorLVLM
    lvlm = VisorLVLM(VisionEncoder("lcnet_075", 2, 128, pos_embed="sincos", feature_norm=True),
                     DecoderConfig(preset="tiny"), LayerPlan(6, self_layers=[0], cross_layers=[1, 3]))
    module = VisorLitModule(lvlm, base_checkpoint=base_export, freeze_vision=True, new_params_only_steps=2)
    module._trainer = SimpleNamespace(datamodule=None, global_step=0, precision="32-true")
    new = sum(p.numel() for n, p in module.named_parameters() if n in set(module.new_params))
    everything = sum(p.numel() for n, p in module.named_parameters() if not n.startswith("lvlm.vision."))
    module.setup("fit")
    assert 0 < new < everything and ModelSummary(module).trainable_parameters == new
    module._trainer.global_step = 2
    module._set_stage()
    assert ModelSummary(module).trainable_parameters == everything


@pytest.mark.parametrize("mode", ["uniform", "sandwich"])
def test_budget_draws_follow_the_step_and_the_run_seed(tiny_decoder_config, monkeypatch, mode):
    """Universal steps draw from (step, seed_everything's seed): a repeated step (a resume, another
    rank) draws the same budgets, another seed another sequence; seed 0 draws by the step alone."""
    import random

    from src.lit.visor_module import VisorLitModule
    from src.models import LayerPlan, VisionEncoder, VisorLVLM
    c = tiny_decoder_config
    plan = LayerPlan(c.n_layers, self_layers=[0, 2, 3], optional_self=[2, 3], cross_layers=[1])  # 3 budgets
    module = VisorLitModule(VisorLVLM(VisionEncoder("test_byobnet", 2, 64), c, plan), budget_sampling=mode)

    def draws(seed):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        return [module.step_budgets(s) for s in range(300)]

    seed0, seed1 = draws(0), draws(1)
    assert draws(1) == seed1
    assert seed0 != seed1
    pick0 = [random.Random(s).randrange(plan.n_budgets) for s in range(300)]
    assert [d[-1] if mode == "uniform" else d for d in seed0] == (
        pick0 if mode == "uniform" else [list(dict.fromkeys([2, 0, p])) for p in pick0])
    for seq in (seed0, seed1):  # every budget drawn, none rarely
        counts = [sum(b in d for d in seq) for b in range(plan.n_budgets)]
        assert min(counts) > 60, counts
