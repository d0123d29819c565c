"""What an adversarial client tried: text that is not Unicode, a huge prompt, a port in use. The HTTP
tests serve a tiny random model in-process (nothing is generated, so nothing compiles)."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from typing import Iterator

import pytest

from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.serve import protocol
from pyllama_jax.serve.engine import Engine
from pyllama_jax.serve.openai_api import bind, create_app, serve
from pyllama_jax.serve.process import REPO
from tests.test_serve_api import KEY, health, raw
from tests.test_serve_engine import byte_tokenizer

CONTEXT = 256


class Served:
    """`serve()` on a free 127.0.0.1 port, in a background thread with its own event loop."""

    def __init__(self, engine: Engine):
        sock = bind("127.0.0.1", 0)
        listening = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(serve(create_app(engine, "tiny", KEY), sock, lambda url: listening.set()))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert listening.wait(60), "the server did not start listening"
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        finally:
            self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(30)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def served(tokenizer) -> Iterator[Served]:
    engine = Engine(init_model(preset("tiny", max_seq_len=CONTEXT), seed=1), tokenizer, slots=2).start()
    s = Served(engine)
    yield s
    s.stop()
    engine.close()


SURROGATES = [  # (path, body with a lone surrogate, the field named)
    ("/v1/completions", '{"prompt": "caf\\ud800 au lait"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt"),
    ("/v1/completions", '{"prompt": "ok", "stop": ["\\ud83d"]}', "stop"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages"),
]


@pytest.mark.parametrize("path,body,field", SURROGATES, ids=[f"{p[4:]}-{b[:28]}" for p, b, _ in SURROGATES])
def test_lone_surrogate_is_a_400(served, path, body, field):
    """JSON may spell half a UTF-16 pair ("\\ud800"); that is not text: 400 naming the field, not a 500."""
    status, answer = raw(served, "POST", path, body.encode())
    assert status == 400, answer
    error = answer["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", field)
    assert f"'{field}'" in error["message"] and "lone surrogate" in error["message"]


def test_surrogate_pair_is_text():
    assert protocol.parse_completion(json.loads('{"prompt": "\\ud83d\\ude00"}'), 1)[0] == ["\U0001f600"]


def test_health_answers_while_a_huge_prompt_is_tokenized(served, tokenizer, monkeypatch):
    """/health is answered while a 2 MB prompt is being tokenized: tokenizing holds the encode of that
    prompt until /health has answered (or 60 s pass), so a blocked event loop fails, not a slow one."""
    tokenizing, answered, saw = threading.Event(), threading.Event(), []
    encode = tokenizer.encode

    def gated(text: str, *args, **kwargs) -> list[int]:
        if len(text) > 1 << 20:
            tokenizing.set()
            saw.append(answered.wait(60))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", gated)
    big: list = []
    body = json.dumps({"prompt": "hello world " * 200_000, "max_tokens": 1}).encode()
    thread = threading.Thread(target=lambda: big.append(raw(served, "POST", "/v1/completions", body)), daemon=True)
    thread.start()
    try:
        assert tokenizing.wait(120), "the big prompt was never tokenized"
        assert health(served)["status"] == "ok"
    finally:
        answered.set()
        thread.join(120)
    assert saw == [True], "/health was not answered while the prompt was being tokenized"
    status, answer = big[0]
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"


def test_port_in_use_fails_before_loading_the_model():
    """A taken port: one clear error naming host:port, before the model is loaded, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "serve.py"),
                               f"--config={os.path.join(REPO, 'configs', 'smollm2_135m.py')}",
                               "--config.serve.host=127.0.0.1", f"--config.serve.port={port}"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in out and "in use" in out, out[-2000:]
    assert "Traceback" not in out and "loaded " not in out, out[-2000:]
