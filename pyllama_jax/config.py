"""The default job configuration that every `configs/*.py` file starts from.

Each section belongs to one part of the project; a field's comment says what it does.
"""
from __future__ import annotations

import os

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    from pyllama_jax.quant.recipe import quant_config

    c = ml_collections.ConfigDict()
    c.model = "smollm2-135m"  # .gguf file, HF/Meta folder, native checkpoint, or embedded name
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16
    c.param_dtype = "float32"  # weight storage dtype: float32 | bfloat16 | float16
    c.kv_dtype = "auto"  # KV cache: auto (the compute dtype) | int8 (per-position, per-head scales)
    # run.py's prompts: a tuple, so that --config.prompts='("one", "two")' can replace it
    c.prompts = ("Tell me a short story about a robot who learns to paint.",)
    c.chat = True  # wrap prompts in the model's chat template (instruct models)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 64  # tokens generated per prompt at most
    c.sampling.temperature = 0.0  # 0 = greedy
    c.sampling.top_k = 0  # 0 = no top-k cut
    c.sampling.top_p = 1.0  # nucleus sampling mass
    c.sampling.seed = 0  # sampling RNG seed
    c.sampling.stop = ()  # stop strings

    c.quant = quant_config(wbits=0)  # GPTQ/RTN fields (quant/recipe.py); wbits 0 = dense

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
    c.train = train_config()
    c.serve = serve_config()
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


def train_config() -> ml_collections.ConfigDict:
    """Fine-tuning (`pyllama_jax.train`): optimizer, LoRA, checkpoints, logging, export."""
    t = ml_collections.ConfigDict()
    t.workdir = "runs/finetune"  # checkpoints, metrics.csv, loss.png, samples.md
    t.lora = True  # train LoRA adapters only (on a quantized base when quant.wbits > 0); False = full
    t.lora_rank = 8  # adapter rank r
    t.lora_alpha = 16.0  # adapter scale is alpha / r
    t.lora_dropout = 0.05  # dropout on the adapter's input
    t.lora_targets = ("attn.q", "attn.k", "attn.v", "attn.o")  # linears that get adapters
    t.steps = 300  # optimizer steps
    t.batch_size = 8  # rows per optimizer step
    t.grad_accum = 1  # micro-batches per step (batch_size / grad_accum rows each)
    t.lr = 2e-4  # peak learning rate
    t.warmup_steps = 20  # linear warmup steps
    t.end_lr_ratio = 0.1  # cosine decay ends at lr * end_lr_ratio
    t.weight_decay = 0.0  # AdamW weight decay (matrices only)
    t.clip_norm = 1.0  # global gradient-norm clip; 0 = off
    t.seed = 0  # data order, held-out split, adapter init and dropout
    t.save_every = 50  # steps between checkpoints
    t.keep = 3  # checkpoints kept
    t.eval_every = 50  # steps between held-out losses (0 = only at start and end)
    t.sample_every = 100  # steps between sample generations (0 = only at start and end)
    t.samples = 2  # held-out examples to generate for
    t.sample_tokens = 64  # new tokens per sample generation
    t.export_format = ""  # after training: "native", "hf" or "meta" (LoRA merged first); "" = none
    t.export_path = ""  # where to export (default <workdir>/export)
    return t


def serve_config() -> ml_collections.ConfigDict:
    """The HTTP server (`scripts/serve.py`, `pyllama_jax.serve`)."""
    s = ml_collections.ConfigDict()
    s.host = "127.0.0.1"  # address to bind; anything but loopback requires an API key
    s.port = 8000  # TCP port (0 = any free port, printed at start)
    s.api_key = ""  # bearer token required on /v1/ (or $PYLLAMA_API_KEY); "" = none, local use only
    s.model_name = ""  # the model id clients send ("" = the model's file or folder name)
    s.slots = 8  # concurrent generations: rows of the decode batch
    s.context = 2048  # tokens per slot, prompt + completion (capped at the model's; 0 = the model's)
    s.max_queue = 64  # requests waiting for a slot before new ones get HTTP 503
    s.prefill_chunk = 64  # prompt tokens read per step (interleaved with decode steps)
    return s


def alpaca_config() -> ml_collections.ConfigDict:
    """LoRA fine-tuning of the default model on Stanford Alpaca's 175 seed tasks (from
    `$PYLLAMA_DATA_DIR`, default `<repo>/../shared/data`), sized for a CPU."""
    from pyllama_jax.data.text import data_dir

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
    from pyllama_jax.data.text import data_dir
    from pyllama_jax.quant.recipe import quant_config

    wiki = os.path.join(data_dir(), "wikitext-2-raw", "wiki.test.raw")
    c = base_config()
    c.quant = quant_config(wbits=wbits, groupsize=groupsize, calibration=wiki + "@640000:", nsamples=128,
                           seqlen=512, save=f"artifacts/smollm2_135m_{wbits}bit", eval=(wiki,), eval_windows=128)
    return c
