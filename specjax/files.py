"""Atomic file output: a reader never sees a half-written file, and a failure leaves nothing.

:func:`check_writable` / :func:`check_writable_dir` let a program refuse an output path that it
could not write BEFORE doing the work (a directory given for a file, a parent that is a file, a
read-only or virtual location), with the path the user gave in the message.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the path and what to do."""


def _make_parent(path: str, what: str) -> str:
    """Creates the parent directory of ``path`` (OutputPathError, naming ``path``, if it
    cannot be created: a parent that is a file, no permission)."""
    directory = os.path.dirname(os.path.abspath(path))
    probe = directory
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise OutputPathError(f"{what} {path!r} cannot be created: {probe!r} is a file, not a "
                              "directory; choose another path")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{what} {path!r}: cannot create its directory {directory!r} "
                              f"({e.strerror}); choose a writable path") from None
    return directory


def _probe_write(directory: str, path: str, what: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputPathError(f"{what} {path!r} cannot be written ({e.strerror} in "
                              f"{directory!r}); choose a writable path") from None


def check_writable(path: str, what: str = "output file") -> str:
    """Checks, before any work, that :func:`write_atomic` will be able to write ``path``: not a
    directory, its parent creatable (created here) and writable. Returns ``path``.

    Raises:
      OutputPathError: naming ``what`` and the path as given.
    """
    if os.path.isdir(path):
        raise OutputPathError(f"{what} {path!r} is a directory: give a file path")
    _probe_write(_make_parent(path, what), path, what)
    return path


def check_writable_dir(path: str, what: str = "output directory") -> str:
    """Like :func:`check_writable` for a directory that files will be written into (created
    here). Returns ``path``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{what} {path!r} is a file: give a directory")
    _make_parent(os.path.join(path, "x"), what)
    _probe_write(path, path, what)
    return path


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
