"""llava-next: LLaVA-NeXT (LLaVA-1.6) in plain PyTorch with hand-written Triton kernels.

The public names mirror transformers' so that switching is a one-line import change.
Submodules are imported lazily: `import llava_next` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LlavaNextConfig": "llava_next.config",
    "LlavaNextForConditionalGeneration": "llava_next.model",
    "KVCache": "llava_next.kv_cache",
    "LlavaNextImageProcessor": "llava_next.image_processing",
    "LlavaNextTokenizer": "llava_next.tokenizer",
    "LlavaNextProcessor": "llava_next.processing",
    "GenerationConfig": "llava_next.generation_config",
    "GraphedDecode": "llava_next.generation",
    "TextStreamer": "llava_next.generation",
    "TextIteratorStreamer": "llava_next.generation",
    "StopStringCriteria": "llava_next.generation",
    "MaxTimeCriteria": "llava_next.generation",
    "GenerateDecoderOnlyOutput": "llava_next.compat",
    "GenerateBeamDecoderOnlyOutput": "llava_next.compat",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llava_next' has no attribute {name!r}")
