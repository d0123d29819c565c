"""A Hugging Face repository's files, listed or fetched by ``huggingface_hub.snapshot_download`` (token from
``HF_TOKEN`` or the saved login, mirror from ``HF_ENDPOINT``)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pyllama_jax.download.errors import DownloadError
from pyllama_jax.download.layout import Item


def hf_plan(repo_id: str, folder: Path, *, revision: str | None = None, allow_patterns: list[str] | None = None,
            ignore_patterns: list[str] | None = None) -> list[Item]:
    """A Hugging Face repository's files and sizes, as ``snapshot_download(dry_run=True)`` reports them."""
    infos = snapshot(repo_id, folder, revision, allow_patterns, ignore_patterns, dry_run=True, progress=False)
    return [Item(i.filename, i.file_size, 0, complete=not i.will_download) for i in infos]


def snapshot(repo_id: str, folder: Path, revision: str | None, allow_patterns: list[str] | None,
             ignore_patterns: list[str] | None, *, dry_run: bool, progress: bool) -> Any:
    """``snapshot_download``'s result (a dry run's file list, or the folder), its errors as DownloadError."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars
    except ImportError as e:
        raise DownloadError("--hf needs huggingface_hub: pip install huggingface_hub") from e
    try:
        with nullcontext() if progress else disable_progress_bars():
            return snapshot_download(repo_id, revision=revision, local_dir=folder, allow_patterns=allow_patterns,
                                     ignore_patterns=ignore_patterns, dry_run=dry_run)
    except (OSError, ValueError) as e:  # the Hub's HTTP, offline and validation errors
        raise DownloadError(f"{repo_id}: {e}") from e
