"""pyllama_jax.download against real HTTP servers on 127.0.0.1 (ephemeral ports, threads; no internet).

The Meta-layout server serves a small fake 7B + 13B tree with real md5 checklists and can truncate, corrupt,
stall or 404 chosen files; the Hugging Face test runs the CLI in a subprocess with HF_ENDPOINT pointed at a
stand-in for the four Hub endpoints snapshot_download calls.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

from pyllama_jax import download as dl
from tests.signals import default_sigint, sigint_state

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(timeout=1.0, retries=3, backoff=0.05, workers=3, progress=False)  # bounded: no test can hang
MODELS = ["7B", "13B"]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fake_tree() -> dict[str, bytes]:
    """tokenizer + 7B (1 shard) + 13B (2 shards) with md5sum-format checklists."""
    rng = random.Random(0)
    files = {"tokenizer.model": rng.randbytes(5_000)}
    files["tokenizer_checklist.chk"] = f"{_md5(files['tokenizer.model'])}  tokenizer.model\n".encode()
    for size, shards in (("7B", 1), ("13B", 2)):
        own = {f"consolidated.{i:02d}.pth": rng.randbytes(200_000 + i) for i in range(shards)}
        own["params.json"] = json.dumps({"dim": 64, "n_layers": 2}).encode()
        files.update({f"{size}/{name}": data for name, data in own.items()})
        files[f"{size}/checklist.chk"] = "".join(f"{_md5(d)}  {n}\n" for n, d in own.items()).encode()
    return files


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv, url = self.server, urlsplit(self.path)
        rel = unquote(url.path).lstrip("/")
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((self.command, rel, url.query, rng))
            fault = srv.faults[rel].pop(0) if not head and srv.faults.get(rel) else None
        if rel not in srv.files or rel in srv.missing:
            return self._reply(404, b"not found", head)
        data = srv.files[rel]
        if fault == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and srv.ranges else 0
        if start >= len(data) > 0:
            return self._reply(416, b"", head)
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if fault in ("truncate", "stall"):  # half the body, then hang up / go silent
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if fault == "stall":
                srv.stalling.set()
                srv.release.wait(srv.stall_s)
            return
        self.wfile.write(body)

    def _reply(self, code: int, body: bytes, head: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


class FakeServer(ThreadingHTTPServer):
    """Serves ``files``; ``faults[rel]`` is a queue of one-shot faults for GETs, ``missing`` 404s."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.missing, self.ranges = files, set(), True  # ranges=False: ignore Range, send it all
        self.faults: dict[str, list[str]] = {}
        self.log: list[tuple[str, str, str, str | None]] = []  # (method, rel, query, Range)
        self.lock, self.release, self.stalling = threading.Lock(), threading.Event(), threading.Event()
        self.stall_s = 10.0  # how long a "stall" fault keeps the connection silent
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, rel: str | None = None) -> list[tuple[str, str, str, str | None]]:
        return [e for e in self.log if e[0] == "GET" and rel in (None, e[1])]


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer(fake_tree())
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def assert_complete(folder: Path, files: dict[str, bytes], skip: tuple[str, ...] = ()) -> None:
    for rel, data in files.items():
        if rel not in skip:
            assert (folder / rel).read_bytes() == data, rel
    assert not list(folder.rglob("*.part"))


def has_row(text: str, *cells: str) -> bool:
    """Whether ``text`` has a line with these cells in order, separated by whitespace."""
    return re.search(r"^\s*" + r"\s+".join(map(re.escape, cells)) + r"$", text, re.M) is not None


