"""Reading and writing llava-hf checkpoints as raw safetensors.

Three key layouts exist for the same tensors; all are mapped to the legacy hub layout, which is
also our `state_dict()` layout and what `save_pretrained` writes:
  legacy hub files      language_model.model.*, language_model.lm_head.weight, vision_tower.vision_model.*
  transformers v5 file  vision_tower.* (no `vision_model.`), the rest as legacy
  transformers v5 memory model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*,
                        model.image_newline, lm_head.weight
Pickle files (pytorch_model.bin) are never opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import re

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the names save_state_dict (and transformers) write
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Buffers some exporters wrote into checkpoints; they are recomputed, never loaded.
IGNORED = re.compile(r"(\.position_ids|\.rotary_emb\.inv_freq)$")


class CheckpointError(ValueError):
    pass


def weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder, in shard order."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(folder, name)):
                raise CheckpointError(f"{index} lists shard {name}, which is not in {folder}")
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    pickles = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); llava-next never unpickles "
            "files (it can run arbitrary code). Convert them to safetensors first."
        )
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def legacy_key(key: str) -> str:
    """Map a key of any of the three layouts to the legacy hub layout."""
    if key.startswith("model.") and key.split(".")[1] in (
            "language_model", "vision_tower", "multi_modal_projector", "image_newline"):
        key = key[len("model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("language_model.") and not key.startswith(("language_model.model.", "language_model.lm_head.")):
        return "language_model.model." + key[len("language_model."):]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


class LazyCheckpoint:
    """Key -> (file, name) for every tensor in a checkpoint; tensors are read only on demand
    from the memory-mapped files."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self.handles, self.where, self.shapes, self.dtypes = {}, {}, {}, {}  # dtypes: safetensors' names
        for path in files:
            try:
                handle = safe_open(path, framework="pt", device="cpu")
                names = list(handle.keys())
                for name in names:
                    sl = handle.get_slice(name)
                    self.shapes[legacy_key(name)] = tuple(sl.get_shape())
                    self.dtypes[legacy_key(name)] = sl.get_dtype()
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"cannot read {path}: it is truncated or not a safetensors file ({e})") from None
            size = os.path.getsize(path)
            if size < _data_end(path):
                raise CheckpointError(f"{path} is truncated: {size} bytes, its header describes {_data_end(path)}")
            self.handles[path] = handle
            for name in names:
                key = legacy_key(name)
                if key in self.where:
                    raise CheckpointError(f"tensor {key} appears twice ({self.where[key][0]} and {path})")
                self.where[key] = (path, name)

    def keys(self):
        return [k for k in self.where if not IGNORED.search(k)]

    def get(self, key: str) -> torch.Tensor:
        path, name = self.where[key]
        try:
            return self.handles[path].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None

    def float_dtype(self):
        """dtype of the checkpoint's floating tensors (for dtype='auto')."""
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for dt in self.dtypes.values():
            if dt in names:
                return names[dt]
        return torch.float32


def _data_end(path: str) -> int:
    """Byte length the safetensors header promises: 8 + header + the largest data offset."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def check_keys(expected: dict[str, tuple], ckpt: LazyCheckpoint, source: str, optional=()) -> None:
    """Every model tensor present with the right shape and nothing else, or one error naming all.
    `optional` keys may be in the checkpoint or not (they are not read)."""
    found = set(ckpt.keys()) - set(optional)
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_some(unexpected)}")
    for key in sorted(set(expected) & found):
        if tuple(expected[key]) != ckpt.shapes[key]:
            problems.append(f"shape mismatch for {key}: the model expects {tuple(expected[key])}, "
                            f"the checkpoint has {ckpt.shapes[key]}")
        elif ckpt.dtypes[key] not in FLOAT_DTYPES:
            problems.append(f"{key} is {ckpt.dtypes[key]} in the checkpoint; the model's weights are floating "
                            "point (a quantized checkpoint is not supported)")
    if problems:
        raise CheckpointError(f"{source} does not match the model built from its config.json:\n  "
                              + "\n  ".join(problems))


def _some(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB' / '500MB'")
    unit = m.group(2).upper()
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t alone in a contiguous storage: safetensors refuses tensors that share one (e.g. the
    q/k/v weights after fuse_projections, or any view)."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def save_state_dict(state_dict: dict[str, torch.Tensor], folder: str, max_shard_size="5GB") -> list[str]:
    """Write safetensors shards (one file when it fits) plus an index when sharded."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards, current, current_size = [], {}, 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_size + nbytes > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[key] = tensor
        current_size += nbytes
    shards.append(current)
    os.makedirs(folder, exist_ok=True)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # Each file is written beside its final name, then moved over it: a failed save leaves the old
    # file whole, and a model still memory-mapping the old file (loaded from this folder) keeps it.
    for name, shard in zip(names, shards):
        tmp = os.path.join(folder, f".{name}.tmp")
        try:
            save_file({k: _own_storage(v.detach().to("cpu")) for k, v in shard.items()}, tmp,
                      metadata={"format": "pt"})
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)  # no half-written file left behind (it may be gigabytes)
            raise
        os.replace(tmp, os.path.join(folder, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        with open(os.path.join(folder, f".{INDEX_FILE}.tmp"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        os.replace(os.path.join(folder, f".{INDEX_FILE}.tmp"), os.path.join(folder, INDEX_FILE))
    # An older save's weight files would shadow or confuse this one; nothing else in the folder is touched.
    for stale in os.listdir(folder):
        if stale not in names and (stale == SINGLE_FILE or SHARD_FILE.fullmatch(stale)
                                   or (stale == INDEX_FILE and len(shards) == 1)):
            os.remove(os.path.join(folder, stale))
    return names
