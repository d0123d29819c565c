"""`pyllama-eval-ppl` from a checkout (pyllama_jax/cli/eval_ppl.py)."""
from pyllama_jax.cli.eval_ppl import main

if __name__ == "__main__":
    raise SystemExit(main())
