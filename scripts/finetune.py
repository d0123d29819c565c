"""`pyllama-finetune` from a checkout (pyllama_jax/cli/finetune.py)."""
from pyllama_jax.cli.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
