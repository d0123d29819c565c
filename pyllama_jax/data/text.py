"""Text corpora for calibration and perplexity: local files or GPTQ's dataset names.

`wikitext2`, `ptb` and `c4` are fetched with `datasets` and joined the way GPTQ's `datautils.py`
does; any other name is a local text file (CRLF -> LF), optionally `path@start:end` to take a
character slice (e.g. `wiki.test.raw@640000:` for the "wiki-tail" calibration text).
"""
from __future__ import annotations

import os
import random
from typing import Sequence

import numpy as np

DATASETS = ("wikitext2", "ptb", "c4")


def data_dir() -> str:
    """Where the shared reference data lives (`$PYLLAMA_DATA_DIR`, default `<repo>/../shared/data`)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.environ.get("PYLLAMA_DATA_DIR", os.path.join(repo, "..", "shared", "data"))


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"corpus {name!r} is fetched with the `datasets` package: pip install datasets, "
                          "or pass a local text file") from e
    if name == "wikitext2":
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
        return "\n\n".join(rows)
    if name == "ptb":
        rows = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
        return ("\n\n" if split == "train" else " ").join(rows)
    files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
    rows = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)["text"]
    return " ".join(rows[:1100]) if split == "validation" else "\n\n".join(rows)


def load_text(source: str, split: str = "test") -> str:
    """The text of a corpus name (`wikitext2`, `ptb`, `c4`; `split` train/test) or a local file.

    A local path may end in `@start:end`, a character slice taken after CRLF -> LF.
    """
    if source in DATASETS:
        return _hub_text(source, "validation" if source == "c4" and split == "test" else split)
    path, _, span = source.partition("@")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus {source!r}: no such file (expected one of {DATASETS} or a text file)")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read().replace("\r\n", "\n")
    if span:
        try:
            start, end = (int(p) if p else None for p in span.split(":"))
        except ValueError:
            raise ValueError(f"corpus {source!r}: expected `path@start:end` with integer character offsets") from None
        text = text[start:end]
    if not text:
        raise ValueError(f"corpus {source!r} is empty")
    return text


def eval_windows(ids: Sequence[int], seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows `[n, seqlen]` from the start, remainder dropped (GPTQ's protocol)."""
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of seqlen={seqlen}")
    return np.asarray(ids[:n * seqlen], np.int32).reshape(n, seqlen)


def calibration_windows(ids: Sequence[int], nsamples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """`nsamples` random windows `[nsamples, seqlen]`, drawn as GPTQ's `get_*` loaders do.

    `random.seed(seed)`, then each start is `random.randint(0, len(ids) - seqlen - 1)`.
    """
    if len(ids) <= seqlen:
        raise ValueError(f"calibration text has {len(ids)} tokens; it needs more than seqlen={seqlen}")
    random.seed(seed)
    ids = np.asarray(ids, np.int32)
    starts = [random.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return np.stack([ids[s:s + seqlen] for s in starts])
