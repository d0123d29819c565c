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
login, mirror from ``HF_ENDPOINT``). tests/test_download.py exercises both paths against local HTTP servers,
the Hugging Face one by pointing ``HF_ENDPOINT`` at a stand-in for the few Hub endpoints it calls.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import os
import queue
import re
import shutil
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from tqdm import tqdm

LLAMA1_SHARDS = {"7B": 1, "13B": 2, "30B": 4, "65B": 8}
LLAMA2_SHARDS = {"7b": 1, "13b": 2, "70b": 8}
_LLAMA2_NAME = re.compile(r"llama-2-(7b|13b|70b)(-chat)?")
_MD5 = re.compile(r"[0-9a-fA-F]{32}")
_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}
# Failures worth another attempt: refused/reset connections, stalls (TimeoutError), short bodies.
_TRANSIENT = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
# OSErrors of the local disk, as opposed to the network's.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR,
                errno.EISDIR}
CHUNK = 1 << 20

FreeSpace = Callable[[Path], int]
Verify = Callable[[Path], "str | None"]  # what is wrong with a downloaded file, None if nothing
T, R = TypeVar("T"), TypeVar("R")


class DownloadError(RuntimeError):
    """A file could not be fetched or verified, or the run cannot start; the message says which and why."""


class FolderError(DownloadError):
    """The download folder cannot be written (read-only, a file, a full disk); the message names the path."""


class _Incomplete(ConnectionError):
    """The server closed the connection before sending Content-Length bytes."""


class _Cancelled(Exception):
    """The user interrupted the run; the ``.part`` file is kept for the next one."""


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


def _redact(url: str) -> str:
    """The URL without its query, which for presigned URLs holds the signature."""
    return url.split("?", 1)[0]


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


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest existing parent."""
    path = folder.absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(folder: Path) -> int:
    """Free space on the disk holding ``folder`` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(folder)).free


def check_folder(folder: Path) -> None:
    """Raise FolderError unless ``folder`` is, or can be made, a writable folder."""
    path = _existing(Path(folder))
    if not path.is_dir():
        raise FolderError(f"{path} is a file, not a folder: choose another download folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise FolderError(f"cannot write to {path}: permission denied or a read-only disk")


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Re-raise the local disk's errors (read-only, a file in the way, full) as FolderError naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        raise FolderError(f"cannot write {path}: {e.strerror} (once fixed, rerun to resume)") from e


def _parallel(fn: Callable[[T], R], items: Sequence[T], workers: int, cancelled: threading.Event) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``workers`` daemon threads, which stop taking items once
    ``cancelled`` is set. The first error, or a Ctrl-C of the waiting caller, sets it and is raised at once:
    threads stuck in a network read are not waited for (they end with their read timeout, or the process)."""
    results: list[Any] = [None] * len(items)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)
    done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()

    def work() -> None:
        while not cancelled.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # handed to the caller's thread
                done.put(e)
                return
            done.put(None)

    for _ in range(min(workers, len(items))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for _ in items:
            if (error := done.get()) is not None:
                raise error
    except BaseException:
        cancelled.set()
        raise
    return results


def _size(n: int | None) -> str:
    return "unknown" if n is None else tqdm.format_sizeof(n, "B")


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _open(url: str, timeout: float, *, method: str = "GET", start: int = 0) -> http.client.HTTPResponse:
    headers = {"User-Agent": "pyllama-jax-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=timeout)


def remote_size(url: str, timeout: float) -> int | None:
    """Content-Length from a HEAD request, or None when the server does not tell (or refuses HEAD)."""
    try:
        with _open(url, timeout, method="HEAD") as resp:
            length = resp.headers.get("Content-Length")
    except _TRANSIENT:
        return None
    return int(length) if length and length.isdigit() else None


class _Transfer:
    """State shared by a run's workers: overall and per-file progress bars, and the cancel flag."""

    def __init__(self, total: int, workers: int, enabled: bool):
        self.enabled = enabled
        self.overall = tqdm(total=total, desc="total", unit="B", unit_scale=True, position=0, disable=not enabled)
        self.slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(1, workers + 1):
            self.slots.put(slot)
        self.lock = threading.Lock()
        self.cancelled = threading.Event()

    @contextmanager
    def file_bar(self, rel: str) -> Iterator[tqdm]:
        slot = self.slots.get()
        bar = tqdm(desc=rel, unit="B", unit_scale=True, position=slot, leave=False, disable=not self.enabled)
        try:
            yield bar
        finally:
            bar.close()
            self.slots.put(slot)

    def advance(self, bar: tqdm, n: int) -> None:
        if self.cancelled.is_set():
            raise _Cancelled
        bar.update(n)
        with self.lock:
            self.overall.update(n)

    def close(self) -> None:
        self.overall.close()


def _stream(url: str, part: Path, timeout: float, bar: tqdm, transfer: _Transfer) -> None:
    """Append the rest of ``url`` to ``part``, asking for a Range when it already holds bytes."""
    start = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, timeout, start=start)
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
        with _writing(part), open(part, "ab" if start else "wb") as f:
            while chunk := resp.read1(CHUNK):  # read1: bytes that arrived before a stall are kept
                f.write(chunk)
                transfer.advance(bar, len(chunk))
    if total is not None and part.stat().st_size < total:
        raise _Incomplete(f"connection closed after {part.stat().st_size} of {total} bytes")


