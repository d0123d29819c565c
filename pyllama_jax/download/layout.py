"""What a Meta-layout download consists of: its files, their md5 checklists, a plan's items and a run's outcome."""
from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyllama_jax.download.errors import DownloadError

LLAMA1_SHARDS = {"7B": 1, "13B": 2, "30B": 4, "65B": 8}
LLAMA2_SHARDS = {"7b": 1, "13b": 2, "70b": 8}
_LLAMA2_NAME = re.compile(r"llama-2-(7b|13b|70b)(-chat)?")
_MD5 = re.compile(r"[0-9a-fA-F]{32}")

Verify = Callable[[Path], "str | None"]  # what is wrong with a downloaded file, None if nothing


@dataclass(frozen=True)
class Group:
    """Files in one folder verified by that folder's md5 checklist; paths are relative to the download root."""

    checklist: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Item:
    """One file of a plan: remote size (None if unknown) and bytes already on disk."""

    rel: str
    size: int | None
    local: int = 0
    complete: bool = False  # the final name exists: verified, not refetched unless its md5 is wrong

    @property
    def needed(self) -> int:
        return 0 if self.complete or self.size is None else max(self.size - self.local, 0)


@dataclass
class Summary:
    """Outcome of a run: relative paths downloaded or skipped, and failures with their reasons."""

    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # rel -> message naming the file and the reason

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        lines = [f"downloaded {len(self.downloaded)}, skipped {len(self.skipped)} (already complete), "
                 f"failed {len(self.failed)}"]
        lines += [f"  FAILED {why}" for _, why in sorted(self.failed.items())]
        return "\n".join(lines)


def meta_layout(models: Sequence[str]) -> list[Group]:
    """Checklist groups for ``models`` (``7B``..``65B`` or ``llama-2-7b[-chat]``..), tokenizer first."""
    groups = [Group("tokenizer_checklist.chk", ("tokenizer.model",))]
    for name in models:
        if name.upper() in LLAMA1_SHARDS:
            name, shards = name.upper(), LLAMA1_SHARDS[name.upper()]
        elif m := _LLAMA2_NAME.fullmatch(name.lower()):
            name, shards = name.lower(), LLAMA2_SHARDS[m[1]]
        else:
            raise DownloadError(f"unknown model {name!r}: expected one of {', '.join(LLAMA1_SHARDS)} "
                                "or llama-2-7b, llama-2-13b, llama-2-70b (optionally with -chat)")
        shard_files = tuple(f"{name}/consolidated.{i:02d}.pth" for i in range(shards))
        groups.append(Group(f"{name}/checklist.chk", (*shard_files, f"{name}/params.json")))
    return groups


def file_url(base: str, rel: str) -> str:
    """Meta's presigned URL with its ``*`` replaced by ``rel``, or ``rel`` appended to a mirror URL."""
    path = urllib.parse.quote(rel)
    return base.replace("*", path, 1) if "*" in base else f"{base.rstrip('/')}/{path}"


def read_checklist(path: Path) -> dict[str, str]:
    """Parse md5sum output (``<md5>  <name>`` or ``<md5> *<name>`` per line) into {name: md5}."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DownloadError(f"{path}: not a text checklist ({e.reason} at byte {e.start})") from e
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or not _MD5.fullmatch(parts[0]):
            raise DownloadError(f"{path}, line {n}: expected '<md5>  <filename>', got {line!r}")
        sums[parts[1].lstrip("*")] = parts[0].lower()
    if not sums:
        raise DownloadError(f"{path}: empty checklist")
    return sums


def md5sum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def md5_problem(md5: str) -> Verify:
    """A ``verify`` for a fetch: what is wrong with a file that should have this md5, or None."""
    def problem(path: Path) -> str | None:
        got = md5sum(path)
        return None if got == md5 else f"md5 {got} does not match the checklist's {md5}"
    return problem


def checklist_problem(path: Path) -> str | None:
    """A ``verify`` for a fetch: why ``path`` is not a checklist, or None."""
    try:
        read_checklist(path)
    except DownloadError as e:
        return str(e)
    return None
