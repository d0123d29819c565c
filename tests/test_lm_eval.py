"""lm-evaluation-harness over pyllama-jax, two ways: our `pyllama_jax` model, and lm-eval's own
`local-completions` model pointed at our OpenAI server (echo + logprobs). Both must give the
loglikelihoods that numpy computes from `Model.logits` of SmolLM2 (tests/lm_eval_task: a
multiple-choice task and a rolling one, with a small window so contexts are left-truncated and
texts span several windows). The server's logprobs, echo and chat logprobs are checked the same way."""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import threading
import urllib.parse

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from pyllama_jax.eval.lm_eval_model import PyllamaLM  # noqa: E402
from pyllama_jax.serve.engine import Engine  # noqa: E402
from pyllama_jax.serve.openai_api import bind, create_app, serve  # noqa: E402

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_task")
WINDOW = 48  # tokens a loglikelihood row may read (and a rolling window's length)
NAME = "smollm2-135m"
PAD = 64  # the reference's one padded length
TOL = 2e-4  # summed over up to 48 float32 log-probabilities


# ---- the independent reference -------------------------------------------------------------------

def log_softmax(model, ids: list[int]) -> np.ndarray:
    """float64 log-softmax of `Model.logits(ids)` `[len(ids), vocab]`, run right-padded to PAD tokens
    (causal attention: what follows a position does not change it) so that it compiles once."""
    assert len(ids) <= PAD
    logits = np.asarray(model.logits(list(ids) + [0] * (PAD - len(ids)))[0, :len(ids)], np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def ll(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) reading at most WINDOW tokens (HF's left truncation), and greedy."""
    row = (context + continuation)[-(WINDOW + 1):]
    lp = log_softmax(model, row[:-1])
    n = len(continuation)
    at = np.arange(len(row) - 1 - n, len(row) - 1)
    targets = np.asarray(row[-n:])
    return float(lp[at, targets].sum()), bool((lp[at].argmax(-1) == targets).all())


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into tokens: trailing context spaces move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    whole, ctx = tok.encode(context + continuation, bos=False), tok.encode(context, bos=False)
    return ctx, whole[len(ctx):]


def rolling(model, text: str) -> tuple[float, int]:
    """Total log p(text) over consecutive chunks of WINDOW predicted tokens, each read from the WINDOW
    tokens before the chunk's end (the first after BOS: only the last chunk sees more than the one
    token before it); and the number of chunks."""
    ids = [model.tokenizer.bos_id] + model.tokenizer.encode(text, bos=False)
    total, chunks = 0.0, 0
    for start in range(1, len(ids), WINDOW):
        end = min(start + WINDOW, len(ids))
        row = ids[max(0, end - WINDOW - 1):end]
        lp = log_softmax(model, row[:-1])
        n = end - start
        total += float(lp[np.arange(len(row) - 1 - n, len(row) - 1), row[-n:]].sum())
        chunks += 1
    return total, chunks


def check_samples(model, results: dict) -> None:
    """Every logged request's answer against the reference."""
    tok = model.tokenizer
    mc, roll = results["samples"]["pyllama_mc"], results["samples"]["pyllama_rolling"]
    assert len(mc) == 5 and len(roll) == 2
    truncated = 0
    for sample in mc:
        for (context, continuation), (got, greedy) in zip(sample["arguments"], [r[0] for r in sample["resps"]]):
            ctx, cont = encode_pair(tok, context, continuation)
            truncated += len(ctx) + len(cont) > WINDOW + 1
            want, want_greedy = ll(model, ctx, cont)
            assert abs(got - want) < TOL and greedy == want_greedy, (context[-40:], continuation, got, want)
    assert truncated >= 3  # the long question's choices were left-truncated
    chunks = []
    for sample in roll:
        want, n = rolling(model, sample["arguments"][0][0])
        chunks.append(n)
        assert abs(sample["resps"][0][0] - want) < TOL * n, (sample["resps"][0][0], want)
    assert chunks[0] == 1 and chunks[1] >= 2


def evaluate(model, **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=["pyllama_mc", "pyllama_rolling"], log_samples=True,
                                   task_manager=TaskManager(include_path=TASKS), **kwargs)


def test_adapter_matches_numpy(smollm2):
    """`pyllama_jax`'s loglikelihood (left-truncated at max_length) and loglikelihood_rolling equal the
    numpy reference; generate_until stops at `until` and equals the core generator's greedy text."""
    lm = PyllamaLM(model=smollm2, max_length=WINDOW, batch_size=4)
    check_samples(smollm2, evaluate(lm))
    from lm_eval.api.instance import Instance

    prompt = "One, two, three, four,"
    req = Instance("generate_until", {}, (prompt, {"until": [" seven"], "max_gen_toks": 12}), 0)
    got = lm.generate_until([req, req])
    full = smollm2.generate([smollm2.tokenizer.encode(prompt, bos=False)], max_new_tokens=12).texts[0]
    assert got == [full.split(" seven")[0]] * 2 and len(got[0].strip()) > 0 and len(got[0]) < len(full), (got, full)


# ---- the server, in this process -----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2):
    """Our OpenAI server on a free loopback port, over an engine with 4 slots and 256 positions."""
    engine = Engine(smollm2.module, smollm2.tokenizer, slots=4, context=256, prefill_chunk=64).start()
    sock = bind("127.0.0.1", 0)
    loop = asyncio.new_event_loop()
    ready, urls = threading.Event(), []
    task = loop.create_task(serve(create_app(engine, NAME), sock, lambda u: (urls.append(u), ready.set())))
    thread = threading.Thread(target=lambda: loop.run_until_complete(asyncio.gather(task, return_exceptions=True)),
                              daemon=True)
    thread.start()
    assert ready.wait(60), "the server did not start"
    yield urls[0]
    loop.call_soon_threadsafe(task.cancel)
    thread.join(30)
    engine.close()


def post(url: str, path: str, body: dict, stream: bool = False) -> tuple[int, dict | list[dict]]:
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    if stream and response.status == 200:
        return 200, [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
    return response.status, json.loads(data)


def test_local_completions_matches_numpy(smollm2, server):
    """lm-eval's `local-completions` (remote tokenizer, echo + logprobs=1, batches of 4) against our
    server gives the reference loglikelihoods (its max_length 50 reads 48 tokens, as WINDOW)."""
    args = f"base_url={server}/v1/completions,model={NAME},max_length={WINDOW + 2},batch_size=4,timeout=600"
    check_samples(smollm2, evaluate("local-completions", model_args=args))


PROMPT = "The capital of France is Paris, and the capital of Germany is"


def test_completion_logprobs_and_echo(smollm2, server):
    """`echo` + `logprobs=3` + greedy: prompt and completion tokens, their logprobs and top-3 equal the
    numpy reference (the first prompt token has none); offsets index the text; the stream carries the
    same numbers; `max_tokens=0` scores the prompt alone."""
    tok = smollm2.tokenizer
    prompt = tok.encode(PROMPT)
    generated = smollm2.generate([prompt], max_new_tokens=5, ignore_eos=True).tokens[0]
    ids = prompt + generated
    ref = log_softmax(smollm2, ids)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 3, "echo": True,
            "ignore_eos": True}
    status, r = post(server, "/v1/completions", body)
    assert status == 200, r
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT + tok.decode(generated)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        row = ref[i - 1]
        assert abs(lp["token_logprobs"][i] - row[ids[i]]) < 1e-4, i
        best = np.argsort(-row)[:3]
        want = {tok.decode([t], skip_special=False): row[t] for t in best}
        got = lp["top_logprobs"][i]
        assert set(want) <= set(got) and len(got) <= 4, (got, want)
        assert max(abs(got[k] - v) for k, v in want.items()) < 1e-4
    for i in range(len(prompt), len(ids)):  # completion tokens start where the text says they do
        assert choice["text"][lp["text_offset"][i]:].startswith(lp["tokens"][i]), i
    assert lp["text_offset"][len(prompt)] == len(PROMPT)
    status, chunks = post(server, "/v1/completions", {**body, "stream": True}, stream=True)
    merged = [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert status == 200 and merged == lp["token_logprobs"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    status, scored = post(server, "/v1/completions", {**body, "max_tokens": 0})
    assert status == 200 and scored["choices"][0]["text"] == PROMPT
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:len(prompt)]
    assert scored["usage"]["completion_tokens"] == 0


def test_chat_logprobs(smollm2, server):
    """Chat `logprobs` + `top_logprobs=2`: each generated token's logprob and its 2 best alternatives."""
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = tok.encode(tok.apply_chat_template(messages))
    generated = smollm2.generate([prompt], max_new_tokens=4, ignore_eos=True).tokens[0]
    ref = log_softmax(smollm2, prompt + generated)
    status, r = post(server, "/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 4,
                                                     "temperature": 0, "logprobs": True, "top_logprobs": 2,
                                                     "ignore_eos": True})
    assert status == 200, r
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for k, item in enumerate(content):
        row = ref[len(prompt) - 1 + k]
        assert abs(item["logprob"] - row[generated[k]]) < 1e-4
        assert [abs(a["logprob"] - row[t]) < 1e-4 for a, t in zip(item["top_logprobs"], np.argsort(-row)[:2])] == [True] * 2
        assert item["bytes"] == list(item["token"].encode())
    assert "".join(c["token"] for c in content) == r["choices"][0]["message"]["content"]


BAD = [  # (path, body, field, words)
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs", "'logprobs'=6 is out of range: expected 0 to 5"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs", "'logprobs' must be an integer from 0 to 5"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "needs 'echo': true"),
    ("/v1/completions", {"prompt": "hi", "top_logprobs": 2}, "top_logprobs", "/v1/chat/completions"),
    ("/v1/completions", {"prompt": [list(range(2, 300))], "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt",
     "longer than this model's context of 256"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo",
     "it is a field of /v1/completions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs",
     "needs 'logprobs': true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs", "expected 0 to 20"),
]


@pytest.mark.parametrize("path,body,field,words", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_logprobs_requests(server, path, body, field, words):
    status, r = post(server, path, {"model": NAME, **body})
    assert status == 400 and r["error"]["param"] == field and words in r["error"]["message"], r
