"""LLaMA-3 GGUF inputs: the `llama-bpe` pre-tokenizer (against tiktoken on the same ranks) and
LLaMA-3.1's `rope_freqs.weight` (against llama.cpp's convert_hf_to_gguf formula)."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

from pyllama_jax import tokenizer as tok
from pyllama_jax.convert.gguf import GGUFFile
from tests.test_tiktoken import TEXTS, _train, CORPUS, META_PATTERN, META_SPECIAL

import tiktoken


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies store)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory):
    """A GGUF holding only LLaMA-3-style tokenizer metadata, as llama.cpp writes it; and the ranks."""
    ranks, merges = _train(CORPUS, 40, with_merges=True)
    u = _bytes_to_unicode()
    text = lambda b: "".join(u[x] for x in b)
    tokens = [text(t) for t in ranks] + META_SPECIAL
    path = tmp_path_factory.mktemp("gguf") / "llama3-vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(ranks) + [3] * len(META_SPECIAL))
    w.add_token_merges([f"{text(a)} {text(b)}" for a, b in merges])
    w.add_bos_token_id(len(ranks))
    w.add_eos_token_id(len(ranks) + 9)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, ranks


@pytest.mark.parametrize("text", TEXTS)
def test_llama_bpe_gguf_vocabulary_matches_tiktoken(llama3_gguf, text):
    path, ranks = llama3_gguf
    ref = tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: len(ranks) + i for i, t in enumerate(META_SPECIAL)})
    t = tok.from_gguf(GGUFFile(path).fields, str(path))
    ids = ref.encode(text, allowed_special="all")
    assert t.encode(text, bos=False) == ids
    assert t.decode(ids, skip_special=False) == ref.decode(ids)
    assert t.encode("Hi")[0] == len(ranks)  # <|begin_of_text|>


def _llama_cpp_rope_factors(head_dim: int, theta: float, factor: float, low: float = 1.0, high: float = 4.0,
                            old_context: int = 8192) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py (LlamaModel, rope_type llama3): the rope_freqs.weight it writes."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _metadata_gguf(path, factors: np.ndarray) -> str:
    """LLaMA-3.1-8B's attention shape (head_dim 128), no weights: enough for `GGUFFile.config`."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_block_count, 1), (w.add_embedding_length, 4096), (w.add_head_count, 32),
                       (w.add_head_count_kv, 8), (w.add_feed_forward_length, 14336), (w.add_context_length, 131072),
                       (w.add_rope_freq_base, 500000.0), (w.add_layer_norm_rms_eps, 1e-5)]:
        add(value)
    w.add_token_list(["a", "b"])
    w.add_tensor("rope_freqs.weight", factors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("factor", [8.0, 32.0])  # LLaMA-3.1 8B/70B/405B; LLaMA-3.2 1B/3B
def test_rope_freqs_becomes_llama3_scaling_as_transformers_computes_it(tmp_path, factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pyllama_jax.model.llama import rope_frequencies

    g = GGUFFile(_metadata_gguf(tmp_path / "m.gguf", _llama_cpp_rope_factors(128, 500000.0, factor)))
    config = g.config()
    s = config.rope_scaling
    assert (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (factor, 1, 4, 8192)
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": factor,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    np.testing.assert_allclose(np.asarray(rope_frequencies(config)), inv_freq.numpy(), rtol=1e-5)
    assert list(g.tensors(config)) == []  # the factors are config, not a weight


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path):
    factors = _llama_cpp_rope_factors(128, 500000.0, 8.0, high=2.0)
    with pytest.raises(ValueError, match=r"m.gguf: rope_freqs.weight is not LLaMA-3.1's llama3 RoPE scaling"):
        GGUFFile(_metadata_gguf(tmp_path / "m.gguf", factors)).config()
    with pytest.raises(ValueError, match=r"rope_freqs.weight has 3 values, expected head_dim/2=64"):
        GGUFFile(_metadata_gguf(tmp_path / "n.gguf", np.ones(3, np.float32))).config()
