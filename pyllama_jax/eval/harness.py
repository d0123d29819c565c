"""`lm_eval`'s command line with the `pyllama_jax` model registered (the CLI only knows models
imported before it parses its arguments):

    python -m pyllama_jax.eval.harness --model pyllama_jax --model_args path=smollm2-135m --tasks arc_easy
"""
from __future__ import annotations

import pyllama_jax.eval.lm_eval_model  # noqa: F401  (registers the model)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
