"""LLaMA-65B with 4-bit weights (groupsize 128) on 8 devices: 4-way tensor x 2-way FSDP.

    python scripts/run.py --config=configs/65b_4bit.py                     # one host, 8 GPUs
    python scripts/run.py --config=configs/65b_4bit.py \
        --config.distributed.coordinator_address=host0:1234 \
        --config.distributed.num_processes=2 --config.distributed.process_id=$RANK   # 2 hosts x 4 GPUs

Tensor parallelism splits heads (64) and the SwiGLU width (22016 = 172 groups of 128) 4 ways; 172
groups do not split 8 ways at group boundaries, so the other factor of 2 shards the model
dimension (FSDP). Each device then holds about 1/8 of the ~33 GB of packed weights.
Point `model` at Meta's 65B folder (or --config.model=...).
"""
from pyllama_jax.config import meta_llama_config


def get_config():
    c = meta_llama_config("~/llama/65B")
    c.quant.wbits = 4
    c.quant.groupsize = 128
    c.mesh.data = 1
    c.mesh.fsdp = 2
    c.mesh.tensor = 4  # within a host: the mesh's last axis runs over neighbouring devices
    return c
