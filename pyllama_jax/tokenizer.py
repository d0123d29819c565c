"""One tokenizer interface over sentencepiece or tiktoken (LLaMA-3) `tokenizer.model`, HF `tokenizer.json` and
GGUF vocabularies."""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Sequence

# GGUF `tokenizer.ggml.pre` -> the digit handling that model's own tokenizer.json applies before
# byte-level BPE (GPT-2's regex is the same for all of these).
_GGUF_DIGIT_SPLIT = {"smollm": True, "gpt2": False, "default": False}
_GGUF_CONTROL = 3  # tokenizer.ggml.token_type of special (control) tokens


class Tokenizer:
    """Text <-> token ids, with the model's BOS/EOS conventions and chat template."""

    def __init__(self, backend: Any, kind: str, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None = None, source: str = "",
                 extra_eos_ids: Sequence[int] = ()):
        self.backend, self.kind, self.source = backend, kind, source
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self.eos_ids = frozenset(i for i in (eos_id, *extra_eos_ids) if i is not None)

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        """Token ids of `text`, with special tokens written in it (e.g. by a chat template) read as such.

        `bos=None` prepends the BOS if the tokenizer adds one (`add_bos`) and `text` does not already start
        with it, so a rendered chat gets the ids of transformers' `apply_chat_template(tokenize=True)`.
        """
        if self.kind == "sentencepiece":
            ids = self._sentencepiece_ids(text)
        else:
            # encode_batch releases the GIL (encode does not), so a server's event loop keeps
            # running while another thread tokenizes a huge prompt
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if bos is None:
            bos = self.add_bos and ids[:1] != [self.bos_id]
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _sentencepiece_ids(self, text: str) -> list[int]:
        """Split at special pieces written in `text`; as transformers' LlamaTokenizer (legacy=False) does,
        only text at the very start gets sentencepiece's dummy-prefix space."""
        parts = self._special_pieces.split(text)
        if len(parts) == 1:
            return list(self.backend.encode(text))
        ids: list[int] = []
        for i, part in enumerate(parts):  # odd indices: the special pieces the pattern captured
            if i % 2:
                ids.append(self.backend.piece_to_id(part))
            elif part:
                ids += (self.backend if i == 0 else self._no_dummy_prefix).encode(part)
        return ids

    @functools.cached_property
    def _special_pieces(self) -> re.Pattern[str]:
        sp = self.backend
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
        return re.compile("(" + "|".join(map(re.escape, sorted(pieces, key=len, reverse=True))) + ")")

    @functools.cached_property
    def _no_dummy_prefix(self) -> Any:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(self.backend.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            if skip_special:
                ids = [i for i in ids if not self.backend.is_control(i)]
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's template (a plain transcript if it has none)."""
        if not self.chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

        # Templates come with downloaded files: sandboxed, as transformers renders them.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_id), eos_token=self.token_text(self.eos_id))
        except SecurityError as e:
            raise ValueError(f"{self.source}: the chat template tried something unsafe, refused: {e}") from None

    def token_id(self, text: str) -> int | None:
        """The id of the single token `text` (e.g. a special token), None if there is none."""
        if self.kind == "sentencepiece":
            i = self.backend.piece_to_id(text)
            return i if self.backend.id_to_piece(i) == text else None
        return self.backend.token_to_id(text)

    def token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        if self.kind == "sentencepiece":
            return self.backend.id_to_piece(token_id)
        return self.backend.id_to_token(token_id) or ""


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def from_sentencepiece(path: str, chat_template: str | None = None, add_bos: bool = True) -> Tokenizer:
    """LLaMA 1/2 `tokenizer.model`: BOS prepended (unless `add_bos=False`), EOS ends generation."""
    import sentencepiece

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
    bos, eos = sp.bos_id(), sp.eos_id()
    return Tokenizer(sp, "sentencepiece", bos if bos >= 0 else None, eos if eos >= 0 else None,
                     add_bos=add_bos, chat_template=chat_template, source=path)


def from_tokenizer_model(path: str, chat_template: str | None = None, add_bos: bool = True) -> Tokenizer:
    """A `tokenizer.model`: sentencepiece (LLaMA 1/2) or tiktoken BPE (LLaMA-3, told apart by its text lines)."""
    from pyllama_jax import tokenizer_tiktoken

    if os.path.isfile(path) and tokenizer_tiktoken.is_tiktoken_file(path):
        return from_tiktoken(path, chat_template, add_bos)
    return from_sentencepiece(path, chat_template, add_bos)


def from_tiktoken(path: str, chat_template: str | None = None, add_bos: bool = True) -> Tokenizer:
    """LLaMA-3's tiktoken `tokenizer.model`: `<|begin_of_text|>` prepended, `<|end_of_text|>` and
    `<|eot_id|>` end generation."""
    from pyllama_jax.tokenizer_tiktoken import TiktokenBackend

    backend = TiktokenBackend(path)
    return Tokenizer(backend, "tiktoken", backend.special["<|begin_of_text|>"], backend.special["<|end_of_text|>"],
                     add_bos=add_bos, chat_template=chat_template, source=path,
                     extra_eos_ids=[backend.special["<|eot_id|>"]])


def from_hf_folder(folder: str) -> Tokenizer:
    """An HF folder's `tokenizer.json` (+ `tokenizer_config.json`), or its `tokenizer.model`."""
    tj, tc = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer_config.json")
    cfg: dict[str, Any] = {}
    if os.path.isfile(tc):
        with open(tc) as f:
            cfg = json.load(f)
    template = cfg.get("chat_template")
    jinja = os.path.join(folder, "chat_template.jinja")  # where transformers >= 4.5x saves it
    if template is None and os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    if not os.path.isfile(tj):
        sp = os.path.join(folder, "tokenizer.model")
        if os.path.isfile(sp):
            return from_tokenizer_model(sp, template, add_bos=cfg.get("add_bos_token", True))
        raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tk = HFTokenizer.from_file(tj)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{tj}: not a valid tokenizer.json ({e})") from e

    def token_id(key: str) -> int | None:
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return tk.token_to_id(tok) if tok else None

    bos = token_id("bos_token")
    if "add_bos_token" in cfg:  # transformers then rebuilds the post-processor from the flag
        add_bos = bool(cfg["add_bos_token"])
    elif tk.post_processor is not None:  # transformers keeps it: BOS as it adds one
        added = _post_processor_bos(tk)
        add_bos, bos = added is not None, bos if added is None else added
    else:
        add_bos = bos is not None and "llama" in str(cfg.get("tokenizer_class", "")).lower()
    return Tokenizer(tk, "hf", bos, token_id("eos_token"), add_bos=add_bos, chat_template=template, source=tj)


def _post_processor_bos(tk: Any) -> int | None:
    """The special token a tokenizer.json's post-processor puts before the text (LLaMA-3's BOS), if any."""
    enc = tk.encode("a")
    return enc.ids[0] if enc.special_tokens_mask[:1] == [1] else None


def from_gguf(fields: dict[str, Any], source: str) -> Tokenizer:
    """The vocabulary embedded in a GGUF file (`tokenizer.ggml.*` fields)."""
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{source}: no tokenizer.ggml.tokens field")
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={model!r} is not supported from GGUF metadata; "
                         "expected 'gpt2' (byte-level BPE). For sentencepiece vocabularies put the model's "
                         "tokenizer.model beside the .gguf file")
    return Tokenizer(_gguf_bpe(fields, tokens, source), "hf", fields.get("tokenizer.ggml.bos_token_id"),
                     fields.get("tokenizer.ggml.eos_token_id"),
                     add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=fields.get("tokenizer.chat_template"), source=source,
                     extra_eos_ids=[i for i in [fields.get("tokenizer.ggml.eot_token_id")] if i is not None])


def _special_tokens(fields: dict[str, Any], tokens: list[str]) -> list[str]:
    types = fields.get("tokenizer.ggml.token_type") or []
    return [tokens[i] for i, t in enumerate(types) if t == _GGUF_CONTROL]


def _gguf_bpe(fields: dict[str, Any], tokens: list[str], source: str):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    tk = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                fuse_unk=False, byte_fallback=False))
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre == "llama-bpe":  # LLaMA-3's tokenizer.json: its own split regex, then bytes -> unicode
        from tokenizers import Regex

        from pyllama_jax.tokenizer_tiktoken import PATTERN

        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _GGUF_DIGIT_SPLIT:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                            if _GGUF_DIGIT_SPLIT[pre] else byte_level)
    else:
        raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; expected one of "
                         f"{sorted([*_GGUF_DIGIT_SPLIT, 'llama-bpe'])}")
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(_special_tokens(fields, tokens))
    return tk
