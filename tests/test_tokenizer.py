"""Our tokenizers against transformers' on the same files, and their error handling."""
from __future__ import annotations

import os

import pytest

from pyllama_jax import tokenizer as tok
from pyllama_jax.api import embedded_path

SAMPLES = ["Hello world", "  leading spaces and 12345 digits, 3.14159", "naïve café — 東京 🙂",
           "<|im_start|>user\nHi<|im_end|>\n", "line one\r\nline two\n\n\tTabbed"]


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer

    folder, name = os.path.split(embedded_path("smollm2-135m"))
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.parametrize("text", SAMPLES)
def test_gguf_tokenizer_matches_transformers(smollm2, hf_tok, text):
    ids = smollm2.tokenizer.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert smollm2.tokenizer.decode(ids, skip_special=False) == text


def test_gguf_tokenizer_matches_transformers_on_wikitext(smollm2, hf_tok, data_dir):
    with open(os.path.join(data_dir, "wikitext-2-raw", "wiki.test.raw"), encoding="utf-8") as f:
        text = f.read().replace("\r\n", "\n")[:200_000]
    ids = smollm2.tokenizer.encode(text)
    assert ids[:8] == [446, 6356, 389, 9226, 352, 446, 3717, 6356]  # the reference protocol's first ids
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]


def test_smollm2_special_ids_and_chat_template(smollm2, hf_tok):
    t = smollm2.tokenizer
    assert (t.bos_id, t.eos_id, t.add_bos) == (1, 2, False)  # <|im_start|>, <|im_end|>; no BOS added
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    ours = t.apply_chat_template(messages)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


def test_sentencepiece_tokenizer_adds_bos(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    t = tok.from_sentencepiece(str(tmp_path / "sp.model"))
    ids = t.encode("the lazy fox")
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert ids == [1] + ref.encode("the lazy fox")
    assert t.decode(ids) == "the lazy fox"
    assert t.encode("the lazy fox", bos=False, eos=True) == ref.encode("the lazy fox") + [2]


def test_bad_tokenizer_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        tok.from_sentencepiece(str(tmp_path / "missing.model"))
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        tok.from_sentencepiece(str(bad))
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        tok.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")
