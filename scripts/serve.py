"""`pyllama-serve` from a checkout (pyllama_jax/cli/serve.py)."""
from pyllama_jax.cli.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
