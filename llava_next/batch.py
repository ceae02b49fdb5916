"""The dict of model inputs that the processor, tokenizer and image processor return."""

import torch


class BatchFeature(dict):
    """Model inputs: a dict with attribute access and `.to()`, like transformers' BatchFeature."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        """`.to("cuda")`, `.to(torch.float16)`, `.to("cuda", torch.float16)`: tensors move to the
        device; only floating tensors take the dtype, so token ids stay integers. In place."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        for key, value in self.items():
            if torch.is_tensor(value):
                cast = dtype if value.is_floating_point() else None
                self[key] = value.to(device=device, dtype=cast, **kwargs)
        return self
