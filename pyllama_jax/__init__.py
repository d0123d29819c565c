"""pyllama-jax: LLaMA-family models in JAX/Flax, small, fast and easy to study.

The facade is imported lazily, so `python -m pyllama_jax.download` does not start JAX.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Model": "api", "load": "api", "load_from_config": "api", "Generation": "generate", "SamplingConfig": "generate",
            "ModelConfig": "model.config", "preset": "model.config",
            "quantize": "quant.recipe", "QuantRecipe": "quant.recipe", "perplexity": "eval.perplexity"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyllama_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pyllama_jax.{_EXPORTS[name]}"), name)
