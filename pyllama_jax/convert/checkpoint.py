"""What every format reader yields: an opened `Checkpoint`, and `NameMap`, a format's tensor names <-> ours."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

from pyllama_jax.model.config import ModelConfig
from pyllama_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Checkpoint:
    """An opened checkpoint; `tensors` is read lazily, one `(name, array)` pair at a time.

    `quant` (quantized checkpoints): `recipe` (what made it), `layout` (per quantized linear path:
    `bits`, `groupsize`, `scales_dtype`) and, where known, `made_from` (the source model).
    """

    config: ModelConfig
    tensors: Iterable[tuple[str, np.ndarray]]
    tokenizer: Tokenizer | None
    source: str
    quant: dict[str, Any] | None = None


class NameMap:
    """Two-way renaming between a format's tensor names and ours (`layers.3.attn.q.kernel`)."""

    def __init__(self, top: dict[str, str], layer_prefix: str, layer: dict[str, str]):
        self.top, self.prefix, self.layer = top, layer_prefix, layer
        self._top_back = {v: k for k, v in top.items()}
        self._layer_back = {v: k for k, v in layer.items()}

    def ours(self, name: str) -> str | None:
        """Our name for the format's `name`, or None if it is not a LLaMA weight."""
        if name in self.top:
            return self.top[name]
        if name.startswith(self.prefix):
            index, _, rest = name[len(self.prefix):].partition(".")
            if index.isdigit() and rest in self.layer:
                return f"layers.{index}.{self.layer[rest]}"
        return None

    def theirs(self, name: str) -> str:
        if name in self._top_back:
            return self._top_back[name]
        _, index, rest = name.split(".", 2)
        return f"{self.prefix}{index}.{self._layer_back[rest]}"
