#!/usr/bin/env python
"""Download LLaMA weights: same as ``python -m pyllama_jax.download`` (see ``--help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also works from a checkout that is not installed

from pyllama_jax.download import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
