"""`pyllama-quantize` from a checkout (pyllama_jax/cli/quantize.py)."""
from pyllama_jax.cli.quantize import main

if __name__ == "__main__":
    raise SystemExit(main())
