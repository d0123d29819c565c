"""Sampling against a numpy reference, generation behaviour (stops, streaming, compiles), bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pyllama_jax as pj
from pyllama_jax.api import Model
from pyllama_jax.convert.names import embedded_path
from pyllama_jax.decoding.buckets import pow2
from pyllama_jax.generate import MIN_BUCKET, Generator, SamplingConfig, sample
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Probabilities after temperature, top-k and top-p, written the obvious way."""
    order = np.argsort(-logits, kind="stable")
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or (rank > 0 and mass >= top_p):
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 4, 0.6)])
def test_sampling_distribution_matches_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 2, 12).astype(np.float32)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: sample(jnp.asarray(logits)[None], k, jnp.array([temperature]),
                                             jnp.array([top_k]), jnp.array([top_p]))[0]))
    freq = np.bincount(np.asarray(draw(keys)), minlength=12) / n
    ref = reference_probs(logits, temperature, top_k, top_p)
    assert np.all(freq[ref == 0] == 0)
    np.testing.assert_allclose(freq, ref, atol=0.015)


def test_temperature_zero_is_argmax_per_row():
    logits = jax.random.normal(jax.random.key(1), (3, 50))
    out = sample(logits, jax.random.key(2), jnp.array([0.0, 0.0, 1.0]), jnp.zeros(3, jnp.int32), jnp.ones(3))
    assert out[:2].tolist() == np.argmax(np.asarray(logits[:2]), -1).tolist()


def test_seeded_sampling_is_reproducible(smollm2):
    # 37 prompt tokens + 32 new: the programs (batch 1, prompt bucket 64, cache 128) of the chat below
    a = smollm2.generate("Write a poem about the sea.", chat=True, max_new_tokens=32, temperature=0.9,
                         top_p=0.9, seed=7)
    b = smollm2.generate("Write a poem about the sea.", chat=True, max_new_tokens=32, temperature=0.9,
                         top_p=0.9, seed=7)
    assert a.tokens == b.tokens


def test_stop_strings_eos_streaming_and_report(smollm2):
    streamed: dict[int, str] = {0: "", 1: ""}

    def on_text(row: int, delta: str) -> None:
        streamed[row] += delta

    prompts = ["Count from one to ten: one, two, three,", "What is the capital of France?"]
    g = smollm2.generate(prompts, max_new_tokens=40, stop=[" six"], on_text=on_text)
    assert g.finish_reasons[0] == "stop" and " six" not in g.texts[0] and "five" in g.texts[0]
    assert streamed[0] == g.texts[0]
    chat = smollm2.generate("What is the capital of France?", chat=True, max_new_tokens=60)
    assert chat.finish_reasons == ["stop"] and "Paris" in chat.texts[0]  # ended by <|im_end|>
    assert smollm2.tokenizer.eos_id not in chat.tokens[0]
    assert "tok/s" in chat.report() and chat.tokens_per_second > 0


def test_generation_compiles_once_per_bucket():
    model = init_model(preset("tiny", max_seq_len=256))
    gen = Generator(model, _ByteTokenizer())
    cfg = SamplingConfig(max_new_tokens=5, ignore_eos=True)
    for length in (12, 13, 15, 16):  # one prompt bucket (16) and one cache bucket (32)
        gen.generate([list(range(1, length + 1))], cfg)
    gen.generate([[1, 2], list(range(1, 15))], cfg)  # batch 2: one more program each
    assert gen._prefill[True]._cache_size() == 2 and gen._decode[True]._cache_size() == 2  # the greedy programs
    assert gen._prefill[False]._cache_size() == 0 and gen._decode[False]._cache_size() == 0  # no sampler compiled
    assert [pow2(n, MIN_BUCKET, 256) for n in (1, 16, 17, 200, 300)] == [16, 16, 32, 256, 256]