def test_layout_urls_and_checklists(tmp_path: Path) -> None:
    shards = {g.checklist: len(g.files) - 1 for g in dl.meta_layout(["30B", "65b", "llama-2-70b-chat"])}
    assert shards == {"tokenizer_checklist.chk": 0, "30B/checklist.chk": 4, "65B/checklist.chk": 8,
                      "llama-2-70b-chat/checklist.chk": 8}
    with pytest.raises(dl.DownloadError, match="unknown model '8B'"):
        dl.meta_layout(["8B"])
    assert dl.file_url("https://cdn.example/*?Policy=p&Signature=s", "7B/params.json") == \
        "https://cdn.example/7B/params.json?Policy=p&Signature=s"
    mirror = "http://mirror.example/llama/"
    assert dl.file_url(mirror, "7B/params.json") == "http://mirror.example/llama/7B/params.json"
    chk = tmp_path / "checklist.chk"
    chk.write_text(f"{'a' * 32}  consolidated.00.pth\n{'B' * 32} *params.json\n\n")
    assert dl.read_checklist(chk) == {"consolidated.00.pth": "a" * 32, "params.json": "b" * 32}
    chk.write_text("not a checksum line\n")
    with pytest.raises(dl.DownloadError, match=r"checklist.chk, line 1"):
        dl.read_checklist(chk)


def test_clean_download_with_presigned_url(server: FakeServer, tmp_path: Path) -> None:
    summary = dl.download(f"{server.url}/*?Signature=s3cr3t", tmp_path, MODELS, **FAST)
    assert summary.ok and sorted(summary.downloaded) == sorted(server.files) and not summary.skipped
    assert_complete(tmp_path, server.files)
    assert {q for _, _, q, _ in server.log} == {"Signature=s3cr3t"}


def test_interrupted_download_resumes_with_range_on_next_run(server: FakeServer, tmp_path: Path) -> None:
    rel = "13B/consolidated.01.pth"
    server.faults[rel] = ["truncate"]
    first = dl.download(server.url, tmp_path, MODELS, **{**FAST, "retries": 1})
    assert list(first.failed) == [rel] and "connection closed" in first.failed[rel]
    half = (tmp_path / f"{rel}.part").stat().st_size
    assert 0 < half < len(server.files[rel]) and not (tmp_path / rel).exists()

    second = dl.download(server.url, tmp_path, MODELS, **FAST)
    assert second.ok and second.downloaded == [rel]
    assert server.gets(rel)[-1][3] == f"bytes={half}-"
    assert_complete(tmp_path, server.files)


def test_whole_part_file_is_verified_and_renamed(server: FakeServer, tmp_path: Path) -> None:
    rel = "7B/params.json"  # e.g. killed between the last byte and the rename
    (tmp_path / "7B").mkdir()
    (tmp_path / f"{rel}.part").write_bytes(server.files[rel])
    assert dl.download(server.url, tmp_path, ["7B"], **FAST).ok
    assert [r for *_, r in server.gets(rel)] == [f"bytes={len(server.files[rel])}-"]  # answered 416
    assert_complete(tmp_path, {k: v for k, v in server.files.items() if not k.startswith("13B")})


def test_server_ignoring_range_restarts_the_file(server: FakeServer, tmp_path: Path) -> None:
    rel = "7B/consolidated.00.pth"
    server.faults[rel], server.ranges = ["truncate"], False
    assert dl.download(server.url, tmp_path, ["7B"], **FAST).ok
    assert [r is None for *_, r in server.gets(rel)] == [True, False]  # asked for a Range, got the whole file
    assert (tmp_path / rel).read_bytes() == server.files[rel]


def test_corrupt_file_is_refetched_from_scratch(server: FakeServer, tmp_path: Path) -> None:
    rel = "7B/consolidated.00.pth"
    server.faults[rel] = ["corrupt"]
    summary = dl.download(server.url, tmp_path, MODELS, **FAST)
    assert summary.ok
    assert [r for *_, r in server.gets(rel)] == [None, None]  # second fetch starts over, no Range
    assert_complete(tmp_path, server.files)


def test_file_corrupt_every_time_is_reported(server: FakeServer, tmp_path: Path) -> None:
    rel = "7B/params.json"
    server.faults[rel] = ["corrupt", "corrupt"]
    summary = dl.download(server.url, tmp_path, MODELS, **FAST)
    assert list(summary.failed) == [rel]
    assert f"{rel}: md5" in summary.failed[rel] and "also after a fresh download" in summary.failed[rel]
    assert not (tmp_path / rel).exists() and not (tmp_path / f"{rel}.part").exists()
    assert_complete(tmp_path, server.files, skip=(rel,))


