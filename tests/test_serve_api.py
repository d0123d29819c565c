"""The OpenAI-compatible server, as a real `scripts/serve.py` process on 127.0.0.1 with SmolLM2,
driven by the `openai` client (and raw HTTP for what a client library would not send)."""
from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import socket
import sys
import tempfile
import time
import urllib.parse

import openai
import psutil
import pytest

from pyllama_jax.serve.process import REPO, ServerProcess

KEY = "test-key"
CONTEXT = 256  # the warmup compiles prefill and decode per cache window (128, 256): 10 programs, not 15 at 512
PROMPT = "The three most important inventions in history are"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
TOKENS = 20
XLA_CACHE = os.path.join(tempfile.gettempdir(), "pyllama-jax-test-xla-cache")  # shared by the serve tests


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--config.serve.slots=8", "--config.serve.max_queue=8", f"--config.serve.context={CONTEXT}"],
                       env={"PYLLAMA_API_KEY": KEY, "JAX_COMPILATION_CACHE_DIR": XLA_CACHE}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(smollm2):
    """The core generator's greedy output (text, finish, completion tokens, prompt tokens) for
    PROMPT and for QUESTION rendered with the chat template."""
    chat_text = smollm2.tokenizer.apply_chat_template(QUESTION)
    out = smollm2.generate([PROMPT, chat_text], max_new_tokens=TOKENS)
    refs = {}
    for name, text, i in (("completion", PROMPT, 0), ("chat", chat_text, 1)):
        eos = out.finish_reasons[i] == "stop"
        refs[name] = (out.texts[i], "stop" if eos else "length", len(out.tokens[i]) + eos,
                      len(smollm2.tokenizer.encode(text)))
    return refs


