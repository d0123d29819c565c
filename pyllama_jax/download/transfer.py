"""Moving bytes over HTTP: requests (with a Range to resume), retries with backoff, worker threads that a
Ctrl-C does not wait for, and progress bars."""
from __future__ import annotations

import http.client
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm import tqdm

from pyllama_jax.download.errors import DownloadError

_RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}
# Failures worth another attempt: refused/reset connections, stalls (TimeoutError), short bodies.
TRANSIENT = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
CHUNK = 1 << 20
T, R = TypeVar("T"), TypeVar("R")


class Incomplete(ConnectionError):
    """The server closed the connection before sending Content-Length bytes."""


class Cancelled(Exception):
    """The user interrupted the run; the ``.part`` file is kept for the next one."""


def redact(url: str) -> str:
    """The URL without its query, which for presigned URLs holds the signature."""
    return url.split("?", 1)[0]


def size_text(n: int | None) -> str:
    return "unknown" if n is None else tqdm.format_sizeof(n, "B")


def open_url(url: str, timeout: float, *, method: str = "GET", start: int = 0) -> http.client.HTTPResponse:
    """The response to ``url``, from byte ``start`` on (a Range request) when ``start`` is not 0."""
    headers = {"User-Agent": "pyllama-jax-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=timeout)


def remote_size(url: str, timeout: float) -> int | None:
    """Content-Length from a HEAD request, or None when the server does not tell (or refuses HEAD)."""
    try:
        with open_url(url, timeout, method="HEAD") as resp:
            length = resp.headers.get("Content-Length")
    except TRANSIENT:
        return None
    return int(length) if length and length.isdigit() else None


def parallel(fn: Callable[[T], R], items: Sequence[T], workers: int, cancelled: threading.Event) -> list[R]:
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


class Transfer:
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
            raise Cancelled
        bar.update(n)
        with self.lock:
            self.overall.update(n)

    def close(self) -> None:
        self.overall.close()


def retrying(action: Callable[[], None], rel: str, url: str, retries: int, backoff: float,
             cancelled: threading.Event) -> None:
    """Run ``action``, retrying transient network failures with exponential backoff."""
    for attempt in range(1, retries + 1):
        try:
            return action()
        except urllib.error.HTTPError as e:
            if e.code not in _RETRY_HTTP:
                hint = " (Meta's presigned URLs expire: request a new one)" if e.code == 403 else ""
                raise DownloadError(f"{rel}: HTTP {e.code} {e.reason} from {redact(url)}{hint}") from e
            error: Exception = e
        except TRANSIENT as e:
            error = e
        if attempt < retries and cancelled.wait(min(backoff * 2 ** (attempt - 1), 60.0)):
            raise Cancelled
    raise DownloadError(f"{rel}: gave up after {retries} attempts, last error: {error!r} ({redact(url)})")
