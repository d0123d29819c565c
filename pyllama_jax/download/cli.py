"""The command line of ``python -m pyllama_jax.download``: its arguments and the dry-run report."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from pyllama_jax.download.layout import Item
from pyllama_jax.download.transfer import size_text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """The parsed arguments; exits with a usage error when there is nothing to download from."""
    p = argparse.ArgumentParser(prog="python -m pyllama_jax.download", description=description)
    p.add_argument("--model_size", default="7B",
                   help="comma-separated: 7B,13B,30B,65B or llama-2-7b,llama-2-13b,llama-2-70b (also -chat)")
    p.add_argument("--folder", type=Path, default=Path("pyllama_data"), help="download root (default: %(default)s)")
    p.add_argument("--url", default=os.environ.get("PYLLAMA_DOWNLOAD_URL"),
                   help="Meta's presigned URL (with its '*') or a mirror base URL; default $PYLLAMA_DOWNLOAD_URL")
    p.add_argument("--workers", type=_positive, default=4, help="files fetched in parallel")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    p.add_argument("--retries", type=_positive, default=6, help="attempts per file")
    p.add_argument("--dry_run", action="store_true", help="list files and sizes, fetch nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    hf = p.add_argument_group("Hugging Face (instead of Meta's layout)")
    hf.add_argument("--hf", metavar="REPO_ID", help="download this repository with huggingface_hub")
    hf.add_argument("--revision", help="branch, tag or commit")
    hf.add_argument("--allow_patterns", nargs="+", metavar="GLOB", help="only files matching these")
    hf.add_argument("--ignore_patterns", nargs="+", metavar="GLOB", help="skip files matching these")
    args = p.parse_args(argv)
    if not args.hf and not args.url:
        p.error("no download URL: pass --url or set PYLLAMA_DOWNLOAD_URL (or use --hf REPO_ID)")
    return args


def format_plan(folder: Path, items: Sequence[Item], free: int) -> str:
    """The dry-run report: one line per file, then the space needed against the space free."""
    width = max((len(i.rel) for i in items), default=0)
    lines = [f"would fetch into {folder}:"]
    for i in items:
        state = ("present, verified on download" if i.complete
                 else f"resume from {size_text(i.local)}" if i.local else "new")
        lines.append(f"  {i.rel:<{width}}  {size_text(i.size):>9}  {state}")
    unknown = sum(i.size is None and not i.complete for i in items)
    extra = f" plus {unknown} file(s) of unknown size" if unknown else ""
    lines.append(f"needs {size_text(sum(i.needed for i in items))} more{extra}; {size_text(free)} free")
    return "\n".join(lines)
