"""visor::cross_attention against a float64 reference: values, log-sum-exp, gradients, schema checks."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from src.ops.cross_attention import cross_attention_reference
from src.ops.extension import extension_available

needs_ext = pytest.mark.skipif(not extension_available(), reason="C++ extension not built")
pytestmark = needs_ext


def _inputs(B=2, H=4, Hkv=2, T=5, V=37, hd=64, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, hd, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, V, hd, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, V, hd, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (q, k, v)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "infinities differ"
    return ((a[finite] - b[finite]).norm() / b[finite].norm().clamp_min(1e-30)).item()


def _reference64(q, k, v, kv_lens, scale):
    return cross_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                     None if kv_lens is None else kv_lens.cpu(), scale)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}


def _check_forward(q, k, v, kv_lens=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = torch.ops.visor.cross_attention(q, k, v, kv_lens, scale)
    ref_out, ref_lse = _reference64(q, k, v, kv_lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    tol = TOL[q.dtype]
    if ref_out.numel():
        assert _rel(out, ref_out) < tol, _rel(out, ref_out)
        assert _rel(lse, ref_lse) < tol, _rel(lse, ref_lse)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd", [64, 80, 96, 128])
def test_forward_against_float64_reference(dtype, hd):
    q, k, v = _inputs(B=2, H=14, Hkv=2, T=9, V=131, hd=hd, dtype=dtype, seed=hd)
    _check_forward(q, k, v, torch.tensor([131, 70]))


@pytest.mark.parametrize("T, V", [(1, 2916), (1, 729), (64, 200)])
def test_decode_split_kv_path(T, V):
    """Few query rows: the keys are split over the threads and merged through the log-sum-exp."""
    torch.set_num_threads(max(2, torch.get_num_threads()))
    q, k, v = _inputs(B=1, H=2, Hkv=1, T=T, V=V, hd=64, seed=V)
    _check_forward(q, k, v, torch.tensor([V - 5]))


def test_zero_length_sample_is_zero_with_minus_inf_lse_and_zero_grads():
    q, k, v = _inputs(B=3, T=4, V=20, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    lens = torch.tensor([20, 0, 7])
    out, lse = torch.ops.visor.cross_attention(q, k, v, lens, 0.125)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    out.square().sum().backward()
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)
    assert torch.all(k.grad[2, :, 7:] == 0) and k.grad[2, :, :7].abs().sum() > 0


def test_kv_lens_beyond_v_are_clamped():
    q, k, v = _inputs(B=2, V=11)
    a = torch.ops.visor.cross_attention(q, k, v, torch.tensor([99, 11]), 0.1)[0]
    b = torch.ops.visor.cross_attention(q, k, v, None, 0.1)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_against_float64_reference(dtype):
    q, k, v = _inputs(B=2, H=6, Hkv=2, T=7, V=90, hd=64, dtype=dtype, seed=3)
    lens = torch.tensor([90, 41])
    gout = torch.randn(q.shape, dtype=torch.float64)
    glse = torch.randn(q.shape[:3], dtype=torch.float64)
    grads = []
    for fn, inputs in ((lambda *a: torch.ops.visor.cross_attention(*a, lens, 0.125), [q, k, v]),
                       (lambda *a: cross_attention_reference(*a, lens, 0.125), [t.double() for t in (q, k, v)])):
        inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
        out, lse = fn(*inputs)
        ((out.double() * gout).sum() + (lse.double() * glse).sum()).backward()
        grads.append([t.grad for t in inputs])
    for got, ref in zip(*grads):
        assert got.dtype == dtype
        assert _rel(got, ref) < TOL[dtype], _rel(got, ref)


@pytest.mark.parametrize("with_lens", [False, True])
def test_gradcheck_float64(with_lens):
    q, k, v = _inputs(B=2, H=4, Hkv=2, T=3, V=9, hd=8, dtype=torch.float64, seed=5)
    lens = torch.tensor([9, 4]) if with_lens else None
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.visor.cross_attention(a, b, c, lens, 0.3), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    q, k, v = _inputs(B=2, H=4, Hkv=2, T=3, V=70, hd=16, dtype=dtype, seed=7)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.visor.cross_attention.default, (q, k, v, torch.tensor([70, 3]), 0.25))
    torch.library.opcheck(torch.ops.visor.cross_attention.default, (q, k, v, None, 0.25))


def test_bad_inputs_are_clear_errors():
    q, k, v = _inputs(H=3, Hkv=2)
    with pytest.raises(RuntimeError, match="not a multiple"):
        torch.ops.visor.cross_attention(q, k, v, None, 1.0)
    q, k, v = _inputs()
    with pytest.raises(RuntimeError, match="kv_lens must be"):
        torch.ops.visor.cross_attention(q, k, v, torch.tensor([1, 2, 3]), 1.0)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.visor.cross_attention(q, k.double(), v, None, 1.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 3), Hkv=st.integers(1, 2), ratio=st.sampled_from([1, 2, 7]), T=st.integers(1, 40),
       V=st.integers(1, 150), hd=st.sampled_from([8, 24, 64]), transposed=st.booleans(), data=st.data())
def test_property_shapes(B, Hkv, ratio, T, V, hd, transposed, data):
    """T = 1, V = 1, V not a multiple of the block, GQA 1/2/7, padding and empty samples, views, B = 0."""
    H = Hkv * ratio
    seed = data.draw(st.integers(0, 2**16))
    q, k, v = _inputs(B=B, H=H, Hkv=Hkv, T=T, V=V, hd=hd, seed=seed)
    if transposed:  # (B, S, heads, hd) storage viewed as (B, heads, S, hd): not contiguous
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    lens = None
    if data.draw(st.booleans()) and B > 0:
        lens = torch.tensor(data.draw(st.lists(st.integers(0, V), min_size=B, max_size=B)))
    _check_forward(q, k, v, lens)


def test_torch_compile_aot_eager_has_no_graph_break():
    q, k, v = _inputs(T=4, V=33)

    def f(q, k, v):
        out, lse = torch.ops.visor.cross_attention(q, k, v, None, 0.125)
        return out.sum() + lse.sum()

    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    compiled(*qs).backward()
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    f(*ref).backward()
    for a, b in zip(qs, ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hd", [64, 80, 96, 128])
@pytest.mark.parametrize("T, V", [(1, 2916), (1, 37), (64, 729), (256, 1000)])
def test_cuda_forward_against_float64_reference(dtype, hd, T, V):
    q, k, v = _inputs(B=2, H=14, Hkv=2, T=T, V=V, hd=hd, dtype=dtype, device="cuda", seed=T + V)
    _check_forward(q, k, v, torch.tensor([V, max(0, V - 17)], device="cuda"))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, V", [(7, 90), (64, 300)])
def test_cuda_backward_against_float64_reference(dtype, T, V):
    q, k, v = _inputs(B=2, H=14, Hkv=2, T=T, V=V, hd=64, dtype=dtype, device="cuda", seed=11)
    lens = torch.tensor([V, V // 2], device="cuda")
    gout = torch.randn(q.shape, dtype=torch.float64)
    glse = torch.randn(q.shape[:3], dtype=torch.float64)
    grads = []
    for fn, inputs in ((lambda *a: torch.ops.visor.cross_attention(*a, lens, 0.125), [q, k, v]),
                       (lambda *a: cross_attention_reference(*a, lens.cpu(), 0.125), [t.double().cpu() for t in (q, k, v)])):
        inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
        out, lse = fn(*inputs)
        ((out.double().cpu() * gout).sum() + (lse.double().cpu() * glse).sum()).backward()
        grads.append([t.grad for t in inputs])
    for got, ref in zip(*grads):
        assert _rel(got, ref) < TOL[dtype], _rel(got, ref)


@pytest.mark.gpu
@cuda
def test_cuda_gradcheck_and_opcheck():
    q, k, v = _inputs(B=2, H=4, Hkv=2, T=3, V=40, hd=64, dtype=torch.float64, device="cuda", seed=13)
    lens = torch.tensor([40, 0], device="cuda")
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.visor.cross_attention(a, b, c, lens, 0.3), inputs)
    torch.library.opcheck(torch.ops.visor.cross_attention.default, (q, k, v, lens, 0.3))
