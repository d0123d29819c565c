"""Built-in LLaMA-2/LLaMA-3 chat templates, against Meta's published formats written out by hand and
against the templates of Meta's HF repositories (copied in tests/test_tokenizer.py)."""
from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

import pyllama_jax as pj
from pyllama_jax import chat_templates, tokenizer as tok
from pyllama_jax.convert import meta
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import named_tensors
from tests.test_tokenizer import LLAMA2_TEMPLATE, LLAMA3_TEMPLATE

SYS, U1, A1, U2 = " Be brief. ", "Hello, fox? ", " Fine, thanks!", "The lazy dog?"
CHAT = [{"role": "system", "content": SYS}, {"role": "user", "content": U1},
        {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]

# llama/generation.py chat_completion: B_SYS + system + E_SYS + first user, each exchange
# f"{B_INST} {prompt.strip()} {E_INST} {answer.strip()} " encoded with bos and eos, then
# f"{B_INST} {last.strip()} {E_INST}" with bos only.
LLAMA2_EXPECTED = ("<s>[INST] <<SYS>>\n Be brief. \n<</SYS>>\n\nHello, fox? [/INST] Fine, thanks! </s>"
                   "<s>[INST] The lazy dog? [/INST]")
# The LLaMA-3 model card / Meta's ChatFormat: header, blank line, stripped content, <|eot_id|>.
LLAMA3_EXPECTED = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHello, fox?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nFine, thanks!<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nThe lazy dog?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


class _Vocab:
    """The bits of a backend the template renderer reads: special tokens by text and id."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens

    def token_to_id(self, text: str) -> int | None:
        return self.tokens.index(text) if text in self.tokens else None

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]


def _tokenizer(template: str, bos: str, eos: str) -> tok.Tokenizer:
    vocab = _Vocab([bos, eos, chat_templates.LLAMA3_HEADER])
    return tok.Tokenizer(vocab, "hf", 0, 1, add_bos=True, chat_template=template)


@pytest.mark.parametrize("template, expected, bos, eos", [
    (chat_templates.LLAMA2, LLAMA2_EXPECTED, "<s>", "</s>"),
    (chat_templates.LLAMA3, LLAMA3_EXPECTED, "<|begin_of_text|>", "<|end_of_text|>")])
def test_builtin_templates_render_meta_formats(template, expected, bos, eos):
    assert _tokenizer(template, bos, eos).apply_chat_template(CHAT) == expected


@pytest.mark.parametrize("ours, hf_repo, bos, eos", [
    (chat_templates.LLAMA2, LLAMA2_TEMPLATE, "<s>", "</s>"),
    (chat_templates.LLAMA3, LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>")])
@pytest.mark.parametrize("chat", [CHAT, CHAT[1:], CHAT[1:3], CHAT[3:]])
@pytest.mark.parametrize("prompt", [True, False])
def test_builtin_templates_agree_with_meta_hf_repositories(ours, hf_repo, bos, eos, chat, prompt):
    render = lambda t: _tokenizer(t, bos, eos).apply_chat_template(chat, add_generation_prompt=prompt)
    assert render(ours) == render(hf_repo)


def test_llama2_refuses_roles_out_of_order():
    with pytest.raises(ValueError, match="roles must alternate"):
        _tokenizer(chat_templates.LLAMA2, "<s>", "</s>").apply_chat_template(CHAT[1:2] * 2)


def test_meta_folder_without_a_template_gets_llama2(tmp_path):
    """A Meta folder with a sentencepiece tokenizer.model: the LLaMA-2 format, not the generic transcript."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=40,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    model = init_model(preset("tiny"), seed=5)
    meta.save(str(tmp_path / "7B"), model.config, named_tensors(model))
    loaded = pj.load(str(tmp_path / "7B"))  # tokenizer.model one folder up, as Meta lays it out
    assert loaded.tokenizer.chat_template == chat_templates.LLAMA2
    assert loaded.tokenizer.apply_chat_template(CHAT) == LLAMA2_EXPECTED
    ids = loaded.tokenizer.encode(LLAMA2_EXPECTED)
    assert ids.count(1) == 2 and ids[0] == 1 and ids.count(2) == 1  # <s> twice, </s> once, no doubled BOS
    assert np.isfinite(np.asarray(loaded.logits(ids))).all()
