"""Random-weight models for tests that need a seed or changed shapes (`pj.load("random:tiny")` is seed 0)."""
from __future__ import annotations

from typing import Any

from pyllama_jax.api import Model
from pyllama_jax.convert.random_weights import open_random
from pyllama_jax.model.params import build_model


def random_model(name: str = "random:tiny", seed: int = 0, **changes: Any) -> Model:
    """`random:<preset>` (or the bare preset name) with weights from `seed` and `changes` to the preset."""
    ckpt = open_random(name, seed, **changes)
    return Model(build_model(ckpt.config, ckpt.tensors, ckpt.source), ckpt.tokenizer, ckpt.source)
