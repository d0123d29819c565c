"""pyllama-jax: LLaMA-family models in JAX/Flax, small, fast and easy to study."""
from pyllama_jax.api import Model, load
from pyllama_jax.generate import Generation, SamplingConfig
from pyllama_jax.model.config import ModelConfig, preset

__all__ = ["Model", "load", "Generation", "SamplingConfig", "ModelConfig", "preset"]
