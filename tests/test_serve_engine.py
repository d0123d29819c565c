"""The continuous-batching engine against the core `Generator`, on a tiny random model."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from pyllama_jax.decoding.text import TextStream
from pyllama_jax.generate import Generator, SamplingConfig
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.serve.engine import Engine, Event, QueueFull, Request
from pyllama_jax.serve.process import REPO
from pyllama_jax.tokenizer import Tokenizer

EOS = 3


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: token i is byte i (in GPT-2's byte-to-unicode alphabet)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return Tokenizer(tk, "hf", None, EOS, add_bos=False)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = byte_tokenizer()
    return init_model(preset("tiny", max_seq_len=512), seed=1), tokenizer


class Collector:
    """Gathers each request's events; `wait()` until all have finished."""

    def __init__(self, n: int):
        self.texts, self.final = [""] * n, [None] * n
        self.done = threading.Event()

    def __call__(self, k: int):
        def on_event(event: Event) -> None:
            self.texts[k] += event.text
            if event.finish_reason is not None:
                self.final[k] = event
                if all(self.final):
                    self.done.set()
        return on_event

    def wait(self, timeout: float = 120) -> None:
        assert self.done.wait(timeout), f"requests did not finish: {self.final}"


def test_continuous_batching_matches_generate(tiny):
    """Requests joining mid-way, waiting for a slot, prefilled in chunks and decoded with windows
    of 128..512 positions give exactly the core generator's greedy output."""
    model, tokenizer = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 256, n).tolist() for n in (3, 20, 9, 33, 5)]
    max_tokens = [40, 300, 7, 200, 60]
    ref = Generator(model, tokenizer).generate(prompts, SamplingConfig(max_new_tokens=max(max_tokens)))
    engine = Engine(model, tokenizer, slots=2, max_queue=8, prefill_chunk=8).start()
    try:
        got = Collector(len(prompts))
        requests = [Request(p, m, got(k)) for k, (p, m) in enumerate(zip(prompts, max_tokens))]
        engine.submit(*requests[:2])
        deadline = time.monotonic() + 60
        while engine.stats()["active"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit(*requests[2:])  # 3 wait for a slot, then reuse rows that earlier requests left
        got.wait()
    finally:
        engine.close()
    for k, m in enumerate(max_tokens):
        tokens = ref.tokens[k]  # EOS excluded
        if len(tokens) < m and ref.finish_reasons[k] == "stop":  # ended at EOS first
            expected = (tokenizer.decode(tokens), "stop", len(tokens) + 1)
        else:
            expected = (tokenizer.decode(tokens[:m]), "length", m)
        assert (got.texts[k], got.final[k].finish_reason, got.final[k].completion_tokens) == expected, k
    assert any(r == "length" for r in ref.finish_reasons) and max(len(t) for t in ref.tokens) > 256


def test_seeded_sampling_is_per_request(tiny):
    """A seeded request samples the same tokens alone or beside others; another seed differs."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, slots=2, prefill_chunk=16).start()
    knobs = dict(temperature=1.0, top_p=0.95, ignore_eos=True)

    def text(prompt, seed, other=None):
        got = Collector(2 if other else 1)
        reqs = [Request(prompt, 48, got(0), seed=seed, **knobs)]
        if other:
            reqs.append(Request(other, 48, got(1), seed=seed + 1, **knobs))
        engine.submit(*reqs[::-1])  # the other request takes slot 0
        got.wait()
        return got.texts[0]

    try:
        alone = text([10, 20, 30], seed=5)
        together = text([10, 20, 30], seed=5, other=[40, 50, 60, 70])
        other_seed = text([10, 20, 30], seed=6)
    finally:
        engine.close()
    assert alone == together
    assert alone != other_seed
    assert len(set(alone)) > 10  # sampled, not a greedy loop


def test_queue_limit_cancel_and_context(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, slots=1, max_queue=1, context=128).start()
    try:
        got = Collector(2)
        a = Request([5, 6, 7], 120, got(0), ignore_eos=True)
        b = Request([8, 9], 5, got(1), ignore_eos=True)
        engine.submit(a, b)
        with pytest.raises(QueueFull, match="max_queue=1"):
            engine.submit(Request([1], 5, got(1)))
        with pytest.raises(ValueError, match=r"prompt \(100 tokens\) plus max_tokens \(40\) is 140 tokens, 12 more "
                                              r"than this model's context of 128"):
            engine.check(100, 40)
        engine.cancel(a)
        got.wait(60)
        assert got.final[0].finish_reason == "cancelled" and got.final[0].completion_tokens < 120
        assert got.final[1].finish_reason == "length" and got.final[1].completion_tokens == 5
        assert engine.stats() == {"slots": 1, "active": 0, "queued": 0, "context": 128}
    finally:
        engine.close()


def test_warmup_compiles_every_window(tiny):
    """After `warmup()` (the server's readiness), requests whose prefill and decode cross into the
    256 and 512 windows, on 1 and 2 rows, compile nothing: no stall for the running streams."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, slots=2, prefill_chunk=32)
    engine.warmup()
    programs = lambda: [sum(f._cache_size() for f in jits.values()) for jits in (engine._prefill, engine._decode)]
    compiled = programs()
    engine.start()
    try:
        got = Collector(2)
        engine.submit(Request(list(range(4, 204)), 100, got(0), ignore_eos=True),
                      Request([5, 6, 7], 8, got(1), ignore_eos=True))
        got.wait()
    finally:
        engine.close()
    assert [e.finish_reason for e in got.final] == ["length", "length"]
    assert programs() == compiled and compiled == [3, 3 * 2]  # windows 128, 256, 512; 1 and 2 rows


@pytest.mark.parametrize("stop", [("wör!", "STOP"), ("👋 S",), ()])
def test_text_stream_characters_and_stops(stop):
    """Deltas are whole characters, never show a stop string or text past it, and add up to the
    full decode cut at the first stop string."""
    tokenizer = byte_tokenizer()
    text = "héllo wörld 👋 STOP and more"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: characters span several tokens
    stream, shown = TextStream(tokenizer, stop), ""
    for t in ids:
        delta = stream.push(t)
        assert "\ufffd" not in delta
        shown += delta
        if stream.stopped:
            break
    shown += stream.flush()
    cuts = [text.find(s) for s in stop if s in text]
    assert shown == text[:min(cuts)] if cuts else shown == text
    assert stream.stopped == bool(cuts)


def _log_softmax(model, ids: list[int]) -> np.ndarray:
    """Independent reference: numpy log-softmax of the uncached forward's logits `[len(ids), vocab]`."""
    logits = np.asarray(model(jax.numpy.asarray([ids], jax.numpy.int32))[0][0], np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_logprobs_match_log_softmax(tiny):
    """A sampled request asking for logprobs (beside one that does not, sharing decode steps) gets, for
    each generated token, the raw model's log-softmax at that token and its 3 most likely tokens; the
    events' tokens are exactly the ones behind its text. `score()` rates a prompt the same way."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, slots=2, prefill_chunk=8).start()
    events: list[Event] = []
    done = threading.Event()

    def on_event(event: Event) -> None:
        events.append(event)
        if event.finish_reason:
            done.set()

    prompt = [7, 40, 41, 42, 99, 100, 12, 13, 14, 15, 16]
    try:
        plain = Collector(1)
        engine.submit(Request([5, 6, 7], 30, plain(0), ignore_eos=True),
                      Request(prompt, 24, on_event, temperature=0.9, seed=3, ignore_eos=True, logprobs=3))
        assert done.wait(120)
        plain.wait()
        scored = engine.score([prompt, prompt[:4]], top=2)
    finally:
        engine.close()
    entries = [e for ev in events for e in ev.logprobs]
    tokens = [e.token for e in entries]
    assert len(tokens) == 24 and tokenizer.decode(tokens) == "".join(ev.text for ev in events)
    ref = _log_softmax(model, prompt + tokens)
    for k, e in enumerate(entries):
        row = ref[len(prompt) - 1 + k]
        assert abs(e.logprob - row[e.token]) < 1e-4, k
        assert [t for t, _ in e.top] == list(np.argsort(-row)[:3]), k
        np.testing.assert_allclose([v for _, v in e.top], np.sort(row)[::-1][:3], atol=1e-4)
    assert min(e.logprob for e in entries) < max(e.top[0][1] for e in entries) - 0.1  # sampled, not all argmax
    assert plain.final[0].logprobs is None
    ref = _log_softmax(model, prompt)
    np.testing.assert_allclose(scored[0].logprobs, ref[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
    np.testing.assert_array_equal(scored[0].top_ids, np.argsort(-ref[:-1], axis=-1)[:, :2])
    np.testing.assert_allclose(scored[1].logprobs, scored[0].logprobs[:3], atol=1e-5)  # padding changes nothing


def test_sharded_engine_matches_single_device():
    """On 8 simulated CPU devices (data 2 x fsdp 2 x tensor 2), the engine's greedy output equals the
    single-device generator's, and the cache stays split: slots over data, kv heads over tensor."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded ok P('data', None, 'tensor')" in proc.stdout


def _sharded_case() -> None:
    from pyllama_jax.model import place
    from pyllama_jax.sharding import mesh as pmesh

    tokenizer = byte_tokenizer()
    model = init_model(preset("tiny", max_seq_len=256), seed=3)
    prompts = [[5, 9, 20, 31], list(range(40, 60))]
    ref = Generator(model, tokenizer).generate(prompts, SamplingConfig(max_new_tokens=30))
    mesh = pmesh.make_mesh(data=2, fsdp=2, tensor=2)
    engine = Engine(place.shard(model, mesh), tokenizer, slots=2, prefill_chunk=8, mesh=mesh)
    engine.warmup()
    engine.start()
    got = Collector(2)
    engine.submit(*[Request(p, 30, got(k)) for k, p in enumerate(prompts)])
    got.wait()
    engine.close()
    assert jax.device_count() == 8
    assert got.texts == [tokenizer.decode(t) for t in ref.tokens], (got.texts, ref.texts)
    print("sharded ok", engine._cache.k[0].sharding.spec)


if __name__ == "__main__":
    _sharded_case()