def raw(server, method: str, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    url = urllib.parse.urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, body, headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data.startswith(b"{") else {"text": data.decode()}


def health(server) -> dict:
    return raw(server, "GET", "/health", key=None)[1]


def wait_until(server, condition, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if condition(h) or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [server.model] == ["smollm2-135m"]
    assert client.models.retrieve(server.model).id == server.model
    assert health(server) == {"status": "ok", "model": server.model, "slots": 8, "active": 0, "queued": 0,
                              "context": CONTEXT}
    status, page = raw(server, "GET", "/", key=None)
    assert status == 200 and "pyllama-jax chat" in page["text"]


def test_greedy_matches_core_generate(client, reference):
    """Completions and chat, plain and streamed, give the core generator's greedy text and counts."""
    text, finish, completion, prompt = reference["completion"]
    r = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=TOKENS, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, completion)
    chunks = list(client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text and chunks[-1].choices[0].finish_reason == finish
    assert sum(bool(c.choices[0].text) for c in chunks) > 5  # tokens arrive one by one

    text, finish, completion, prompt = reference["chat"]
    r = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=TOKENS, temperature=0)
    assert (r.choices[0].message.content, r.choices[0].message.role, r.choices[0].finish_reason) == (
        text, "assistant", finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt, completion)
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert (chunks[-1].choices, chunks[-1].usage.completion_tokens) == ([], completion)


def test_stop_strings(client, reference):
    """A stop string cuts the text right before its first occurrence, streamed or not."""
    full = reference["completion"][0]
    stop = full[len(full) // 2:len(full) // 2 + 4]
    cut = full.find(stop)
    assert 0 < cut < len(full) - 4
    r = client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                  stop=["never appears", stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:cut], "stop")
    chunks = list(client.completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_n_and_seed(client, reference):
    kwargs = dict(model="smollm2-135m", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.95, n=2, seed=7)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1] and texts[0] != texts[1]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert first.usage.prompt_tokens == reference["completion"][3] and first.usage.completion_tokens <= 24


M = "smollm2-135m"
ERRORS = [  # (path, body, status, code, words in the message)
    ("/v1/completions", b'{"model": "smollm2-135m", "prompt": ', 400, "invalid_json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"model": M}, 400, "missing_required_parameter", "'prompt' is required"),
    ("/v1/completions", {"model": M, "prompt": "hi", "max_tokens": "ten"}, 400, "invalid_type",
     "'max_tokens' must be an integer"),
    ("/v1/completions", {"model": M, "prompt": "hi", "temperature": True}, 400, "invalid_type", "must be a number"),
    ("/v1/completions", {"model": M, "prompt": "hi", "temperature": 3}, 400, "invalid_value", "out of range"),
    ("/v1/completions", {"model": M, "prompt": [1, "a"]}, 400, "invalid_type", "'prompt' must be"),
    ("/v1/completions", {"model": M, "prompt": [[10**6]]}, 400, "invalid_value", "outside the vocabulary"),
    ("/v1/completions", {"model": M, "prompt": "hi", "stop": ["a", 3]}, 400, "invalid_value", "'stop'"),
    ("/v1/completions", {"model": M, "prompt": "hi", "bogus": 1}, 400, "unknown_parameter",
     "Unrecognized request argument supplied: bogus"),
    ("/v1/completions", {"model": M, "prompt": "hi", "logprobs": 6}, 400, "invalid_value", "expected 0 to 5"),
    ("/v1/completions", {"model": M, "prompt": "hi", "best_of": 2}, 400, "unsupported_parameter", "not supported"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found", "'gpt-4' does not exist"),
    ("/v1/chat/completions", {"model": M, "messages": []}, 400, "invalid_value", "must not be empty"),
    ("/v1/chat/completions", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value",
     "messages[0]"),
    ("/v1/chat/completions", {"model": M, "messages": "hi"}, 400, "invalid_type", "'messages' must be a list"),
    ("/v1/nothing", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,code,words", ERRORS, ids=[f"{e[2]}-{e[4][:24]}" for e in ERRORS])
def test_bad_requests(server, path, body, status, code, words):
    got, answer = raw(server, "POST", path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got == status
    error = answer["error"]
    assert words in error["message"] and error["code"] == code and error["type"] == "invalid_request_error"


def test_context_limit_in_tokens(client, reference):
    n = reference["completion"][3]  # PROMPT's tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt=PROMPT, max_tokens=600)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    assert (f"prompt ({n} tokens) plus max_tokens (600) is {n + 600} tokens, {n + 600 - CONTEXT} more than this "
            f"model's context of {CONTEXT} tokens") in e.value.body["message"]
    r = client.completions.create(model=M, prompt=PROMPT, max_tokens=CONTEXT - n, temperature=0, stop=" ")
    assert r.choices[0].finish_reason == "stop"  # exactly at the limit is accepted


def test_api_key(server, client):
    assert raw(server, "GET", "/v1/models", key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)


LONG = CONTEXT - 16  # a long request's max_tokens: PROMPT (8 tokens) plus these almost fill the context


def _open_request(server, stream: bool) -> socket.socket:
    """A long request sent over a raw socket that we can drop without reading."""
    url = urllib.parse.urlparse(server.url)
    body = json.dumps({"model": M, "prompt": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": stream}).encode()
    s = socket.create_connection((url.hostname, url.port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def test_queue_full_then_disconnects_free_slots(server, client):
    """8 slots busy + 8 waiting: the next request gets 503; clients that hang up (streaming or not,
    running or waiting) free their places at once."""
    socks = [_open_request(server, stream=i % 2 == 0) for i in range(16)]
    try:
        h = wait_until(server, lambda h: h["active"] == 8 and h["queued"] == 8, 120)
        assert (h["active"], h["queued"]) == (8, 8)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=M, prompt="hi", max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        assert "max_queue=8" in e.value.body["message"]
    finally:
        for s in socks:
            s.close()
    start = time.monotonic()
    h = wait_until(server, lambda h: h["active"] == 0 and h["queued"] == 0, 30)
    assert (h["active"], h["queued"]) == (0, 0), h
    assert time.monotonic() - start < 10  # serving them out: two waves of 240 decode steps, 30 s to over 3 minutes
    assert client.completions.create(model=M, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_load_16_streaming_clients(server):
    """16 concurrent streaming clients, 48 requests: no errors, every response complete, no memory growth."""
    spec = importlib.util.spec_from_file_location("serve_load", os.path.join(REPO, "benchmarks", "serve_load.py"))
    load = sys.modules["serve_load"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(load)
    tokens = 8  # per request (ignore_eos): each one is checked complete, at exactly this many
    run = lambda n: asyncio.run(load.run_clients(server.url, M, KEY, 16, n, max_tokens=tokens, timeout=240))
    warm, wall = run(1)
    assert load.summarize(warm, wall, tokens)["errors"] == 0
    before = psutil.Process(server.pid).memory_info().rss
    outcomes, wall = run(2)
    grown = psutil.Process(server.pid).memory_info().rss - before
    s = load.summarize(outcomes, wall, tokens)
    assert (s["requests"], s["errors"], s["incomplete"]) == (32, 0, 0), [o.error for o in outcomes if o.error][:3]
    assert grown < 32 * 2**20, f"server RSS grew {grown / 2**20:.1f} MiB over 32 requests"
    print(f"16 clients: TTFT p50 {s['ttft_p50']:.2f} s, p99 {s['ttft_p99']:.2f} s, {s['tokens_per_s']:.1f} tokens/s, "
          f"RSS {grown / 2**20:+.1f} MiB")
