"""Resumable, verified download of LLaMA checkpoints in Meta's layout, or of a Hugging Face repository.

Meta layout: ``tokenizer.model`` and ``tokenizer_checklist.chk``, plus per model ``consolidated.NN.pth``,
``params.json`` and ``checklist.chk`` under a folder named after the model. Models are LLaMA-1 sizes
(``7B``, ``13B``, ``30B``, ``65B``: 1, 2, 4, 8 shards) or LLaMA-2 names as in Meta's own script
(``llama-2-7b``, ``llama-2-13b``, ``llama-2-70b``: 1, 2, 8 shards, each also with ``-chat``). The base URL is
either Meta's emailed presigned URL, whose ``*`` is replaced by the file's relative path, or a plain mirror
URL that the path is appended to.

Each file is written to ``NAME.part`` (resumed with an HTTP Range request, also across runs), checked
against the md5 checklist, and only then renamed to ``NAME``; a mismatch is fetched once more from scratch.
A checklist is parsed before it gets its final name. Stalls hit a read timeout and are retried with
exponential backoff; files run on daemon threads, so Ctrl-C exits at once. A folder that cannot be written
(read-only, a file, a full disk) stops the run with one FolderError naming the path.

``--hf REPO_ID`` hands the job to ``huggingface_hub.snapshot_download`` (token from ``HF_TOKEN`` or the saved
login, mirror from ``HF_ENDPOINT``). This module runs a download and the command line; its parts are
``layout`` (files, checklists), ``transfer`` (HTTP, retries, threads, progress bars), ``disk``, ``hub`` and
``cli``. tests/test_download.py exercises both paths against local HTTP servers,
the Hugging Face one by pointing ``HF_ENDPOINT`` at a stand-in for the few Hub endpoints it calls.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import urllib.error
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pyllama_jax.download.cli import format_plan, parse
from pyllama_jax.download.disk import check_folder, existing, part_path, writing
from pyllama_jax.download.errors import DownloadError, FolderError
from pyllama_jax.download.hub import hf_plan, snapshot
from pyllama_jax.download.layout import (LLAMA1_SHARDS, LLAMA2_SHARDS, Group, Item, Summary, Verify, checklist_problem,
                                         file_url, md5_problem, md5sum, meta_layout, read_checklist)
from pyllama_jax.download.transfer import (CHUNK, Incomplete, Transfer, open_url, parallel, redact, remote_size,
                                           retrying, size_text)

__all__ = ["LLAMA1_SHARDS", "LLAMA2_SHARDS", "DownloadError", "FolderError", "Group", "Item", "Summary", "meta_layout",
           "file_url", "read_checklist", "md5sum", "free_bytes", "check_folder", "remote_size", "plan", "check_space",
           "download", "hf_plan", "hf_download", "format_plan", "main"]

FreeSpace = Callable[[Path], int]


def free_bytes(folder: Path) -> int:
    """Free space on the disk holding ``folder`` (or its nearest existing parent)."""
    return shutil.disk_usage(existing(folder)).free


def _stream(url: str, part: Path, timeout: float, bar: tqdm, transfer: Transfer) -> None:
    """Append the rest of ``url`` to ``part``, asking for a Range when it already holds bytes."""
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = open_url(url, timeout, start=start)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing after `start`: the part is whole (md5 decides)
            return
        raise
    with resp:
        if resp.status != 206:  # a full body: the server ignored (or was not sent) a Range
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        bar.reset(total=total)
        bar.update(start)
        with writing(part), open(part, "ab" if start else "wb") as f:
            while chunk := resp.read1(CHUNK):  # read1: bytes that arrived before a stall are kept
                f.write(chunk)
                transfer.advance(bar, len(chunk))
    if total is not None and part.stat().st_size < total:
        raise Incomplete(f"connection closed after {part.stat().st_size} of {total} bytes")


def _fetch(url: str, dest: Path, verify: Verify, *, rel: str, timeout: float, retries: int, backoff: float,
           transfer: Transfer) -> bool:
    """Make ``dest`` a copy of ``url`` that ``verify`` finds no problem with; return False if it already was.

    A ``.part`` file gets the final name only once verified.
    """
    if dest.exists() and verify(dest) is None:
        return False
    with writing(dest.parent):
        dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    with transfer.file_bar(rel) as bar:
        for fresh in (False, True):  # resume whatever .part holds; if it fails verification start over once
            if fresh:
                part.unlink(missing_ok=True)
            retrying(lambda: _stream(url, part, timeout, bar, transfer), rel, url, retries, backoff,
                     transfer.cancelled)
            if (problem := verify(part)) is None:
                with writing(dest):
                    os.replace(part, dest)
                return True
    part.unlink()
    raise DownloadError(f"{rel}: {problem}, also after a fresh download")


def plan(base_url: str, folder: Path, models: Sequence[str], *, timeout: float = 30.0,
         workers: int = 4) -> list[Item]:
    """What a run would fetch: sizes from HEAD requests, except for files already under their final name."""
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise DownloadError(f"the download URL must start with http:// or https://, got {redact(base_url)!r}")
    folder = Path(folder)
    check_folder(folder)

    def item(rel: str) -> Item:
        dest, part = folder / rel, part_path(folder / rel)
        if dest.exists():
            return Item(rel, dest.stat().st_size, dest.stat().st_size, complete=True)
        local = part.stat().st_size if part.exists() else 0
        return Item(rel, remote_size(file_url(base_url, rel), timeout), local)

    rels = [rel for g in meta_layout(models) for rel in (g.checklist, *g.files)]
    return parallel(item, rels, workers, threading.Event())


def check_space(folder: Path, items: Sequence[Item], free_space: FreeSpace = free_bytes) -> None:
    """Raise DownloadError if ``folder``'s disk cannot take the bytes ``items`` still need."""
    needed, free = sum(i.needed for i in items), free_space(Path(folder))
    if needed > free:
        raise DownloadError(f"not enough disk space in {folder}: the download needs {size_text(needed)} "
                            f"more, only {size_text(free)} is free")


