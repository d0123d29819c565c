"""`random:<preset>` names: a preset's shapes (`pyllama_jax.model.config.PRESETS`) with random weights
and a byte-level tokenizer, for smoke tests and experiments that need no checkpoint
(`pj.load("random:tiny")`, `model = "random:tiny"` in a job config)."""
from __future__ import annotations

from typing import Any

from pyllama_jax import tokenizer as tok
from pyllama_jax.convert.checkpoint import Checkpoint
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.model.params import named_tensors

PREFIX = "random:"


def byte_tokenizer() -> tok.Tokenizer:
    """256 byte tokens plus `<|endoftext|>` (id 256) as EOS."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return tok.Tokenizer(backend, "hf", None, len(alphabet), add_bos=False, source="bytes")


def open_random(name: str, seed: int = 0, **overrides: Any) -> Checkpoint:
    """`random:<preset>` as a checkpoint: the preset with `overrides` (its vocabulary defaults to the
    byte tokenizer's), weights drawn from `seed` (normal, std 0.02)."""
    tokenizer = byte_tokenizer()
    config = preset(name.removeprefix(PREFIX), **{"vocab_size": tokenizer.vocab_size, **overrides})
    return Checkpoint(config, named_tensors(init_model(config, seed)), tokenizer, name)
