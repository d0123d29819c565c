"""LLaMA-13B from Meta's files (params.json, consolidated.00.pth and .01.pth, tokenizer.model), bfloat16.

Point `model` at the folder, e.g. --config.model=/data/llama/13B (tokenizer.model may sit in the
folder or its parent, as Meta's download lays it out). Get the files with scripts/download.py.
"""
from pyllama_jax.config import meta_llama_config


def get_config():
    return meta_llama_config("~/llama/13B")