def _retrying(action: Callable[[], None], rel: str, url: str, retries: int, backoff: float,
              cancelled: threading.Event) -> None:
    """Run ``action``, retrying transient network failures with exponential backoff."""
    for attempt in range(1, retries + 1):
        try:
            return action()
        except urllib.error.HTTPError as e:
            if e.code not in _RETRY_HTTP:
                hint = " (Meta's presigned URLs expire: request a new one)" if e.code == 403 else ""
                raise DownloadError(f"{rel}: HTTP {e.code} {e.reason} from {_redact(url)}{hint}") from e
            error: Exception = e
        except _TRANSIENT as e:
            error = e
        if attempt < retries and cancelled.wait(min(backoff * 2 ** (attempt - 1), 60.0)):
            raise _Cancelled
    raise DownloadError(f"{rel}: gave up after {retries} attempts, last error: {error!r} ({_redact(url)})")


def _md5_problem(md5: str) -> Verify:
    """A ``verify`` for ``_fetch``: what is wrong with a file that should have this md5, or None."""
    def problem(path: Path) -> str | None:
        got = md5sum(path)
        return None if got == md5 else f"md5 {got} does not match the checklist's {md5}"
    return problem


def _checklist_problem(path: Path) -> str | None:
    """A ``verify`` for ``_fetch``: why ``path`` is not a checklist, or None."""
    try:
        read_checklist(path)
    except DownloadError as e:
        return str(e)
    return None


def _fetch(url: str, dest: Path, verify: Verify, *, rel: str, timeout: float, retries: int, backoff: float,
           transfer: _Transfer) -> bool:
    """Make ``dest`` a copy of ``url`` that ``verify`` finds no problem with; return False if it already was.

    A ``.part`` file gets the final name only once verified.
    """
    if dest.exists() and verify(dest) is None:
        return False
    with _writing(dest.parent):
        dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part(dest)
    with transfer.file_bar(rel) as bar:
        for fresh in (False, True):  # resume whatever .part holds; if it fails verification start over once
            if fresh:
                part.unlink(missing_ok=True)
            _retrying(lambda: _stream(url, part, timeout, bar, transfer), rel, url, retries, backoff,
                      transfer.cancelled)
            if (problem := verify(part)) is None:
                with _writing(dest):
                    os.replace(part, dest)
                return True
    part.unlink()
    raise DownloadError(f"{rel}: {problem}, also after a fresh download")


def plan(base_url: str, folder: Path, models: Sequence[str], *, timeout: float = 30.0,
         workers: int = 4) -> list[Item]:
    """What a run would fetch: sizes from HEAD requests, except for files already under their final name."""
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise DownloadError(f"the download URL must start with http:// or https://, got {_redact(base_url)!r}")
    folder = Path(folder)
    check_folder(folder)

    def item(rel: str) -> Item:
        dest, part = folder / rel, _part(folder / rel)
        if dest.exists():
            return Item(rel, dest.stat().st_size, dest.stat().st_size, complete=True)
        local = part.stat().st_size if part.exists() else 0
        return Item(rel, remote_size(file_url(base_url, rel), timeout), local)

    rels = [rel for g in meta_layout(models) for rel in (g.checklist, *g.files)]
    return _parallel(item, rels, workers, threading.Event())


