"""`pyllama-finetune`: instruction fine-tuning (full, LoRA, or LoRA on a quantized base) from one config file.

    python scripts/finetune.py --config=configs/alpaca_lora.py --config.train.steps=200

Re-running the same command resumes from the last checkpoint in `train.workdir`.
"""
from __future__ import annotations

import ml_collections
from absl import logging

from pyllama_jax.cli import job
from pyllama_jax.train.run import finetune


def train(c: ml_collections.ConfigDict) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    finetune(c)


def main() -> None:
    job.run(train, "alpaca_lora.py")


if __name__ == "__main__":
    main()
