"""Built-in chat templates for Meta folders that ship none: LLaMA-2's `[INST]` and LLaMA-3's header format.

LLAMA2 renders as Meta's `llama/generation.py` `chat_completion` formats a dialog: an optional system
message wrapped in `<<SYS>>\\n...\\n<</SYS>>\\n\\n` and prepended to the first user message, then per
exchange `<s>[INST] {user} [/INST] {assistant} </s>` (contents stripped), ending with
`<s>[INST] {user} [/INST]`. LLAMA3 renders as the LLaMA-3 model card's format (Meta's `ChatFormat`):
`<|begin_of_text|>` then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
and `<|start_header_id|>assistant<|end_header_id|>\\n\\n` as the generation prompt.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyllama_jax.tokenizer import Tokenizer

LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('LLaMA-2 chat: after an optional system message, roles must alternate "
    "user/assistant/user/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + ((system if loop.first else '') + m['content']) | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA3_HEADER = "<|start_header_id|>"


def builtin_template(tokenizer: Tokenizer) -> str | None:
    """LLAMA3 for a vocabulary with LLaMA-3's header tokens (its 128k tiktoken BPE), LLAMA2 for a
    sentencepiece one (LLaMA-1/2's 32k), else None (the generic transcript)."""
    if tokenizer.token_id(LLAMA3_HEADER) is not None:
        return LLAMA3
    return LLAMA2 if tokenizer.kind == "sentencepiece" else None
