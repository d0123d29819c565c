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
