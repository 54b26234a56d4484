import subprocess
import sys

import pytest
import torch

from src.ops.extension import extension_available
from src.ops.layer_skip import gather_rows, gather_rows_reference, scatter_add_rows, scatter_add_rows_reference

needs_ext = pytest.mark.skipif(not extension_available(), reason="C++ extension not built")


def _inputs(N=9, K=4, D=33, dtype=torch.float32, device="cpu", dup=True):
    x = torch.randn(N, D, dtype=dtype, device=device)
    index = torch.tensor([1, 5, 1, 8][:K] if dup else [0, 2, 4, 6][:K], device=device)
    delta = torch.randn(K, D, dtype=dtype, device=device)
    return x, index, delta


@needs_ext
def test_extension_is_used_and_matches_reference():
    x, index, delta = _inputs()
    out = torch.ops.visor.scatter_add_rows(x, index, delta)
    assert torch.allclose(out, scatter_add_rows_reference(x, index, delta), atol=1e-6)
    x2 = x.clone()
    torch.ops.visor.scatter_add_rows(x, index, delta)
    assert torch.equal(x, x2)


@needs_ext
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_scatter_dtypes_against_float64_reference(dtype, tol):
    x, index, delta = _inputs(N=64, K=4, D=300, dtype=torch.float64)
    ref = scatter_add_rows_reference(x, index, delta)
    out = torch.ops.visor.scatter_add_rows(x.to(dtype), index, delta.to(dtype)).double()
    assert ((out - ref).norm() / ref.norm()).item() < tol


@needs_ext
def test_opcheck_and_gradcheck():
    x, index, delta = _inputs(dtype=torch.float64)
    torch.library.opcheck(torch.ops.visor.scatter_add_rows.default, (x, index, delta))
    x.requires_grad_(True)
    delta.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: scatter_add_rows(a, index, b), (x, delta))


@needs_ext
def test_bad_index_is_a_clear_error():
    x, _, delta = _inputs()
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.visor.scatter_add_rows(x, torch.tensor([0, 1, 2, 99]), delta)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.visor.gather_rows(x, torch.tensor([0, -1]))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gather_matches_reference_exactly(dtype):
    x = torch.randn(10, 77, dtype=torch.float64).to(dtype)
    index = torch.tensor([3, 3, 0, 9, 5])
    assert torch.equal(torch.ops.visor.gather_rows(x, index), gather_rows_reference(x, index))
    assert torch.ops.visor.gather_rows(x, index[:0]).shape == (0, 77)


@needs_ext
def test_gather_opcheck_gradcheck_and_skip_round_trip():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 1, 4])
    torch.library.opcheck(torch.ops.visor.gather_rows.default, (x, index))
    assert torch.autograd.gradcheck(lambda a: gather_rows(a, index), (x,))
    # gated skipping as the model uses it: the gathered rows go through a layer, the update goes back
    active = torch.tensor([0, 2, 5])
    out = scatter_add_rows(x, active, torch.tanh(gather_rows(x, active)))
    ref = x.detach().clone()
    ref[active] += torch.tanh(ref[active])
    assert torch.allclose(out, ref)
    assert torch.autograd.gradcheck(lambda a: scatter_add_rows(a, active, torch.tanh(gather_rows(a, active))), (x,))


def test_disable_env_falls_back_to_reference_with_one_warning():
    code = ("import warnings, torch\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    from src.ops.layer_skip import scatter_add_rows\n"
            "    x = torch.zeros(3, 2); out = scatter_add_rows(x, torch.tensor([1, 1]), torch.ones(2, 2))\n"
            "    scatter_add_rows(x, torch.tensor([0]), torch.ones(1, 2))\n"
            "assert out[1].tolist() == [2.0, 2.0], out\n"
            "msgs = [str(m.message) for m in w if 'reference' in str(m.message)]\n"
            "assert len(msgs) == 1, msgs\nprint('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"VISOR_DISABLE_EXT": "1", "PATH": "/usr/bin:/bin"}, cwd=".")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.gpu
@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_layer_skip_cuda_matches_reference():
    x, index, delta = _inputs(N=128, K=4, D=257)
    out = torch.ops.visor.scatter_add_rows(x.cuda(), index.cuda(), delta.cuda()).cpu()
    assert torch.allclose(out, scatter_add_rows_reference(x, index, delta), atol=1e-5)
    assert torch.equal(torch.ops.visor.gather_rows(x.cuda(), index.cuda()).cpu(), gather_rows_reference(x, index))
    xd = torch.randn(6, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    active = torch.tensor([0, 2, 5], device="cuda")
    torch.library.opcheck(torch.ops.visor.gather_rows.default, (xd, active))
    assert torch.autograd.gradcheck(lambda a: scatter_add_rows(a, active, torch.tanh(gather_rows(a, active))), (xd,))
