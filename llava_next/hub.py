"""Resolve a local folder or a Hugging Face hub repo id to a local folder.

Only the files a caller names are fetched (through huggingface_hub and its cache), so asking
for the processor never downloads 15 GB of weights.
"""

from __future__ import annotations

import os


class HubError(OSError):
    pass


def is_repo_id(name: str) -> bool:
    """'owner/name', as opposed to a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_folder(name_or_path: str | os.PathLike, allow_patterns: list[str], revision: str | None = None) -> str:
    """Local folder for `name_or_path`: itself if it is a directory, else a hub snapshot of
    the files matching `allow_patterns` (from the local cache when offline)."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise HubError(f"{path} is a file; expected a checkpoint folder or a hub repo id like "
                       "'llava-hf/llava-v1.6-mistral-7b-hf'")
    if not is_repo_id(path):
        raise HubError(f"{path}: no such folder, and it is not a hub repo id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise HubError("huggingface_hub is needed to fetch models by repo id: pip install huggingface_hub") from e
    try:
        return snapshot_download(repo_id=path, revision=revision, allow_patterns=allow_patterns)
    except Exception as first:
        # Offline, or the hub is unreachable: fall back to whatever the cache holds.
        try:
            return snapshot_download(repo_id=path, revision=revision, allow_patterns=allow_patterns,
                                     local_files_only=True)
        except Exception:
            raise HubError(
                f"could not fetch {path!r} from the Hugging Face hub ({type(first).__name__}: {first}) and it is "
                "not in the local cache. Connect to the internet once (files are cached under "
                "~/.cache/huggingface), or download it elsewhere with `huggingface-cli download "
                f"{path}` and pass the folder's path instead."
            ) from None