def test_stall_hits_read_timeout_and_resumes(server: FakeServer, tmp_path: Path) -> None:
    rel = "13B/consolidated.00.pth"
    server.faults[rel] = ["stall"]
    start = time.monotonic()
    summary = dl.download(server.url, tmp_path, MODELS, **FAST)
    assert summary.ok and time.monotonic() - start < 5
    ranges = [r for *_, r in server.gets(rel)]
    assert ranges[0] is None and ranges[1] == f"bytes={len(server.files[rel]) // 2}-"
    assert_complete(tmp_path, server.files)


def test_missing_file_fails_clearly_and_keeps_the_rest(server: FakeServer, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    rel = "13B/params.json"
    server.missing.add(rel)
    rc = dl.main(["--model_size", "7B,13B", "--folder", str(tmp_path), "--url", server.url, "--quiet",
                  "--timeout", "1", "--retries", "2"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"FAILED {rel}: HTTP 404 Not Found from {server.url}/{rel}" in out
    assert "downloaded 8, skipped 0 (already complete), failed 1" in out
    assert len(server.gets(rel)) == 1  # a 404 is not retried
    assert_complete(tmp_path, server.files, skip=(rel,))


def test_second_run_skips_everything(server: FakeServer, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYLLAMA_DOWNLOAD_URL", server.url)
    assert dl.main(["--model_size", "7B,13B", "--folder", str(tmp_path), "--quiet"]) == 0
    server.log.clear()
    summary = dl.download(server.url, tmp_path, MODELS, **FAST)
    assert summary.ok and not summary.downloaded and sorted(summary.skipped) == sorted(server.files)
    assert server.log == []  # not even HEAD: complete files are checked against the local checklists


def test_dry_run_lists_files_and_sizes(server: FakeServer, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "data"
    (folder / "7B").mkdir(parents=True)
    (folder / "7B/consolidated.00.pth.part").write_bytes(server.files["7B/consolidated.00.pth"][:50_000])
    assert dl.main(["--model_size", "7B", "--folder", str(folder), "--url", server.url, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert has_row(out, "7B/consolidated.00.pth", "200kB", "resume from 50.0kB")
    assert has_row(out, "tokenizer.model", "5.00kB", "new") and has_row(out, "7B/checklist.chk", "100B", "new")
    assert "needs 155kB more" in out  # 150 000 + 5 000 + params.json + checklists
    assert not server.gets() and [p.name for p in folder.rglob("*")] == ["7B", "consolidated.00.pth.part"]


def test_refuses_to_start_without_disk_space(server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(dl.DownloadError, match=r"not enough disk space in .*needs 60\dkB more, only 1.00kB"):
        dl.download(server.url, tmp_path, MODELS, free_space=lambda path: 1_000, **FAST)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: SimpleNamespace(free=500))
    assert dl.main(["--model_size", "7B", "--folder", str(tmp_path / "new/dir"), "--url", server.url]) == 1
    assert "error: not enough disk space" in capsys.readouterr().err
    assert not server.gets() and not list(tmp_path.iterdir())


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f) -> None:
        self.f = f

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("case", ["read-only", "a file", "disk full"])
def test_unwritable_folder_gives_one_clear_error(case: str, server: FakeServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder, named = tmp_path / "data", tmp_path / "data"
    real_open = open

    def fake_open(file, mode="r", *args, **kwargs):
        if case == "read-only" and set(mode) & set("wax"):  # as root, chmod alone does not stop writes
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f) if case == "disk full" and str(file).endswith(".pth.part") else f

    if case == "a file":
        folder.write_bytes(b"not a folder")
    else:
        folder.mkdir()
    if case == "read-only":
        folder.chmod(0o555)
    if case == "disk full":
        named = folder / "7B/consolidated.00.pth.part"
    monkeypatch.setattr(dl, "open", fake_open, raising=False)
    try:
        with pytest.raises(dl.FolderError, match=re.escape(str(named))):
            dl.download(server.url, folder, ["7B"], **FAST)
        assert dl.main(["--model_size", "7B", "--folder", str(folder), "--url", server.url, "--quiet",
                        "--timeout", "5", "--retries", "2"]) == 1
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(named) in err and "Traceback" not in err


def test_ctrl_c_exits_without_waiting_for_the_read_timeout(server: FakeServer, tmp_path: Path) -> None:
    rel = "7B/consolidated.00.pth"
    server.faults[rel], server.stall_s = ["stall"], 300.0
    proc = subprocess.Popen([sys.executable, "-m", "pyllama_jax.download", "--model_size", "7B", "--folder",
                             str(tmp_path), "--url", server.url, "--quiet", "--timeout", "300"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        assert server.stalling.wait(120), "the download never reached the stalled file"
        state = sigint_state(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=150)  # half the 300 s read timeout: generous on a busy machine
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 150 s after Ctrl-C; before it, the child's {state}") from None
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / rel).exists()


def test_bad_checklist_is_not_kept_and_is_refetched(server: FakeServer, tmp_path: Path) -> None:
    rel = "7B/checklist.chk"
    good = server.files[rel]
    server.files[rel] = good[:20]  # cut inside the first md5
    first = dl.download(server.url, tmp_path, ["7B"], **FAST)
    assert f"{rel}.part, line 1: expected '<md5>  <filename>'" in first.failed[rel]
    assert not (tmp_path / rel).exists()
    server.files[rel] = good
    (tmp_path / rel).write_bytes(b"\x9e" + good[1:])  # a corrupt one left under its final name
    second = dl.download(server.url, tmp_path, ["7B"], **FAST)
    assert second.ok and rel in second.downloaded
    assert_complete(tmp_path, {k: v for k, v in server.files.items() if not k.startswith("13B")})


class _HubHandler(BaseHTTPRequestHandler):
    """The four endpoints huggingface_hub.snapshot_download uses: revision info, tree, resolve (HEAD/GET)."""

    server: HubServer

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv, path = self.server, urlsplit(self.path).path
        srv.log.append((self.command, path, self.headers.get("Authorization")))
        api, resolve = f"/api/models/{srv.repo}/", f"/{srv.repo}/resolve/{srv.sha}/"
        headers = {"Content-Type": "application/json"}
        if path == f"{api}revision/main":
            body = json.dumps({"id": srv.repo, "sha": srv.sha, "siblings": [{"rfilename": f} for f in srv.files]})
        elif path == f"{api}tree/{srv.sha}":
            body = json.dumps([{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                               for f, d in srv.files.items()])
        elif path.startswith(resolve) and (data := srv.files.get(path.removeprefix(resolve))) is not None:
            body, headers = data, {"X-Repo-Commit": srv.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        else:
            body, headers = "{}", {"X-Error-Code": "EntryNotFound"}
        body = body.encode() if isinstance(body, str) else body
        self.send_response(404 if "X-Error-Code" in headers else 200)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    repo, sha = "org/tiny-llama", "0123456789abcdef0123456789abcdef01234567"
    files = {"config.json": b'{"dim": 64}', "model.safetensors": b"\x01" * 4_000, "README.md": b"# tiny"}

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.log: list[tuple[str, str, str | None]] = []


def test_hf_download_through_local_endpoint(tmp_path: Path) -> None:
    hub = HubServer()
    thread = threading.Thread(target=hub.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_TOKEN": "hf_local",
           "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": str(ROOT)}
    args = ["--hf", hub.repo, "--folder", str(tmp_path / "out"), "--revision", "main", "--ignore_patterns", "*.md",
            "--quiet"]
    try:  # both entry points: the script wrapper for the dry run, the module for the download
        dry = subprocess.run([sys.executable, str(ROOT / "scripts/download.py"), *args, "--dry_run"], env=env,
                             capture_output=True, text=True, timeout=30)
        real = subprocess.run([sys.executable, "-m", "pyllama_jax.download", *args], env=env, capture_output=True,
                              text=True, timeout=30)
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(5)
    assert dry.returncode == 0, dry.stderr
    assert has_row(dry.stdout, "model.safetensors", "4.00kB", "new") and "README.md" not in dry.stdout
    assert real.returncode == 0, real.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "out/model.safetensors").read_bytes() == hub.files["model.safetensors"]
    assert {auth for *_, auth in hub.log} == {"Bearer hf_local"}
    assert not any("README" in path for method, path, _ in hub.log if method == "GET")
