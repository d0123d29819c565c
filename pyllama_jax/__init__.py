"""pyllama-jax: LLaMA-family models in JAX/Flax, small, fast and easy to study.

The facade is imported lazily, so `python -m pyllama_jax.download` does not start JAX. Importing the
package switches on JAX's persistent compilation cache (see `pyllama_jax.cache`).
"""
from __future__ import annotations

import importlib
from typing import Any

from pyllama_jax.cache import enable_compilation_cache

enable_compilation_cache()

_EXPORTS = {"Model": "api", "load": "api", "load_from_config": "jobs.quantize", "Generation": "generate", "SamplingConfig": "generate",
            "ModelConfig": "model.config", "preset": "model.config",
            "quantize": "api", "QuantRecipe": "quant.recipe", "perplexity": "eval.perplexity"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyllama_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pyllama_jax.{_EXPORTS[name]}"), name)
