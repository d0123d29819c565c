"""`pyllama-profile` from a checkout (pyllama_jax/cli/profile_inference.py)."""
from pyllama_jax.cli.profile_inference import main

if __name__ == "__main__":
    raise SystemExit(main())
