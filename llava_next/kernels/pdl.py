"""Programmatic dependent launch (PDL, Hopper and later): let a kernel start while the one before
it in the stream is still finishing.

A decode step at batch 1 is a chain of about 260 short kernels (8 a layer with
`enable_decode_kernels()`), each reading its weights once in 10-60 us. Between two kernels the
GPU idles while the first one's last programs drain and the next one is launched and its programs
are placed: 0.3 ms of a 5.3 ms step in the H200 profile (bench/NOTES.md). With PDL the next
kernel is launched early (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, Triton's
`launch_pdl=True`): its programs are placed on the SMs as the previous kernel's free them, and
each one waits in `griddepcontrol.wait` until the previous kernel has completed and its writes
are visible, then runs. The launch and the placement overlap the previous kernel's tail.

The rule that keeps it correct: a kernel launched this way reads or writes no memory before it
has waited. Every kernel here that takes part waits first thing, so each one's completion implies
the completion of every kernel before it, and a kernel that does not take part (cuBLAS, a torch op)
is launched the ordinary way, after its predecessor has completed. The one thing done before the
wait is decode_linear's L2 prefetch of its first weight columns (prefetch_l2): a hint that loads
nothing into registers (and L2 is where every SM's writes land, so it cannot see stale data).
Each kernel signals right after its wait that its dependents may be launched
(`griddepcontrol.launch_dependents`); they are launched once every program of this kernel has
signalled, so they only ever take SM slots this kernel no longer needs.

Off until timed on a GPU (`bench.py --pdl`, bench/NOTES.md). Both instructions are no-ops when a
kernel was launched without the attribute; the interpreter never sees them (USE_PDL is False for
CPU tensors).
"""

import os

import torch
import triton
import triton.language as tl

try:  # triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older triton: never traced, since pdl_args() then keeps USE_PDL False
    gdc_launch_dependents = gdc_wait = None

USE_PDL = os.environ.get("LLAVA_NEXT_PDL", "0") == "1"

_CAPABLE = {}


def pdl_active(device: torch.device) -> bool:
    """Whether kernels launched on `device` get PDL: switched on (USE_PDL), a CUDA device of
    compute capability 9.0 or more, a triton that has it."""
    if not (USE_PDL and device.type == "cuda" and gdc_wait is not None):
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABLE:
        _CAPABLE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _CAPABLE[idx]


def pdl_args(x: torch.Tensor) -> dict:
    """The launch arguments of a kernel that takes part: USE_PDL for its body and, where
    pdl_active, Triton's launch_pdl option."""
    return dict(USE_PDL=True, launch_pdl=True) if pdl_active(x.device) else dict(USE_PDL=False)


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the lines under `ptrs` (a tensor of valid addresses) to be brought into L2, without
    waiting for them or holding registers: what a kernel launched early may read before its wait,
    where the memory does not depend on the kernels before it (a weight matrix)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """First thing in a kernel that takes part: wait until the kernel before it has completed and
    its writes are visible, then let the next one be launched."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
