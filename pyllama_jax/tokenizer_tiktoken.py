"""Meta's LLaMA-3 `tokenizer.model`: a tiktoken BPE file (`base64token rank` per line), read with `tiktoken`.

The pattern and special tokens are those of Meta's `llama3/tokenizer.py`: 256 special tokens after the
BPE ranks, `<|begin_of_text|>` first (128000 in LLaMA-3), then `<|end_of_text|>`, four reserved,
`<|start_header_id|>`, `<|end_header_id|>`, a reserved one, `<|eot_id|>`, and reserved ones to 256.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from types import SimpleNamespace
from typing import Sequence

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
N_SPECIAL = 256
SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
           + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
           + [f"<|reserved_special_token_{i}|>" for i in range(5, N_SPECIAL - 5)])
_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")


def is_tiktoken_file(path: str) -> bool:
    """Whether `path` starts like a tiktoken BPE file (a sentencepiece model is a binary protobuf)."""
    with open(path, "rb") as f:
        return bool(_LINE.fullmatch(f.readline().rstrip(b"\r\n")))


def read_ranks(path: str) -> dict[bytes, int]:
    """The token bytes -> rank table; ranks must be 0..n-1, each once."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{n}: expected 'base64token rank', found {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once (a duplicate or gap)")
    return ranks


class TiktokenBackend:
    """A `tiktoken.Encoding` behind the few `tokenizers.Tokenizer` methods `Tokenizer` calls."""

    def __init__(self, path: str):
        import tiktoken

        ranks = read_ranks(path)
        self.n_base = len(ranks)
        self.special = {t: self.n_base + i for i, t in enumerate(SPECIAL)}
        self._special_text = {i: t for t, i in self.special.items()}
        self.encoding = tiktoken.Encoding(os.path.basename(path), pat_str=PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.special)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.encoding.n_vocab

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[SimpleNamespace]:
        """Special tokens written in the text are read as such, as in the HF LLaMA-3 tokenizer."""
        return [SimpleNamespace(ids=ids) for ids in self.encoding.encode_batch(list(texts), allowed_special="all")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i < self.n_base]
        return self.encoding.decode(list(ids), errors="replace")

    def token_to_id(self, text: str) -> int | None:
        if text in self.special:
            return self.special[text]
        try:
            return self.encoding.encode_single_token(text.encode("utf-8"))
        except KeyError:
            return None

    def id_to_token(self, i: int) -> str | None:
        if i in self._special_text:
            return self._special_text[i]
        if 0 <= i < self.n_base:
            return self.encoding.decode_single_token_bytes(i).decode("utf-8", errors="replace")
        return None
