"""LLaMA-3's tiktoken `tokenizer.model`, against a `tiktoken.Encoding` built directly from the same ranks."""
from __future__ import annotations

import base64
import collections

import pytest
import tiktoken

import pyllama_jax as pj
from pyllama_jax import chat_templates, tokenizer as tok
from pyllama_jax.convert import meta
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import named_tensors

# Meta's llama3/tokenizer.py, written out here again so that the reference does not borrow ours
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
META_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + [
                   f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
CORPUS = "The quick brown fox jumps over the lazy dog. Then the fox sleeps; the dog's thinking. 1234567 " * 20
TEXTS = ["The quick brown fox", "the dog's thinking, 1234567!", "naïve café — 東京 🙂\n\n\ttabs  and  spaces",
         "I'LL DO IT'S", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi fox<|eot_id|>", ""]


def _train(text: str, merges: int, with_merges: bool = False):
    """Byte-level BPE ranks: the 256 bytes, then the most frequent adjacent pair merged, `merges` times
    (and, `with_merges`, the merged pairs in order)."""
    ranks = {bytes([b]): b for b in range(256)}
    pairs_merged = []
    words = [[bytes([b]) for b in w.encode()] for w in text.split(" ")]
    for _ in range(merges):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        pairs_merged.append((a, b))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    return (ranks, pairs_merged) if with_merges else ranks


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return _train(CORPUS, 40)


@pytest.fixture(scope="module")
def model_file(ranks, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


@pytest.fixture(scope="module")
def reference(ranks) -> tiktoken.Encoding:
    return tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: len(ranks) + i for i, t in enumerate(META_SPECIAL)})


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_tiktoken(model_file, reference, text):
    t = tok.from_tokenizer_model(str(model_file))
    assert t.kind == "tiktoken"
    ids = reference.encode(text, allowed_special="all")
    assert t.encode(text, bos=False) == ids
    assert t.encode(text) == ([reference.encode_single_token("<|begin_of_text|>")] + ids
                              if not text.startswith("<|begin_of_text|>") else ids)
    assert t.decode(ids, skip_special=False) == reference.decode(ids)
    assert t.decode(ids) == reference.decode([i for i in ids if i < reference.n_vocab - 256])


def test_special_ids_are_meta_s(model_file, ranks, reference):
    t = tok.from_tokenizer_model(str(model_file))
    n = len(ranks)  # 128000 in LLaMA-3
    assert (t.vocab_size, t.bos_id, t.eos_id) == (reference.n_vocab, n, n + 1)
    assert t.eos_ids == {n + 1, n + 9}  # <|end_of_text|>, <|eot_id|>
    assert [t.token_id(s) for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")] == [n + 6, n + 7, n + 9]
    assert t.token_text(n + 255) == "<|reserved_special_token_250|>" and t.token_id("<|nope|>") is None


def test_meta_llama3_folder_gets_its_tokenizer_and_chat_format(model_file, ranks, tmp_path):
    import shutil

    shutil.copyfile(model_file, tmp_path / "tokenizer.model")
    model = init_model(preset("tiny", vocab_size=len(ranks) + 256), seed=6)
    meta.save(str(tmp_path / "Meta-Llama-3-8B"), model.config, named_tensors(model))
    loaded = pj.load(str(tmp_path / "Meta-Llama-3-8B"))
    assert loaded.tokenizer.kind == "tiktoken"
    assert loaded.tokenizer.chat_template == chat_templates.LLAMA3
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi fox"}])
    assert text == TEXTS[4] + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    n = len(ranks)
    assert loaded.tokenizer.encode(text)[:2] == [n, n + 6]  # one BOS, then the header token


def test_bad_lines_name_the_file_and_line(tmp_path, model_file):
    bad = tmp_path / "tokenizer.model"
    bad.write_text(model_file.read_text() + "QUJD notanumber\n")
    with pytest.raises(ValueError, match=rf"{bad}:297: expected 'base64token rank'"):
        tok.from_tokenizer_model(str(bad))
    bad.write_text(model_file.read_text() + "QUJD 5\n")
    with pytest.raises(ValueError, match="ranks are not 0..296, each once"):
        tok.from_tokenizer_model(str(bad))
