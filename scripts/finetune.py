"""Instruction fine-tuning (full, LoRA, or LoRA on a quantized base) from one config file.

    python scripts/finetune.py --config=configs/alpaca_lora.py --config.train.steps=200

Re-running the same command resumes from the last checkpoint in `train.workdir`.
"""
from __future__ import annotations

from absl import app, logging
from ml_collections import config_flags

from pyllama_jax.train.run import finetune

_CONFIG = config_flags.DEFINE_config_file("config", "configs/alpaca_lora.py", "job configuration file")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    finetune(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
