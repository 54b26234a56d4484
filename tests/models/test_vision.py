import pytest
import torch

from src.models.vision import VisionEncoder


def test_vit_gives_patch_tokens_without_cls():
    enc = VisionEncoder("test_vit", feature_layer=-1, image_size=64).eval()
    out = enc(torch.rand(2, 3, 64, 64))
    h, w = enc.grid
    assert h == w > 1 and out.shape == (2, h * w, enc.out_dim)  # a full square grid, no CLS/prefix token


def test_cnn_tokens_and_position_embedding():
    plain = VisionEncoder("test_byobnet", feature_layer=2, image_size=64).eval()
    flat = torch.full((1, 3, 64, 64), 0.5)
    tokens = plain(flat)  # (1, V, C)
    assert tokens.shape == (1, plain.num_tokens, plain.out_dim)
    centre = tokens.view(1, *plain.grid, -1)[0, 1:-1, 1:-1].flatten(0, 1)
    assert torch.allclose(centre, centre[:1].expand_as(centre), atol=1e-5)  # a flat image: no *where* inside
    withpos = VisionEncoder("test_byobnet", feature_layer=2, image_size=64, pos_embed="sincos").eval()
    withpos.backbone.load_state_dict(plain.backbone.state_dict())
    centre = withpos(flat).view(1, *plain.grid, -1)[0, 1:-1, 1:-1].flatten(0, 1)
    assert not torch.allclose(centre, centre[:1].expand_as(centre), atol=1e-5)


def test_sincos_2d_tells_every_position_apart_at_feature_scale():
    from src.models.vision import sincos_2d
    emb = sincos_2d((16, 16), 96)
    assert emb.shape == (256, 96)
    dist = torch.cdist(emb, emb) + torch.eye(256) * 1e9
    assert dist.min() > 0.5  # neighbours differ clearly, not only far-apart tokens
    norms = emb.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, (96 / 2) ** 0.5), rtol=1e-5)  # sin^2 + cos^2 per pair
    # Row and column are each recoverable by least squares from the embedding.
    rows = torch.arange(16.0).repeat_interleave(16)
    cols = torch.arange(16.0).repeat(16)
    for target in (rows, cols):
        sol = torch.linalg.lstsq(torch.cat([emb, torch.ones(256, 1)], 1).double(), target[:, None].double()).solution
        pred = torch.cat([emb, torch.ones(256, 1)], 1).double() @ sol
        assert (pred.squeeze(1) - target).abs().max() < 0.5


def test_learned_position_embedding_is_a_parameter_and_bad_kind_names_the_field():
    enc = VisionEncoder("test_byobnet", feature_layer=2, image_size=64, pos_embed="learned")
    assert isinstance(enc.pos_embed, torch.nn.Parameter) and enc.pos_embed.shape == (1, enc.num_tokens, enc.out_dim)
    assert "pos_embed" not in dict(VisionEncoder("test_byobnet", 2, 64, pos_embed="sincos").state_dict())
    with pytest.raises(ValueError, match="vision.pos_embed"):
        VisionEncoder("test_byobnet", 2, 64, pos_embed=True)


def test_feature_norm_normalises_each_token_before_the_position_embedding():
    """Each token's channels come out with mean 0 and variance v / (v + eps), v the token's raw
    variance (LayerNorm's eps: a token whose raw variance is near eps comes out below 1, so the
    expectation is exact rather than 1 with a tolerance that random weights may exceed)."""
    enc = VisionEncoder("test_byobnet", feature_layer=2, image_size=64, pos_embed="sincos", feature_norm=True).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tokens = enc(images) - enc.pos_embed  # (2, V, C): the normalised features
        norm, enc.feature_norm = enc.feature_norm, None
        raw_var = enc.features(images).var(-1, unbiased=False)  # (2, V): before the norm
        enc.feature_norm = norm
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, enc.num_tokens), atol=1e-4)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), raw_var / (raw_var + norm.eps), rtol=1e-4, atol=1e-5)


def test_encoder_errors_name_the_field():
    with pytest.raises(ValueError, match="vision.name"):
        VisionEncoder("no_such_model")
    with pytest.raises(AssertionError, match="128x128"):
        VisionEncoder("test_byobnet", 2, 128)(torch.rand(1, 3, 64, 64))
