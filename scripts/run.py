"""`pyllama-run` from a checkout (pyllama_jax/cli/run.py)."""
from pyllama_jax.cli.run import main

if __name__ == "__main__":
    raise SystemExit(main())
