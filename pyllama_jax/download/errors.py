"""The download's errors; each message names the file or folder and what went wrong."""
from __future__ import annotations


class DownloadError(RuntimeError):
    """A file could not be fetched or verified, or the run cannot start; the message says which and why."""


class FolderError(DownloadError):
    """The download folder cannot be written (read-only, a file, a full disk); the message names the path."""
