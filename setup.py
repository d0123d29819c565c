"""pyllama-jax: LLaMA-family models in JAX/Flax, small, fast and easy to study."""
from setuptools import find_packages, setup

setup(
    name="pyllama_jax",
    version="0.1.0",
    description="LLaMA in JAX/Flax: load Meta/HF/GGUF checkpoints, GPTQ 2/3/4/8-bit, sharding, serving, fine-tuning",
    packages=find_packages(include=["pyllama_jax", "pyllama_jax.*"]),
    package_data={"pyllama_jax": ["configs/*.py"],  # the job configs (`configs/` in the checkout links here)
                  "pyllama_jax.serve": ["static/*"],  # the web chat page
                  "pyllama_jax.kernels": ["*.cc", "*.h"]},  # CPU kernels, compiled on first use
    entry_points={"console_scripts": [f"pyllama-{name} = pyllama_jax.{module}:main" for name, module in (
        ("run", "cli.run"), ("quantize", "cli.quantize"), ("eval-ppl", "cli.eval_ppl"), ("convert", "cli.convert"),
        ("serve", "cli.serve"), ("chat", "cli.chat"), ("finetune", "cli.finetune"),
        ("profile", "cli.profile_inference"), ("download", "download"))]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "gguf>=0.10",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "tiktoken>=0.7",  # LLaMA-3 tokenizer.model (tiktoken BPE)
        "jinja2>=3.1",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "huggingface_hub>=2.0",  # download.py --hf (snapshot_download with dry_run); pj.load of Hub ids
        "aiohttp>=3.9",  # serve: the HTTP server (handler cancellation frees a disconnected client's slot)
        "psutil>=5.9",  # serve: profile.py and the load benchmark read process memory
    ],
    extras_require={
        # PyTorch-side peers: checkpoint .pth/.bin reading, HF parity tests, benchmarks.
        "torch": ["torch>=2.6"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=5.0", "accelerate>=1.0", "datasets>=3.0", "openai>=1.0",
                 "playwright>=1.40", "pexpect>=4.8",  # web chat in Debian's chromium; terminal chat in a pty
                 "lm_eval[api]>=0.4"],
        "eval": ["lm_eval[api]>=0.4"],  # lm-evaluation-harness: python -m pyllama_jax.eval.harness
    },
)
