"""Triton kernels for generation on a GPU, each beside its launcher and a plain-PyTorch reference.

    flash_attention   prefill / vision attention (causal or not, GQA, padding, sliding window)
    decode_attention  one query token over a static KV cache (split-K flash-decoding)
    rope_decode_attention  rope_kv_write folded into decode_attention (one new token a row)
    decode_linear     a few rows times a weight, with the SiLU-mul of gate/up or a residual add fused after
    rope_kv_write     rotary on q and k fused with the KV-cache write
    rms_norm          LlamaRMSNorm
    silu_mul          the SwiGLU activation (the decoder's MLP)
    quick_gelu        x * sigmoid(1.702 x) (the vision tower's MLP)

On CPU the kernels run only under the Triton interpreter: TRITON_INTERPRET=1 must be in the
environment before this package is first imported (triton.jit reads it when a kernel is
defined). `triton_available()` says whether the kernels can run here.
"""

import importlib.util
import os

__all__ = [
    "triton_available",
    "flash_attention", "flash_attention_reference",
    "decode_attention", "decode_attention_reference",
    "rope_decode_attention", "rope_decode_attention_reference",
    "decode_linear", "decode_linear_reference",
    "rope_kv_write", "rope_kv_write_reference",
    "rms_norm", "rms_norm_reference",
    "silu_mul", "silu_mul_reference",
    "quick_gelu", "quick_gelu_reference",
]


def triton_available() -> bool:
    """True when triton is installed and there is something to run it on: a CUDA GPU, or the
    interpreter (TRITON_INTERPRET=1) for CPU tensors."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def _check_interpreter():
    """Triton's interpreter before 3.7 breaks on numpy >= 2.4 (it converts 1-element arrays to
    Python ints, which numpy 2.4 refuses: "only 0-dimensional arrays can be converted to Python
    scalars"). Compiled kernels on a GPU are not affected; say so here rather than fail inside
    a kernel."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton

    def version(v):
        return tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise RuntimeError(
            f"TRITON_INTERPRET=1 with triton {triton.__version__} and numpy {numpy.__version__}: Triton's "
            "interpreter before 3.7 fails on numpy >= 2.4. Install triton>=3.7 or numpy<2.4 to run the "
            "kernels on CPU.")


if importlib.util.find_spec("triton") is not None:
    _check_interpreter()
    # Imported eagerly (and after the submodules are bound) so that `llava_next.kernels.rms_norm`
    # is always the function, never the submodule of the same name.
    from .decode_attention import (decode_attention, decode_attention_reference, rope_decode_attention,
                                   rope_decode_attention_reference)
    from .decode_linear import decode_linear, decode_linear_reference
    from .flash_attention import flash_attention, flash_attention_reference
    from .rms_norm import rms_norm, rms_norm_reference
    from .rope_kv_write import rope_kv_write, rope_kv_write_reference
    from .activations import quick_gelu, quick_gelu_reference, silu_mul, silu_mul_reference
else:  # no triton (macOS, Windows): the names exist and say why they cannot run

    def _missing(name):
        def fn(*args, **kwargs):
            raise RuntimeError(f"llava_next.kernels.{name} needs triton (pip install triton, Linux only); "
                               "use the 'sdpa' or 'eager' attention instead")

        fn.__name__ = name
        return fn

    for _name in __all__[1:]:
        globals()[_name] = _missing(_name)
