"""Programmatic dependent launch (kernels/pdl.py): where it is switched on, and that a decode step's
kernel chain computes the same bits with it as without.

On CPU the chain test runs the kernels in the interpreter, where PDL never applies (it checks that
PDL never reaches the interpreter). On a GPU of compute capability 9.0 or more (gpu_check.sh) the
kernels are launched with PDL, so in the CUDA graph, where launches come back to back, each may be
placed while the one before it is still running: a kernel that read its input before waiting would
show up as a difference in one of the replays."""

import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from kernel_utils import CUDA, DEVICE, inv_freq, require_interpreter  # noqa: E402

import llava_next.kernels  # noqa: E402,F401  (binds the submodules)
from llava_next.kernels import (decode_attention, decode_linear, rms_norm, rope_decode_attention,  # noqa: E402
                                rope_kv_write, silu_mul)
from llava_next.kernels.decode_linear import _decode_linear_kernel  # noqa: E402

pdl = sys.modules["llava_next.kernels.pdl"]
require_interpreter(_decode_linear_kernel)


def test_pdl_args_only_where_pdl_can_run(monkeypatch):
    """USE_PDL reaches a kernel, and launch_pdl its launch, only when switched on, for a CUDA tensor
    on a device of compute capability >= 9.0; the interpreter never sees either."""
    gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    cpu = torch.zeros(1)
    monkeypatch.setattr(pdl, "_CAPABLE", {})
    for major, want in ((8, dict(USE_PDL=False)), (9, dict(USE_PDL=True, launch_pdl=True))):
        monkeypatch.setattr(pdl, "_CAPABLE", {})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx, major=major: (major, 0))
        monkeypatch.setattr(pdl, "USE_PDL", True)
        assert pdl.pdl_args(gpu) == want
        assert pdl.pdl_args(cpu) == dict(USE_PDL=False)
        monkeypatch.setattr(pdl, "USE_PDL", False)
        assert pdl.pdl_args(gpu) == dict(USE_PDL=False)


def make_layers(n_layers, C, Hq, Hkv, D, inter, Tmax, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale):
        return (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype)

    return [dict(norm1=1 + w(C, scale=0.1), qkv=w((Hq + 2 * Hkv) * D, C, scale=C ** -0.5),
                 o=w(C, Hq * D, scale=(Hq * D) ** -0.5), norm2=1 + w(C, scale=0.1),
                 gate_up=w(2 * inter, C, scale=C ** -0.5), down=w(C, inter, scale=inter ** -0.5),
                 k_cache=w(1, Hkv, Tmax, D, scale=1.0), v_cache=w(1, Hkv, Tmax, D, scale=1.0))
            for _ in range(n_layers)]


def decode_steps(layers, x, positions, Hq, Hkv, D, path):
    """A decoder's one-token steps, as LlamaDecoderLayer runs them: with enable_decode_kernels()
    (every kernel Triton, each one's input the previous one's output) or on the module path
    (cuBLAS products between the Triton kernels; enable_decode_kernels(False))."""
    freqs = inv_freq(D)
    for pos in positions:
        position_ids = pos.view(1, 1)
        for p in layers:
            if path == "decode_kernels":
                qkv = decode_linear(rms_norm(x, p["norm1"], 1e-5), p["qkv"])
            else:
                qkv = torch.nn.functional.linear(rms_norm(x, p["norm1"], 1e-5), p["qkv"])
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(1, 1, Hq, D), k.view(1, 1, Hkv, D), v.view(1, 1, Hkv, D)
            if path == "decode_kernels":
                y = rope_decode_attention(q, k, v, position_ids, freqs, p["k_cache"], p["v_cache"], pos)
                x = decode_linear(y.transpose(1, 2).reshape(1, 1, Hq * D), p["o"], residual=x)
                h = decode_linear(rms_norm(x, p["norm2"], 1e-5), p["gate_up"], gated=True)
                x = decode_linear(h, p["down"], residual=x)
            else:
                q = rope_kv_write(q, k, v, position_ids, freqs, p["k_cache"], p["v_cache"], pos)
                y = decode_attention(q, p["k_cache"], p["v_cache"], q_offset=pos)
                x = x + torch.nn.functional.linear(y.transpose(1, 2).reshape(1, 1, Hq * D), p["o"])
                gate, up = torch.nn.functional.linear(rms_norm(x, p["norm2"], 1e-5), p["gate_up"]).chunk(2, dim=-1)
                x = x + torch.nn.functional.linear(silu_mul(gate, up), p["down"])
    return x


