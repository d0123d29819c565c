"""Our tokenizers against transformers' on the same files, and their error handling."""
from __future__ import annotations

import copy
import json
import os
import re

import pytest

from pyllama_jax import tokenizer as tok
from pyllama_jax.convert.names import embedded_path

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


def test_unsafe_chat_template_raises_and_runs_nothing(smollm2, tmp_path):
    marker = tmp_path / "pwned"
    t = copy.copy(smollm2.tokenizer)
    t.chat_template = "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
    with pytest.raises(ValueError, match=re.escape(t.source) + ".*unsafe"):
        t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert not marker.exists()


# HF's own templates: Llama-2-chat's (bos_token before each [INST], eos_token after each answer) and
# Meta-Llama-3-Instruct's (bos_token once, at the start).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CORPUS = [f"The quick brown fox {i} jumps over the lazy dog. [INST] Hello, how are you? [/INST] Fine, "
          f"thanks! naïve café {i * 7}\n" for i in range(300)]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, fox?"},
        {"role": "assistant", "content": "Fine, thanks!"}, {"role": "user", "content": "The lazy dog?"}]
# No leading whitespace: sentencepiece itself and transformers' conversion of it differ there.
BOS_SAMPLES = ["Hello world", "the lazy fox and 12345 digits, 3.14159", "naïve café — 東京 🙂",
               "line one\r\nline two\n\n\tTabbed", "fox</s><s>[INST] hi </s> there"]


@pytest.fixture(scope="module")
def llama2_folder(tmp_path_factory):
    """A LLaMA-2-like HF folder: sentencepiece BPE with byte fallback, LLaMA's normalization and config."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("llama2")
    (folder / "corpus.txt").write_text("".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": LLAMA2_TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    """A LLaMA-3-like HF folder: byte-level BPE whose post-processor (TemplateProcessing) adds the BOS,
    and a tokenizer_config.json without add_bos_token, as Meta's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("llama3")
    specials = ["<|reserved|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A:0",
                                      pair="<|begin_of_text|> $A:0 <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", 1)])])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE}))
    return folder


@pytest.mark.parametrize("kind", ["llama2", "llama3"])
def test_bos_and_chat_ids_match_transformers(kind, request):
    """Plain text gets the BOS the tokenizer itself adds; a chat template that renders the BOS gets no
    second one (transformers tokenizes a rendered chat with add_special_tokens=False)."""
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    folder = request.getfixturevalue(f"{kind}_folder")
    ours = tok.from_hf_folder(str(folder))
    ref = (LlamaTokenizer if kind == "llama2" else PreTrainedTokenizerFast).from_pretrained(str(folder))
    for text in BOS_SAMPLES + ["<|eot_id|> <|begin_of_text|>x"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, bos=False, eos=True) == ref(text, add_special_tokens=False)["input_ids"] + [
            ref.eos_token_id]
    rendered = ours.apply_chat_template(CHAT)
    assert rendered == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.encode(rendered) == ref.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]


def test_llama3_tokenizer_json_alone_adds_its_bos(llama3_folder, tmp_path):
    from transformers import PreTrainedTokenizerFast

    (tmp_path / "tokenizer.json").write_bytes((llama3_folder / "tokenizer.json").read_bytes())
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = tok.from_hf_folder(str(tmp_path))
    for text in BOS_SAMPLES:
        assert ours.encode(text) == ref(text)["input_ids"] and ours.encode(text)[0] == 1
