"""Which GPU a kernel runs on.

Triton launches a kernel on the *current* CUDA device and that device's current stream, not on
the device its tensors are on (torch ops go by the tensors). With a model on cuda:1 in a process
whose current device is cuda:0 (`--device cuda:1`, `from_pretrained(..., device_map="cuda:1")`),
every kernel would be launched on GPU 0 with GPU 1's pointers: an illegal-address error, or,
with peer access on, a kernel that runs out of order with GPU 1's work. Each public launcher is
wrapped in `on_tensor_device`, which makes its first tensor's device current for the launch.
"""

import functools

import torch


def on_tensor_device(launcher):
    """Run `launcher(x, ...)` with x's CUDA device current (a no-op for CPU tensors, and for x
    on the current device: one comparison per call)."""

    @functools.wraps(launcher)
    def run(x, *args, **kwargs):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(x, *args, **kwargs)
        return launcher(x, *args, **kwargs)

    return run
