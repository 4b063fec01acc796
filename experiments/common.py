"""Shared pieces of the experiment binaries: user-facing errors, atomic output, prompt files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

# jax logs at INFO that it found no TPU on every CPU run; keep the binaries' output readable.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, no traceback, exit code 2."""


@contextlib.contextmanager
def user_errors():
    """Turns library input errors into a one-line message and exit status 2."""
    from specjax.cache import CacheCapacityError
    try:
        yield
    except (UserError, ValueError, FileNotFoundError, CacheCapacityError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically: a reader never sees a half-written file,
    and a failure leaves no partial output."""
    from specjax.files import write_text_atomic
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line."""
    if not os.path.exists(path):
        raise UserError(f"--prompts_file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UserError(f"--prompts_file {path!r} has no non-empty lines")
    return prompts
