"""Resolve a local folder or a Hugging Face hub repo id to a local folder.

Only the files a caller names are fetched (through huggingface_hub and its cache), so asking
for the processor never downloads 15 GB of weights.
"""

from __future__ import annotations

import fnmatch
import json
import os


class HubError(OSError):
    pass


def read_json(path: str, missing_ok: bool = False):
    """The contents of a checkpoint's JSON file; a malformed one is a ValueError that names it.
    missing_ok: a file that is not there reads as {} (the optional ones: processor_config.json, ...)."""
    if missing_ok and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def is_repo_id(name: str) -> bool:
    """'owner/name', as opposed to a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_folder(name_or_path: str | os.PathLike, allow_patterns: list[str], revision: str | None = None,
                   required: list[str] = ()) -> str:
    """Local folder for `name_or_path`: itself if it is a directory, else a hub snapshot of
    the files matching `allow_patterns` (from the local cache when offline). A snapshot without a
    file for each of the `required` patterns is an error that says what is missing (offline, an
    earlier call may have cached only some of the files)."""
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
    how = (f"Connect to the internet once (files are cached under ~/.cache/huggingface), or download it "
           f"elsewhere with `hf download {path}` (`huggingface-cli download` with an older huggingface_hub) "
           "and pass the folder's path instead.")
    try:
        folder = snapshot_download(repo_id=path, revision=revision, allow_patterns=allow_patterns)
        reason = None
    except Exception as first:
        # The hub is unreachable: fall back to whatever the cache holds.
        reason = f"could not fetch {path!r} from the Hugging Face hub ({type(first).__name__}: {first})"
        try:
            folder = snapshot_download(repo_id=path, revision=revision, allow_patterns=allow_patterns,
                                       local_files_only=True)
        except Exception:
            raise HubError(f"{reason} and it is not in the local cache. {how}") from None
    present = [name for _, _, files in os.walk(folder) for name in files]
    missing = [p for p in required if not fnmatch.filter(present, p)]
    if missing:
        from huggingface_hub import constants

        if reason is None and not constants.HF_HUB_OFFLINE:
            raise HubError(f"the hub repo {path!r} has no {', '.join(missing)} file")
        reason = reason or f"HF_HUB_OFFLINE is set for {path!r}"
        raise HubError(f"{reason}, and the local cache holds only part of it (no {', '.join(missing)}). {how}")
    return folder
