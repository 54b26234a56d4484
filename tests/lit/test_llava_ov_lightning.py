"""A converted LLaVA-OneVision checkpoint (tiny random, saved by transformers, converted by
src.import_llava_ov) through Lightning: fit (stage 1 then 2), validate and predict on the generated
data, one crop per image and AnyRes tiles (data.anyres, images rendered larger than a crop), in fp32,
under bf16-mixed and as a bf16 model (bf16-true)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
import lightning as L  # noqa: E402

from src.import_llava_ov import convert  # noqa: E402
from src.data.datamodule import VQADataModule  # noqa: E402
from src.flops import sample_flops  # noqa: E402
from src.lit.visor_module import VisorLitModule  # noqa: E402
from src.models import DecoderConfig, LayerPlan, VisorLVLM  # noqa: E402
from src.models.anyres import AnyRes, TiledImages  # noqa: E402
from src.models.siglip import SiglipVisionEncoder  # noqa: E402

from tests.models.test_anyres import IMAGE_TOKEN, TILE, hf_model  # noqa: E402

RENDER = 100  # a 100 px image: 4 x 4 tiles of 32 px, downsampled (anyres_max_9) to 16 + 12 * 13 tokens


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_ov_lightning")
    hf_model().save_pretrained(str(root / "hf"))
    convert(root / "hf", root / "converted", "float32")
    return root / "converted"


def lit_module(converted, anyres: bool) -> VisorLitModule:
    args = json.loads((converted / "manifest.json").read_text())["lvlm_init_args"]
    plan = LayerPlan(n_layers=4, self_layers=[0, 2], optional_self=[2], cross_layers=[1, 3])
    lvlm = VisorLVLM(SiglipVisionEncoder(**args["vision"]["init_args"]), DecoderConfig(**args["decoder"]), plan,
                     pos_conv=True, image_newline=True, anyres=AnyRes(**args["anyres"]) if anyres else None)
    return VisorLitModule(lvlm, base_checkpoint=str(converted), freeze_vision=True, new_params_only_steps=1,
                          max_new_tokens=3, warmup_steps=1)


def datamodule(root, anyres: bool) -> VQADataModule:
    return VQADataModule(root=str(root), train_images=8, val_images=4, images_per_shard=4, image_size=TILE,
                           batch_size=2, val_batch_size=4, num_workers=0, render_size=RENDER if anyres else None,
                           anyres=anyres)


@pytest.mark.parametrize("anyres", [False, True], ids=["crop", "anyres"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_fit_validate_predict(converted, tmp_path, precision, anyres):
    module, dm = lit_module(converted, anyres), datamodule(tmp_path / "data", anyres)
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, val_check_interval=3, precision=precision,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=str(tmp_path))
    before = module.lvlm.decoder.layers[1].mlp.up_proj.weight.detach().clone()
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert not torch.equal(module.lvlm.decoder.layers[1].mlp.up_proj.weight.detach().float(), before.float())
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert 0.0 <= metrics["val/acc"] <= 1.0 and torch.isfinite(torch.tensor(metrics["val/loss"]))
    rows = [r for batch in trainer.predict(module, datamodule=dm) for r in batch]
    assert len(rows) >= 4 and all(0 < len(r["generated_ids"]) <= 3 for r in rows)
    assert all(0 <= t < IMAGE_TOKEN + 1 for r in rows for t in r["generated_ids"])
    one_crop = [sample_flops(module.lvlm, r["prompt_tokens"], r["budget"]).llm / 1e9 for r in rows]
    if anyres:  # the rows count each image's own tokens: 172 against one crop's 17
        batch = next(iter(dm.val_dataloader()))
        assert isinstance(batch["images"], TiledImages) and batch["images"].sizes.tolist()[0] == [RENDER, RENDER]
        assert module.lvlm.anyres.num_tokens(RENDER, RENDER) == 16 + 12 * 13
        assert all(r["gflops"] > g for r, g in zip(rows, one_crop))
    else:
        assert module.lvlm.num_visual_tokens == 17 and [r["gflops"] for r in rows] == one_crop


def test_data_anyres_needs_the_model_settings(converted, tmp_path):
    module, dm = lit_module(converted, False), datamodule(tmp_path / "data", True)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="model.lvlm.init_args.anyres"):
        trainer.fit(module, datamodule=dm)
