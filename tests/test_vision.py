import pytest
import torch

from src.models.token_reduction import AvgPoolReducer
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
    withpos = VisionEncoder("test_byobnet", feature_layer=2, image_size=64, pos_embed=True).eval()
    withpos.backbone.load_state_dict(plain.backbone.state_dict())
    centre = withpos(flat).view(1, *plain.grid, -1)[0, 1:-1, 1:-1].flatten(0, 1)
    assert not torch.allclose(centre, centre[:1].expand_as(centre), atol=1e-5)


def test_encoder_errors_name_the_field():
    with pytest.raises(ValueError, match="vision.name"):
        VisionEncoder("no_such_model")
    with pytest.raises(AssertionError, match="128x128"):
        VisionEncoder("test_byobnet", 2, 128)(torch.rand(1, 3, 64, 64))


def test_avg_pool_reducer():
    r = AvgPoolReducer(2)
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, one channel
    out = r(x, (4, 4))
    assert r.output_grid((4, 4)) == (2, 2)
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="token_reducer.size"):
        AvgPoolReducer(3).output_grid((4, 4))
