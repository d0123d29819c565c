"""`pyllama-download` from a checkout (pyllama_jax/download.py)."""
from pyllama_jax.download import main

if __name__ == "__main__":
    raise SystemExit(main())
