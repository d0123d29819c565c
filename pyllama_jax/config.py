"""The default job configuration that every `configs/*.py` file starts from.

Each section belongs to one part of the project. `sampling`, `serve` and `train` are made from the
dataclasses they configure (`SECTIONS`; each field's comment sits there), `quant` from `QuantRecipe`.
"""
from __future__ import annotations

import os

import ml_collections

from pyllama_jax.data.text import data_dir
from pyllama_jax.generate import SamplingConfig
from pyllama_jax.jobs.quantize import quant_config
from pyllama_jax.sections import config_section
from pyllama_jax.serve.engine import EngineConfig
from pyllama_jax.serve.openai_api import ServerConfig
from pyllama_jax.train.run import TRAIN_SECTION

SECTIONS: dict[str, tuple[type, ...]] = {"sampling": (SamplingConfig,), "serve": (ServerConfig, EngineConfig),
                                         "train": TRAIN_SECTION}  # section -> the dataclasses it holds


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "smollm2-135m"  # .gguf file, HF/Meta folder, native checkpoint, or embedded name
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16
    c.param_dtype = "float32"  # weight storage dtype: float32 | bfloat16 | float16
    c.kv_dtype = "auto"  # KV cache: auto (the compute dtype) | int8 (per-position, per-head scales)
    # run.py's prompts: a tuple, so that --config.prompts='("one", "two")' can replace it
    c.prompts = ("Tell me a short story about a robot who learns to paint.",)
    c.chat = True  # wrap prompts in the model's chat template (instruct models)

    for name, types in SECTIONS.items():
        c[name] = config_section(*types)
    c.quant = quant_config(wbits=0)  # GPTQ/RTN fields (jobs/quantize.py); wbits 0 = dense

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # data-parallel axis size (-1 = the rest of the devices)
    c.mesh.fsdp = 1  # parameter-sharding axis size (-1 = the rest)
    c.mesh.tensor = 1  # tensor-parallel axis size (-1 = the rest)

    c.distributed = ml_collections.ConfigDict()  # multi-process jobs (sharding/multihost.py)
    c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS or 1 process
    c.distributed.num_processes = 0  # processes in the job; 0 = $JAX_NUM_PROCESSES
    c.distributed.process_id = -1  # this process's rank; -1 = $JAX_PROCESS_ID
    c.distributed.auto_detect = False  # let JAX find the layout (SLURM, Open MPI, Kubernetes, Cloud TPU)
    c.distributed.timeout_s = 300  # seconds to wait for the coordinator and the other processes

    c.data = data_config()
    return c


def data_config() -> ml_collections.ConfigDict:
    """Fine-tuning data (`pyllama_jax.data.alpaca`)."""
    d = ml_collections.ConfigDict()
    d.path = ""  # Alpaca JSON/JSONL or seed-task file, or a `datasets` name
    d.template = "alpaca"  # prompt: "alpaca" (Stanford Alpaca's template) or "chat" (the model's)
    d.seq_len = 512  # tokens per training row
    d.pack = True  # several examples per row (no attention between them); False = one, padded
    d.eval_size = 16  # examples held out for the held-out loss and sample generations
    d.overlong = "truncate"  # examples longer than seq_len: "truncate" or "drop" (both counted)
    d.on_error = "raise"  # malformed records: "raise" (stop, listing their lines) or "skip"
    return d


def alpaca_config() -> ml_collections.ConfigDict:
    """LoRA fine-tuning of the default model on Stanford Alpaca's 175 seed tasks (from
    `$PYLLAMA_DATA_DIR`, default `<repo>/../shared/data`), sized for a CPU."""
    c = base_config()
    c.data.path = os.path.join(data_dir(), "alpaca", "seed_tasks.jsonl")
    c.data.seq_len = 256
    c.train.workdir = "runs/alpaca_lora"
    c.train.lr = 1e-4
    return c


def meta_llama_config(folder: str) -> ml_collections.ConfigDict:
    """A job over Meta's LLaMA files in `folder`, in bfloat16, with plain-text prompts."""
    c = base_config()
    c.model = folder
    c.dtype = "bfloat16"
    c.param_dtype = "bfloat16"
    c.chat = False
    c.prompts = ("I believe the meaning of life is", "Simply put, the theory of relativity states that")
    return c


def smollm2_quant_config(wbits: int, groupsize: int = 128) -> ml_collections.ConfigDict:
    """SmolLM2-135M-Instruct with GPTQ weights calibrated on "wiki-tail", as in
    ../shared/reference/gptq-smollm2.md: 128 windows of 512 tokens from WikiText-2 test after
    character 640,000; perplexity on the file's first 128 windows."""
    wiki = os.path.join(data_dir(), "wikitext-2-raw", "wiki.test.raw")
    c = base_config()
    c.quant = quant_config(wbits=wbits, groupsize=groupsize, calibration=wiki + "@640000:", nsamples=128,
                           seqlen=512, save=f"artifacts/smollm2_135m_{wbits}bit", eval=(wiki,), eval_windows=128)
    return c