def download(base_url: str, folder: Path, models: Sequence[str], *, workers: int = 4, timeout: float = 30.0,
             retries: int = 5, backoff: float = 1.0, progress: bool = True,
             free_space: FreeSpace = free_bytes) -> Summary:
    """Fetch and verify ``models`` (plus tokenizer) from ``base_url`` into ``folder``.

    Raises DownloadError before fetching anything if the disk lacks room, FolderError if the folder cannot be
    written; other per-file failures land in the returned Summary and leave the other files complete.
    """
    folder, groups = Path(folder), meta_layout(models)
    items = plan(base_url, folder, models, timeout=timeout, workers=workers)
    check_space(folder, items, free_space)
    summary = Summary()
    transfer = Transfer(sum(i.needed for i in items), workers, progress)

    def task(rel: str, verify: Verify) -> None:
        try:
            fetched = _fetch(file_url(base_url, rel), folder / rel, verify, rel=rel, timeout=timeout,
                             retries=retries, backoff=backoff, transfer=transfer)
        except FolderError:
            raise
        except DownloadError as e:
            summary.failed[rel] = str(e)
        else:
            (summary.downloaded if fetched else summary.skipped).append(rel)

    def data_jobs(group: Group) -> list[tuple[str, Verify]]:
        if group.checklist in summary.failed:
            summary.failed.update({rel: f"{rel}: needs {group.checklist} to be verified" for rel in group.files})
            return []
        try:
            sums = read_checklist(folder / group.checklist)
        except DownloadError as e:
            summary.failed.update({rel: f"{rel}: cannot be verified: {e}" for rel in group.files})
            return []
        jobs = []
        for rel in group.files:
            if (md5 := sums.get(PurePosixPath(rel).name)) is None:
                summary.failed[rel] = f"{rel}: not listed in {group.checklist}"
            else:
                jobs.append((rel, md5_problem(md5)))
        return jobs

    try:
        parallel(lambda g: task(g.checklist, checklist_problem), groups, workers, transfer.cancelled)
        parallel(lambda job: task(*job), [job for g in groups for job in data_jobs(g)], workers,
                 transfer.cancelled)
    finally:
        transfer.close()
    return summary


def hf_download(repo_id: str, folder: Path, *, revision: str | None = None,
                allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None,
                progress: bool = True, free_space: FreeSpace = free_bytes) -> Path:
    """Download a Hugging Face repository into ``folder`` after checking the disk has room."""
    check_space(folder, hf_plan(repo_id, folder, revision=revision, allow_patterns=allow_patterns,
                                ignore_patterns=ignore_patterns), free_space)
    return Path(snapshot(repo_id, folder, revision, allow_patterns, ignore_patterns, dry_run=False,
                         progress=progress))


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (``--help``): 0 when every file arrived verified, 1 on a failure, 130 on Ctrl-C."""
    args = parse(argv, __doc__.split("\n\n")[0])
    models = [m.strip() for m in args.model_size.split(",") if m.strip()]
    hf_args = dict(revision=args.revision, allow_patterns=args.allow_patterns, ignore_patterns=args.ignore_patterns)
    try:
        if args.dry_run:
            items = (hf_plan(args.hf, args.folder, **hf_args) if args.hf
                     else plan(args.url, args.folder, models, timeout=args.timeout, workers=args.workers))
            print(format_plan(args.folder, items, free_bytes(args.folder)))
            check_space(args.folder, items)
            return 0
        if args.hf:
            path = hf_download(args.hf, args.folder, progress=not args.quiet, **hf_args)
            print(f"downloaded {args.hf} to {path}")
            return 0
        summary = download(args.url, args.folder, models, workers=args.workers, timeout=args.timeout,
                           retries=args.retries, progress=not args.quiet)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: partial files are kept as *.part; run the same command to resume", file=sys.stderr)
        return 130
    print(summary)
    return 0 if summary.ok else 1