@pytest.mark.parametrize("path", ["decode_kernels", "default"])
def test_decode_chain_same_bits_with_pdl(path, monkeypatch):
    """Several layers of one-token steps, each kernel reading what the previous one wrote (and the
    next step reading the caches this one wrote): the output and the caches are bit for bit those
    of ordinary launches, eagerly and (on a GPU) replayed as a CUDA graph."""
    if CUDA:  # enough programs per kernel to still be running when the next one is placed
        dims, n_layers, n_steps, dtype = dict(C=1024, Hq=8, Hkv=2, D=128, inter=2816, Tmax=1024), 6, 4, torch.bfloat16
    else:
        dims, n_layers, n_steps, dtype = dict(C=32, Hq=4, Hkv=2, D=16, inter=48, Tmax=24), 2, 2, torch.float32
    Hq, Hkv, D = dims["Hq"], dims["Hkv"], dims["D"]
    x = torch.randn(1, 1, dims["C"], generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    positions = [torch.tensor(t, device=DEVICE) for t in range(5, 5 + n_steps)]

    def run(use_pdl):
        monkeypatch.setattr(pdl, "USE_PDL", use_pdl)
        layers = make_layers(n_layers, **dims, dtype=dtype)
        out = decode_steps(layers, x, positions, Hq, Hkv, D, path)
        return out, [t for p in layers for t in (p["k_cache"], p["v_cache"])]

    want, want_caches = run(False)
    out, caches = run(True)
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(caches, want_caches))
    if CUDA:  # stream capture turns the launch attribute into programmatic edges of the graph
        monkeypatch.setattr(pdl, "USE_PDL", True)
        decode_steps(make_layers(n_layers, **dims, dtype=dtype), x, positions, Hq, Hkv, D, path)  # compiled
        layers = make_layers(n_layers, **dims, dtype=dtype)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_steps(layers, x, positions, Hq, Hkv, D, path)
        for replay in range(10):  # a race shows up only sometimes; each replay writes the same values
            graph.replay()  # (the first finds the caches as make_layers left them: capture ran nothing)
            torch.cuda.synchronize()
            assert torch.equal(out, want), replay
            assert all(torch.equal(a, b) for a, b in zip([t for p in layers for t in (p["k_cache"], p["v_cache"])],
                                                          want_caches)), replay


@pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability()[0] >= 9), reason="PDL needs Hopper or later")
def test_pdl_is_really_on_where_it_can_be(monkeypatch):
    """On Hopper the switch reaches the launch: the compiled kernel waits, and was built for PDL
    (so the chain test above did not pass by comparing two ordinary launches)."""
    monkeypatch.setattr(pdl, "USE_PDL", True)
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    args = pdl.pdl_args(x)
    assert args == dict(USE_PDL=True, launch_pdl=True)
    kernel = sys.modules["llava_next.kernels.rms_norm"]._rms_norm_kernel[(3,)](
        x, w, y, x.stride(0), y.stride(0), 3, 256, 1e-5, BLOCK_M=1, BLOCK_N=256, num_warps=1, **args)
    assert kernel.metadata.launch_pdl and "griddepcontrol.wait" in kernel.asm["ptx"]
    torch.testing.assert_close(y, rms_norm(x, w, 1e-5))