def test_compile_time_is_reported_apart_from_steady_rates():
    """An identical second call compiles nothing, so its rates are the steady ones the first call must report."""
    gen = Generator(init_model(preset("tiny", max_seq_len=256), seed=3), _ByteTokenizer())
    cfg = SamplingConfig(max_new_tokens=24, ignore_eos=True)
    first, second = (gen.generate([list(range(1, 13)), list(range(1, 40))], cfg) for _ in range(2))
    assert first.tokens == second.tokens
    assert 1 / 20 < first.tokens_per_second / second.tokens_per_second < 20
    assert 1 / 20 < first.prefill_tokens_per_second / second.prefill_tokens_per_second < 20
    assert first.compile_seconds > 0 and second.compile_seconds == 0
    assert "compile" in first.report() and "compile" not in second.report()


def test_prompt_longer_than_context_is_refused():
    model = init_model(preset("tiny", max_seq_len=32))
    gen = Generator(model, _ByteTokenizer())
    with pytest.raises(ValueError, match="exceeds the model's context of 32 tokens by 8"):
        gen.generate([list(range(1, 31))], SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1], []], SamplingConfig(max_new_tokens=1))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Model(model, None).logits(np.ones((1, 40), np.int32))


def test_bad_model_paths_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        pj.load(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        pj.load(str(tmp_path / "missing.gguf"))
    truncated = tmp_path / "truncated.gguf"
    with open(embedded_path("smollm2-135m"), "rb") as src:
        truncated.write_bytes(src.read(5_000_000))
    with pytest.raises(ValueError, match="truncated.gguf"):
        pj.load(str(truncated))


def test_tokenizer_larger_than_vocabulary_is_refused(tmp_path):
    small = tmp_path / "small.gguf"
    _rewrite_gguf(embedded_path("smollm2-135m"), small, vocab_size=1000)
    with pytest.raises(ValueError, match="tokenizer has 49152 tokens but the model's vocabulary is 1000"):
        pj.load(str(small))


def _rewrite_gguf(src: str, dst, vocab_size: int) -> None:
    """Copy a GGUF file with a shrunken embedding table (keeping the full tokenizer)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "llama.vocab_size":
            value = vocab_size
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            from gguf.quants import dequantize

            writer.add_tensor(t.name, dequantize(t.data, t.tensor_type)[:vocab_size].copy())
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class _ByteTokenizer:
    """A stand-in tokenizer for random tiny models: one token per byte."""

    eos_ids = frozenset({0})
    bos_id, eos_id, add_bos = None, 0, False

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode(errors="replace")


class _CountingTokenizer(_ByteTokenizer):
    """Every id a piece of text (some multi-byte); counts the ids each `decode` call is handed."""

    PIECES = ("a", "é", "👋", " the", "\n", "-")

    def __init__(self):
        self.decoded = 0

    def decode(self, ids) -> str:
        self.decoded += len(ids)
        return "".join(self.PIECES[i % len(self.PIECES)] for i in ids if i)


@pytest.mark.parametrize("tokenizer", [_ByteTokenizer(), _CountingTokenizer()], ids=["bytes", "pieces"])
def test_streamed_text_is_the_final_text(tokenizer):
    """Streaming adds up to each row's final text, the plain decode of its tokens, also when characters
    are cut across tokens (bytes)."""
    gen = Generator(init_model(preset("tiny", max_seq_len=256), seed=4), tokenizer)
    streamed = ["", ""]

    def on_text(row: int, delta: str) -> None:
        streamed[row] += delta

    g = gen.generate([list("héllo wörld 👋".encode()), [200, 201]], SamplingConfig(max_new_tokens=40, ignore_eos=True),
                     on_text)
    assert streamed == g.texts == [tokenizer.decode(t) for t in g.tokens]
    assert [len(t) for t in g.tokens] == [40, 40] and g.finish_reasons == ["length"] * 2
    assert any(t >= 128 for row in g.tokens for t in row)


@pytest.mark.parametrize("new_tokens", [20, 200])
def test_text_is_decoded_once_per_token(new_tokens):
    """Each token decodes a window of at most 3 ids, never the whole row again (that is ~n**2 / 2)."""
    tokenizer = _CountingTokenizer()
    gen = Generator(init_model(preset("tiny", max_seq_len=256), seed=4), tokenizer)
    g = gen.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True))
    assert len(g.tokens[0]) == new_tokens
    assert tokenizer.decoded <= 3 * new_tokens
