"""Compile every kernel for Hopper (sm_90) without a GPU and report what the compiler made of it.

The Triton interpreter runs kernels as numpy and forgives things the compiler does not (a
constexpr computed from a runtime int, say). This script compiles the kernels the way a launch
on an H100 would (strides of 1 as constants, 16-byte alignment hints) and prints, per variant,
registers, spills, shared memory, whether the loads are pipelined (cp.async, or the copy engine:
tma), whether the dots run on wgmma and whether the kernel waits for its predecessor (pdl: the
griddepcontrol instructions of a programmatic dependent launch, kernels/pdl.py). It needs triton's bundled ptxas/cuobjdump, not a driver.

    python scripts/check_kernels_compile.py           # all variants
    python scripts/check_kernels_compile.py --quick   # one variant per kernel
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from llava_next.kernels import decode_attention as _da  # noqa: E402,F401  (binds the submodules)

da = sys.modules["llava_next.kernels.decode_attention"]
fa = sys.modules["llava_next.kernels.flash_attention"]
rk = sys.modules["llava_next.kernels.rope_kv_write"]
rn = sys.modules["llava_next.kernels.rms_norm"]
act = sys.modules["llava_next.kernels.activations"]
dl = sys.modules["llava_next.kernels.decode_linear"]

TARGET = GPUTarget("cuda", 90, 32)
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FLOAT_ARGS = {"qk_scale", "eps", "attn_scaling"}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(jitfn, pointers, constexprs, num_warps, num_stages=3, divisible=(), pdl=False):
    """Compile as a real launch would specialize it: head-dim strides == 1 become constants,
    pointers, the other strides and the ints named in `divisible` carry the divisible-by-16 hint.
    pdl: as launched with programmatic dependent launch (USE_PDL in a kernel that takes part)."""
    sig, consts, attrs = {}, dict(constexprs), {}
    if "USE_PDL" in jitfn.arg_names:
        consts.setdefault("USE_PDL", pdl)
    for i, name in enumerate(jitfn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride_") and (name.endswith("d") or name == "stride_maskn"):
            sig[name], consts[name] = "constexpr", 1
        elif name.startswith("stride_"):
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
            if name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=jitfn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl))


def pdl_wait(ptx) -> str:
    """'yes' where the kernel waits for its predecessor (griddepcontrol.wait) before its first
    access to memory another kernel may write (any load, store or atomic that is not to
    parameters, shared, local or constant memory; any async copy), 'LATE' where such an access
    comes first (a race under PDL), 'no' without a wait."""
    wait = ptx.find("griddepcontrol.wait")
    if wait < 0:
        return "no"
    first = re.search(r"\b(ld|st|atom|red)\.(?!param|shared|local|const)|\bcp\.(reduce\.)?async", ptx)
    return "yes" if first is None or wait < first.start() else "LATE"


def report(label, kernel):
    ptx = kernel.asm["ptx"]
    usage = "?"
    cuobjdump = os.path.join(BIN, "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        usage = " ".join(w for line in out.splitlines() if "REG:" in line for w in line.split() if w.split(":")[0] in ("REG", "STACK", "LOCAL"))
    print(f"{label:<58} {usage:<24} smem={kernel.metadata.shared // 1024:>4} KiB  "
          f"wgmma={'yes' if 'wgmma.mma_async' in ptx else 'no ':<3} mma.sync={'yes' if 'mma.sync' in ptx else 'no ':<3} "
          f"cp.async={'yes' if 'cp.async.ca' in ptx or 'cp.async.cg' in ptx else 'no '} "
          f"tma={'yes' if 'cp.async.bulk.tensor' in ptx else 'no '} pdl={pdl_wait(ptx)}")


def attn(dtype, D, causal=True, window=False, mask=False, offset_ptr=False, config=None, tma=False):
    block_d = max(16, triton.next_power_of_2(D))
    cfg = dict(config or fa._fwd_config(block_d, 4096, TORCH_DTYPES[dtype], torch.device("cuda"), tma))
    bm, bn, w, s = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("num_warps"), cfg.pop("num_stages")
    desc = f"tensordesc<{dtype}[1,1,{bn},{D}]>" if tma else "*" + dtype
    ptrs = dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype, Out="*" + dtype, Lse="*fp32", KvMask="*u8", QOffset="*i64",
                KDesc=desc, VDesc=desc)
    consts = dict(HEAD_DIM=D, CAUSAL=causal, HAS_WINDOW=window, HAS_KV_MASK=mask, OFFSET_FROM_PTR=offset_ptr,
                  STORE_LSE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", USE_TMA=tma)
    label = (f"flash {dtype} D{D} {'causal' if causal else 'full'}{' window' if window else ''}"
             f"{' kv_mask' if mask else ''}{' TMA' if tma else ''} BM{bm} BN{bn} w{w} s{s}")
    report(label, compile_kernel(fa._attn_fwd_kernel, ptrs, consts, w, s))


def decode(dtype, D, group, window=False, mask=False, new_kv=False, pdl=False):
    block_n = 32 if dtype == "fp32" else 64
    ptrs = dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype, KvMask="*u8", QOffset="*i64", PartO="*fp32", PartLse="*fp32",
                KNew="*" + dtype, VNew="*" + dtype, PosIds="*i64", InvFreq="*fp32")
    consts = dict(HEAD_DIM=D, HAS_WINDOW=window, HAS_KV_MASK=mask, OFFSET_FROM_PTR=True, NEW_KV=new_kv,
                  BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
                  BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    label = (f"decode split {dtype} D{D} group{group}{' window' if window else ''}{' kv_mask' if mask else ''}"
             f"{' +rope/cache write' if new_kv else ''}{' PDL' if pdl else ''} BN{block_n}")
    report(label, compile_kernel(da._decode_split_kernel, ptrs, consts, 4, 3, pdl=pdl))


def linear(M, N, K, gated=False, bias=False, residual=False, config=None, pdl=False):
    cfg = dict(config or dl._config(M, N, K, gated, torch.bfloat16, torch.device("cuda")))
    bm, bn, bk, w, s = (cfg.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
    ptrs = {name: "*bf16" for name in ("X", "W", "Bias", "Res", "Y")}
    consts = dict(GATED=gated, HAS_BIAS=bias, HAS_RESIDUAL=residual, EVEN_K=K % bk == 0,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION="tf32")
    name = (" gated" if gated else "") + (" +bias" if bias else "") + (" +residual" if residual else "") + (" PDL" if pdl else "")
    consts.update({n: 1 for n, v in (("M", M), ("N", N), ("K", K)) if v == 1})  # as a launch specializes 1
    report(f"decode_linear bf16 M{M} N{N} K{K}{name} BM{bm} BN{bn} BK{bk} w{w} s{s}",
           compile_kernel(dl._decode_linear_kernel, ptrs, consts, w, s, divisible=("N", "K"), pdl=pdl))


def _sm_count_h100(device):
    return 132


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    quick = p.parse_args().quick
    print(f"triton {triton.__version__}, target sm_90")
    attn("bf16", 128)
    attn("bf16", 128, tma=True)
    attn("bf16", 64, causal=False)
    if not quick:
        attn("fp16", 128, window=True, mask=True, offset_ptr=True)
        attn("bf16", 80)
        attn("bf16", 96)
        attn("fp16", 40)
        attn("fp32", 128)
        attn("bf16", 256)
        attn("bf16", 128, config=dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3))
        attn("bf16", 128, config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), tma=True)
        attn("bf16", 64, causal=False, tma=True)
    bwd_ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", Lse="*fp32", Delta="*fp32", DK="*bf16", DV="*bf16",
                    DQ="*bf16", KvMask="*u8", QOffset="*i64")
    flags = dict(HEAD_DIM=128, CAUSAL=True, HAS_WINDOW=False, HAS_KV_MASK=False, OFFSET_FROM_PTR=False, BLOCK_D=128,
                 DOT_PRECISION="tf32")
    cfg_kv, cfg_q = fa._bwd_config(torch.bfloat16, torch.device("cuda"))
    for name, fn, cfg in (("dk/dv", fa._attn_bwd_dkdv_kernel, cfg_kv), ("dq", fa._attn_bwd_dq_kernel, cfg_q)):
        ptrs = {k: v for k, v in bwd_ptrs.items() if k in fn.arg_names}
        consts = dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        report(f"flash bwd {name} bf16 D128 causal BM{cfg['BLOCK_M']} BN{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}",
               compile_kernel(fn, ptrs, consts, cfg["num_warps"], cfg["num_stages"]))
    decode("bf16", 128, 4)
    decode("bf16", 128, 4, new_kv=True)
    if not quick:
        decode("bf16", 128, 4, mask=True, new_kv=True)
        decode("bf16", 128, 1, window=True, mask=True)
        decode("fp32", 40, 2)
    decode("bf16", 128, 4, mask=True, new_kv=True, pdl=True)  # enable_decode_kernels() with PDL
    for pdl in (False, True):  # the decode step's small kernels, then as launched with PDL
        tag = " PDL" if pdl else ""
        report("decode reduce bf16 D128" + tag, compile_kernel(
            da._decode_reduce_kernel, dict(PartO="*fp32", PartLse="*fp32", Out="*bf16"), dict(BLOCK_S=32, BLOCK_D=128),
            4, pdl=pdl))
        report("rope_kv_write bf16 H32/8 D128" + tag, compile_kernel(
            rk._rope_kv_write_kernel,
            dict(Q="*bf16", K="*bf16", V="*bf16", PosIds="*i64", InvFreq="*fp32", KCache="*bf16", VCache="*bf16",
                 QOut="*bf16", CachePos="*i64"),
            dict(POS_FROM_PTR=True, BLOCK_T=1, BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_F=64), 4, pdl=pdl))
        report("rms_norm bf16 N4096" + tag, compile_kernel(
            rn._rms_norm_kernel, dict(X="*bf16", W="*bf16", Y="*bf16"), dict(BLOCK_M=1, BLOCK_N=4096), 16, pdl=pdl))
    dl._sm_count = _sm_count_h100  # the configs ask the device; compile as for an H100 / H200
    linear(1, 14336, 4096, gated=True)  # mistral-7b gate/up with the SiLU-mul
    linear(1, 14336, 4096, gated=True, pdl=True)
    linear(1, 1, 4096, gated=True, pdl=True)  # N == 1: Triton makes it a constant
    if not quick:
        linear(1, 6144, 4096)  # q/k/v
        linear(1, 4096, 4096, residual=True)  # o_proj + residual
        linear(1, 4096, 14336, residual=True)  # down + residual
        linear(8, 4096, 14336, residual=True)
        linear(32, 32000, 4096, bias=True)
        linear(64, 20480, 7168, gated=True)  # 34b gate/up, many rows: the stage cap on shared memory
        # every tile the GPU's autotuner may pick (decode_linear._TUNED_CONFIGS), on the widest
        # shape it sees by default: gated, 8 rows (AUTO_DECODE_ROWS); a candidate that spills or
        # does not fit would only show on the GPU, mid-autotune
        for c in dl._TUNED_CONFIGS:
            linear(8, 14336, 4096, gated=True, config=dict(BLOCK_M=16, **c.kwargs, num_warps=c.num_warps,
                                                           num_stages=c.num_stages))
    report("silu_mul bf16", compile_kernel(act._silu_mul_kernel, dict(G="*bf16", U="*bf16", Y="*bf16"), dict(BLOCK_N=1024), 4))
    report("quick_gelu bf16", compile_kernel(act._quick_gelu_kernel, dict(X="*bf16", Y="*bf16"), dict(BLOCK_N=1024), 4))


if __name__ == "__main__":
    main()
