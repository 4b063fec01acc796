"""Atomic file output: a reader never sees a half-written file, and a failure leaves nothing."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable


def write_atomic(path: str, write: Callable[[str], None]) -> str:
    """Calls ``write(tmp_path)`` on a temporary file beside ``path``, then renames it to ``path``.

    The directory is created if needed; the file gets mode 0644 (``mkstemp`` makes 0600). On
    any exception the temporary file is removed and ``path`` is left as it was.

    Returns:
      ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1] or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str, text: str) -> str:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write_atomic(path, write)
