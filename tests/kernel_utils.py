"""What the kernel tests share: device, dtypes, tolerances, and a check that the kernels really
run in Triton's interpreter on CPU (conftest.py switches it on before triton is imported)."""

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter computes bf16 wrongly, so bf16 is tested on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def require_interpreter(kernel) -> None:
    """Fail the module when a CPU run would call compiled kernels (TRITON_INTERPRET set too late)."""
    if not CUDA and type(kernel).__name__ != "InterpretedFunction":
        pytest.fail("llava_next.kernels was imported before TRITON_INTERPRET=1 was set; set it in the "
                    "environment (or tests/conftest.py) so the kernels run under the interpreter on CPU",
                    pytrace=False)


def assert_matches_reference(out, ref, like) -> None:
    """A kernel's output against its fp32 reference: same shape and dtype as `like`, no NaN,
    within the dtype's tolerance."""
    assert out.shape == like.shape and out.dtype == like.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, **TOL[like.dtype])


def inv_freq(D, theta=10000.0):
    """Rotary inverse frequencies (D/2,) fp32, as the model computes them."""
    return 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=DEVICE) / D)


def qkv_views(B, T, Hq, Hkv, D, dtype, seed=0):
    """q (B, T, Hq, D), k, v (B, T, Hkv, D) as column slices of one fused projection output."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    return q.view(B, T, Hq, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
