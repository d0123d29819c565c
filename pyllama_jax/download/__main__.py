"""``python -m pyllama_jax.download``: see ``--help``."""
import sys

from pyllama_jax.download import main

sys.exit(main())
