"""Random-weight models with a byte-level tokenizer: `model = "random:tiny"` in a config, for
smoke tests, tests and experiments that need no checkpoint."""
from __future__ import annotations

from pyllama_jax import tokenizer as tok
from pyllama_jax.api import Model
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model

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


def random_model(name: str, seed: int = 0, **changes) -> Model:
    """`random:<preset>` with random weights; its vocabulary defaults to the byte tokenizer's."""
    tokenizer = byte_tokenizer()
    config = preset(name.removeprefix(PREFIX), **{"vocab_size": tokenizer.vocab_size, **changes})
    return Model(init_model(config, seed), tokenizer, name)
