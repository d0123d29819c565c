"""The local side of a download: is the folder writable, the disk's errors as FolderError, ``.part`` names."""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyllama_jax.download.errors import FolderError

# OSErrors of the local disk, as opposed to the network's.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR,
                errno.EISDIR}


def existing(folder: Path) -> Path:
    """``folder``, or its nearest existing parent."""
    path = folder.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_folder(folder: Path) -> None:
    """Raise FolderError unless ``folder`` is, or can be made, a writable folder."""
    path = existing(Path(folder))
    if not path.is_dir():
        raise FolderError(f"{path} is a file, not a folder: choose another download folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise FolderError(f"cannot write to {path}: permission denied or a read-only disk")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Re-raise the local disk's errors (read-only, a file in the way, full) as FolderError naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        raise FolderError(f"cannot write {path}: {e.strerror} (once fixed, rerun to resume)") from e


def part_path(dest: Path) -> Path:
    """Where ``dest`` is written until it is verified."""
    return dest.with_name(dest.name + ".part")
