"""`pyllama-convert` from a checkout (pyllama_jax/cli/convert.py)."""
from pyllama_jax.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
