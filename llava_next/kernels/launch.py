"""Which GPU a kernel runs on, and how many rows a row-wise kernel's program takes.

Triton launches a kernel on the *current* CUDA device and that device's current stream, not on
the device its tensors are on (torch ops go by the tensors). With a model on cuda:1 in a process
whose current device is cuda:0 (`--device cuda:1`, `from_pretrained(..., device_map="cuda:1")`),
every kernel would be launched on GPU 0 with GPU 1's pointers: an illegal-address error, or,
with peer access on, a kernel that runs out of order with GPU 1's work. Each public launcher is
wrapped in `on_tensor_device`, which makes its first tensor's device current for the launch.
"""

import functools
import inspect

import torch


def on_tensor_device(launcher):
    """Run the launcher with its first tensor's CUDA device current (passed by position or by
    name; a no-op for CPU tensors, and for one on the current device: one comparison a call)."""
    first = next(iter(inspect.signature(launcher).parameters))

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        x = args[0] if args else kwargs.get(first)
        if isinstance(x, torch.Tensor) and x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return run


def rows_per_program(device: torch.device) -> int:
    """The rows (or tokens) one program of a row-wise kernel (rms_norm, rope_kv_write) takes: 1 on
    a GPU, the layout timed there; 16 in the interpreter, which runs each tl op as Python once
    per program, so 16x fewer programs run 16x fewer Python ops."""
    return 1 if device.type == "cuda" else 16
