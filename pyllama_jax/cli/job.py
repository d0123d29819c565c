"""The `--config` flag of the config-driven commands: a job config file, found in the working
directory or, by its name, among the configs that ship with the package (`pyllama_jax/configs`)."""
from __future__ import annotations

import importlib.resources
import os
import sys
from typing import Callable

import ml_collections
from absl import app
from ml_collections import config_flags

CONFIGS = importlib.resources.files("pyllama_jax") / "configs"
HELP = ("job configuration file: a path, or the name of a packaged config (e.g. smollm2_135m_4bit.py; "
        "configs/<name> also finds it outside a checkout)")


def resolve(value: str) -> str:
    """`value` (config_flags' `file.py[:argument]`) if its file exists, else the packaged config of
    that file name if there is one, else `value` unchanged (config_flags then names the missing file)."""
    file, sep, argument = value.partition(":")
    if os.path.exists(file):
        return value
    packaged = CONFIGS / os.path.basename(file)
    return str(packaged) + sep + argument if packaged.is_file() else value


def _resolve_argv(argv: list[str]) -> list[str]:
    """`argv` with the value of `--config=FILE` / `--config FILE` resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def run(job: Callable[[ml_collections.ConfigDict], None], default: str) -> None:
    """Parse the command line (flags defined before this call included) and run `job(config)`;
    `default`: the packaged config used without `--config`."""
    argv = _resolve_argv(sys.argv)
    config = config_flags.DEFINE_config_file("config", resolve(default), HELP, sys_argv=argv)
    app.run(lambda _: job(config.value), argv=argv)
