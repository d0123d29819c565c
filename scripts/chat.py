"""`pyllama-chat` from a checkout (pyllama_jax/cli/chat.py)."""
from pyllama_jax.cli.chat import main

if __name__ == "__main__":
    raise SystemExit(main())
