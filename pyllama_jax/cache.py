"""Where pyllama-jax keeps what it builds once per machine: compiled CPU kernels and XLA programs.

`$PYLLAMA_CACHE_DIR`, else `$XDG_CACHE_HOME/pyllama_jax`, else `~/.cache/pyllama_jax`. The XLA
programs go to JAX's persistent compilation cache (`xla/`, at most 2 GiB, least recently used
entries dropped first), so a second run of the same model skips most of its compilation. It is
switched on when the package is imported, before JAX is, unless the user configured JAX's cache
already (`JAX_COMPILATION_CACHE_DIR`) or set `PYLLAMA_COMPILATION_CACHE=0`.
"""
from __future__ import annotations

import os
import sys

XLA_CACHE_BYTES = 2 * 2 ** 30


def cache_dir(*parts: str) -> str:
    """A folder under the pyllama-jax cache (not created here)."""
    base = os.environ.get("PYLLAMA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pyllama_jax")
    return os.path.join(base, *parts)


def enable_compilation_cache() -> str | None:
    """Point JAX's persistent compilation cache at `cache_dir("xla")`; returns the folder, or None
    when it is switched off or the user chose another one."""
    if os.environ.get("PYLLAMA_COMPILATION_CACHE", "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    folder = cache_dir("xla")
    settings = {"jax_compilation_cache_dir": folder, "jax_compilation_cache_max_size": XLA_CACHE_BYTES}
    if "jax" in sys.modules:  # imported before us: its config has read the environment already
        import jax

        if jax.config.jax_compilation_cache_dir:
            return None
        for name, value in settings.items():
            jax.config.update(name, value)
    else:
        for name, value in settings.items():
            os.environ.setdefault(name.upper(), str(value))
    return folder
