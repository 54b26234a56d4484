"""AnyRes (src/models/anyres.py) against transformers' LlavaOnevisionImageProcessor and
LlavaOnevisionForConditionalGeneration on a tiny random LLaVA-OneVision (32 px crops, 8 px patches:
4 x 4 features per crop, pinpoints up to 6 x 6 tiles), for several aspect ratios: the crops'
pixels, the number and order of visual tokens, the logits; then batches of images with different
token counts against each image alone (uncached, cached, VISOR plans, the router)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from src.models.anyres import AnyRes, TiledImages, default_pinpoints  # noqa: E402
from src.models.llava_ov import llava_ov_from_hf  # noqa: E402
from src.models.plan import LayerPlan  # noqa: E402

VOCAB, IMAGE_TOKEN, TILE, PATCH = 90, 89, 32, 8
# (height, width): square, wide, tall, large enough to be downsampled (anyres_max_9), extreme.
SIZES = [(32, 32), (50, 90), (90, 40), (150, 170), (20, 200)]


def hf_model(n_layers=4, seed=0):
    text = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                    rope_theta=10000.0, tie_word_embeddings=False)
    vision = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=2, image_size=TILE, patch_size=PATCH, vision_use_head=False)
    cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text.to_dict(),
                                            image_token_index=IMAGE_TOKEN, image_grid_pinpoints=default_pinpoints(TILE),
                                            vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(seed)
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # no parameter left at a trivial init
            p.add_(0.05 * torch.randn_like(p))
    return model


def processor():
    return transformers.LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE},
                                                     image_grid_pinpoints=default_pinpoints(TILE),
                                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)


def image(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_ov_anyres")
    model = hf_model()
    model.save_pretrained(str(folder))
    return model, folder


def test_geometry_examples():
    """LLaVA-OV-0.5B's own numbers: a 384 x 384 image is a base crop and one tile (729 + 27 * 28 = 1485
    tokens, what transformers' processor gives); 9 tiles' worth is the most before downsampling."""
    a = AnyRes(tile=384, patch=14)
    assert a.tile_grid(384, 384) == (1, 1) and a.num_tokens(384, 384) == 729 + 27 * 28 == 1485
    assert a.tile_grid(768, 1152) == (2, 3) and a.num_tokens(768, 1152) == 729 + 54 * 82
    h, w = a.tile_feature_shape(2304, 2304)  # 6 x 6 tiles: 162 x 162 features, downsampled to 9 tiles' worth
    assert (h, w) == (81, 81) and a.n_crops(2304, 2304) == 37


@pytest.mark.parametrize("size", SIZES)
def test_crops_equal_the_processor(size):
    img = image(*size)
    ours = AnyRes(tile=TILE, patch=PATCH).crops(img)  # (n, 3, S, S) in [0, 1]
    ref = processor()(images=[img], return_tensors="pt")
    assert ref["image_sizes"].tolist() == [list(size)]
    pix = ref["pixel_values"][0]
    assert ours.shape == pix.shape, (ours.shape, pix.shape)
    torch.testing.assert_close((ours - 0.5) / 0.5, pix, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("image_at", [0, 3])  # 3: the image inside the first user turn, after 3 text tokens
def test_tokens_and_logits_equal_transformers(hf_dir, size, image_at):
    hf, folder = hf_dir
    ours, settings = llava_ov_from_hf(folder)
    assert settings["anyres"]["max_tiles"] == 9 and ours.anyres.pinpoints == default_pinpoints(TILE)
    img = image(*size, seed=1)
    ref = processor()(images=[img], return_tensors="pt")
    tiled = TiledImages.stack([ours.anyres.crops(img)], [size])
    text = torch.randint(0, IMAGE_TOKEN, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = hf.model.get_image_features(ref["pixel_values"], ref["image_sizes"]).pooler_output[0]
        V = ours.anyres.num_tokens(*size)
        assert feats.shape[0] == V, (feats.shape, V)
        vt = ours.encode_images(tiled)
        assert vt.tokens.shape == (1, V, 32) and vt.lens is None and vt.text_start.tolist() == [V]
        torch.testing.assert_close(vt.tokens[0], feats, atol=1e-4, rtol=0)  # same tokens, same order
        ids = torch.cat([text[:, :image_at], torch.full((1, V), IMAGE_TOKEN), text[:, image_at:]], dim=1)
        want = hf(input_ids=ids, pixel_values=ref["pixel_values"], image_sizes=ref["image_sizes"]).logits
        want = torch.cat([want[:, :image_at], want[:, image_at + V:]], dim=1)  # the text positions
        torch.testing.assert_close(ours(tiled, text, image_at=image_at), want, atol=1e-4, rtol=0)


def live_gates(model):
    with torch.no_grad():
        for cross in model.decoder.cross.values():
            cross.gate.fill_(0.7)
    return model


PLANS = {
    "all_self": None,
    "visor": dict(self_layers=[0, 2], optional_self=[2], cross_layers=[1, 3]),
}


def batch(anyres, sizes, seed=3):
    imgs = [image(*s, seed=seed + i) for i, s in enumerate(sizes)]
    return TiledImages.stack([anyres.crops(x) for x in imgs], sizes)


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("image_at", [0, 2])
def test_mixed_token_counts_batch_equals_each_alone(hf_dir, plan, image_at):
    """Images of different token counts in one batch (visual padding hidden from every attention,
    each sample's text right after its own tokens, image_at text tokens before the image): logits
    and greedy generation equal each alone, at every budget of the VISOR plan (mixed budgets in one
    batch too)."""
    _, folder = hf_dir
    lp = None if PLANS[plan] is None else LayerPlan(n_layers=4, **PLANS[plan])
    ours = live_gates(llava_ov_from_hf(folder, plan=lp, pos_conv=True)[0])
    with torch.no_grad():
        ours.pos_conv.conv.weight.normal_(0, 0.1)  # a live pos conv must not leak across the padding either
    sizes = [(50, 90), (150, 170), (32, 32)]
    tiled = batch(ours.anyres, sizes)
    vt = ours.encode_images(tiled)
    assert vt.lens.tolist() == [ours.anyres.num_tokens(*s) for s in sizes]
    text = torch.randint(0, IMAGE_TOKEN, (3, 5), generator=torch.Generator().manual_seed(4))
    budgets = [None] + ([torch.tensor([0, 1, 0])] if plan == "visor" else [])
    with torch.no_grad():
        for budget in budgets:
            together = ours(tiled, text, budget, image_at=image_at)
            gen = ours.generate(tiled, text, max_new_tokens=4, budget=budget, image_at=image_at).tokens
            for b in range(3):
                one = TiledImages(tiled.crops[b:b + 1], tiled.sizes[b:b + 1])
                bb = None if budget is None else budget[b:b + 1]
                torch.testing.assert_close(together[b:b + 1], ours(one, text[b:b + 1], bb, image_at=image_at),
                                           atol=1e-5, rtol=0)
                alone = ours.generate(one, text[b:b + 1], max_new_tokens=4, budget=bb, image_at=image_at).tokens
                assert torch.equal(gen[b:b + 1], alone)


def test_router_pools_only_the_valid_visual_tokens(hf_dir):
    _, folder = hf_dir
    plan = LayerPlan(n_layers=4, self_layers=[0, 2], optional_self=[2], cross_layers=[1, 3])
    ours = live_gates(llava_ov_from_hf(folder, plan=plan, policy_hidden=8)[0])
    with torch.no_grad():
        ours.policy.fc2.weight.normal_(0, 1.0)
    sizes = [(150, 170), (32, 32)]
    tiled = batch(ours.anyres, sizes)
    text = torch.randint(0, IMAGE_TOKEN, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        _, together, _ = ours.routed(tiled, text, mask, lambda logits: logits.argmax(-1))
        alone = ours.routed(TiledImages(tiled.crops[1:], tiled.sizes[1:]), text[1:], mask[1:],
                            lambda logits: logits.argmax(-1))[1]
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=0)


def test_bad_anyres_input_says_what_to_do(hf_dir):
    _, folder = hf_dir
    ours, _ = llava_ov_from_hf(folder)
    tiled = batch(ours.anyres, [(150, 170)])
    with pytest.raises(ValueError, match="need"):
        ours(TiledImages(tiled.crops[:, :2], tiled.sizes), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="uint8"):
        ours.anyres.crops(torch.rand(3, 40, 40))
    with pytest.raises(ValueError, match="anyres.pinpoints"):
        AnyRes(tile=32, patch=8, pinpoints=[[32, 50]])
    with pytest.raises(ValueError, match="set anyres.tile"):
        from src.models.lvlm import VisorLVLM
        VisorLVLM(ours.vision, ours.decoder.config, ours.plan, pos_conv=False, anyres=AnyRes(tile=64, patch=8))


@pytest.mark.parametrize("size", [(50, 90), (150, 170)])
def test_sample_flops_of_an_anyres_image_match_the_counted(hf_dir, size):
    """src.flops.sample_flops(image_hw=) (every crop through the tower, the image's token count in the
    LLM) equals FlopCounterMode over the whole model on that image."""
    from src.flops import measured_flops, sample_flops

    _, folder = hf_dir
    plan = LayerPlan(n_layers=4, self_layers=[0], cross_layers=[1, 3])
    ours = llava_ov_from_hf(folder, plan=plan, pos_conv=True)[0]
    tiled, T = batch(ours.anyres, [size]), 6
    with torch.no_grad():
        got = measured_flops(ours, tiled, torch.zeros(1, T, dtype=torch.long))
    want = sample_flops(ours, T, image_hw=size)
    assert abs(got - want.total) <= 1e-3 * want.total, (got, want)
    assert want.llm > sample_flops(ours, T).llm  # more tokens than one crop


def test_visual_kv_bytes_of_an_anyres_image_match_the_cache(hf_dir):
    """generation.visual_kv_bytes(n_visual=) for an AnyRes image's token count equals what the cache
    holds after its prefill (self layers' visual slots + cross sublayers' K/V)."""
    from src.models.generation import visual_kv_bytes

    _, folder = hf_dir
    plan = LayerPlan(n_layers=4, self_layers=[0], cross_layers=[1, 3])
    ours = llava_ov_from_hf(folder, plan=plan)[0]
    size = (150, 170)
    tiled = batch(ours.anyres, [size])
    with torch.no_grad():
        cache = ours.generate(tiled, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=1).cache
    V = ours.anyres.num_tokens(*size)
    assert cache.visual_bytes() == visual_kv_bytes(ours, n_visual=V) == 3 * V * 2 * 2 * 8 * 4  # 3 layers read it
