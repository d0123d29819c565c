"""The command-line programs (`pyllama-run`, `pyllama-serve`, ... in setup.py; `scripts/*.py` call them)."""