def check_space(folder: Path, items: Sequence[Item], free_space: FreeSpace = free_bytes) -> None:
    """Raise DownloadError if ``folder``'s disk cannot take the bytes ``items`` still need."""
    needed, free = sum(i.needed for i in items), free_space(Path(folder))
    if needed > free:
        raise DownloadError(f"not enough disk space in {folder}: the download needs {_size(needed)} "
                            f"more, only {_size(free)} is free")


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
    transfer = _Transfer(sum(i.needed for i in items), workers, progress)

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
                jobs.append((rel, _md5_problem(md5)))
        return jobs

    try:
        _parallel(lambda g: task(g.checklist, _checklist_problem), groups, workers, transfer.cancelled)
        _parallel(lambda job: task(*job), [job for g in groups for job in data_jobs(g)], workers,
                  transfer.cancelled)
    finally:
        transfer.close()
    return summary


def hf_plan(repo_id: str, folder: Path, *, revision: str | None = None, allow_patterns: list[str] | None = None,
            ignore_patterns: list[str] | None = None) -> list[Item]:
    """A Hugging Face repository's files and sizes, as ``snapshot_download(dry_run=True)`` reports them."""
    infos = _snapshot(repo_id, folder, revision, allow_patterns, ignore_patterns, dry_run=True, progress=False)
    return [Item(i.filename, i.file_size, 0, complete=not i.will_download) for i in infos]


def hf_download(repo_id: str, folder: Path, *, revision: str | None = None,
                allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None,
                progress: bool = True, free_space: FreeSpace = free_bytes) -> Path:
    """Download a Hugging Face repository into ``folder`` after checking the disk has room."""
    check_space(folder, hf_plan(repo_id, folder, revision=revision, allow_patterns=allow_patterns,
                                ignore_patterns=ignore_patterns), free_space)
    return Path(_snapshot(repo_id, folder, revision, allow_patterns, ignore_patterns, dry_run=False,
                          progress=progress))


def _snapshot(repo_id: str, folder: Path, revision: str | None, allow_patterns: list[str] | None,
              ignore_patterns: list[str] | None, *, dry_run: bool, progress: bool) -> Any:
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


def format_plan(folder: Path, items: Sequence[Item], free: int) -> str:
    """The dry-run report: one line per file, then the space needed against the space free."""
    width = max((len(i.rel) for i in items), default=0)
    lines = [f"would fetch into {folder}:"]
    for i in items:
        state = ("present, verified on download" if i.complete
                 else f"resume from {_size(i.local)}" if i.local else "new")
        lines.append(f"  {i.rel:<{width}}  {_size(i.size):>9}  {state}")
    unknown = sum(i.size is None and not i.complete for i in items)
    extra = f" plus {unknown} file(s) of unknown size" if unknown else ""
    lines.append(f"needs {_size(sum(i.needed for i in items))} more{extra}; {_size(free)} free")
    return "\n".join(lines)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyllama_jax.download", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_size", default="7B",
                   help="comma-separated: 7B,13B,30B,65B or llama-2-7b,llama-2-13b,llama-2-70b (also -chat)")
    p.add_argument("--folder", type=Path, default=Path("pyllama_data"), help="download root (default: %(default)s)")
    p.add_argument("--url", default=os.environ.get("PYLLAMA_DOWNLOAD_URL"),
                   help="Meta's presigned URL (with its '*') or a mirror base URL; default $PYLLAMA_DOWNLOAD_URL")
    p.add_argument("--workers", type=_positive, default=4, help="files fetched in parallel")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    p.add_argument("--retries", type=_positive, default=6, help="attempts per file")
    p.add_argument("--dry_run", action="store_true", help="list files and sizes, fetch nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    hf = p.add_argument_group("Hugging Face (instead of Meta's layout)")
    hf.add_argument("--hf", metavar="REPO_ID", help="download this repository with huggingface_hub")
    hf.add_argument("--revision", help="branch, tag or commit")
    hf.add_argument("--allow_patterns", nargs="+", metavar="GLOB", help="only files matching these")
    hf.add_argument("--ignore_patterns", nargs="+", metavar="GLOB", help="skip files matching these")
    args = p.parse_args(argv)
    if not args.hf and not args.url:
        p.error("no download URL: pass --url or set PYLLAMA_DOWNLOAD_URL (or use --hf REPO_ID)")
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


if __name__ == "__main__":
    sys.exit(main())
