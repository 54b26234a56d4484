import pytest

from src.lit.module import warmup_cosine
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
