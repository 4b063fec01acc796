"""Runs one binary on many argument lists, each in its own process, for ``test_bad_input``.

    python tests/bad_input_driver.py experiments.generate < cases.json > results.json

``cases.json``: ``[{"name": ..., "argv": [hex of each argument's bytes, ...]}, ...]``;
``results.json``: ``{name: [exit status, stderr text], ...}``.

Importing a binary's dependencies (jax, flax, every drafter) costs ~2-3 s of CPU, while a
bad-input case fails in well under a second after that. So they are imported once here, and
every case runs in a child forked from this process: a process of its own (its own exit
status, stdout and stderr on their own files, interpreter shutdown and atexit handlers
included) that runs the binary as ``__main__`` (``runpy``), as ``python -m <binary> <args>``
does, minus those imports. Nothing has initialised a JAX backend when the children fork.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What every binary imports (none of these defines a flag at import): loaded once, here.
SHARED_IMPORTS = ("jax", "jax.numpy", "flax.linen", "optax", "numpy", "absl.app",
                  "experiments.common", "experiments.method_flags", "experiments.methods",
                  "models.registry", "specjax.decode", "specjax.speculative", "specjax.engine")


def _child(name: str, argv: list[bytes], out_path: str, err_path: str):
    """In the forked child: stdout / stderr to files, then the binary run as ``__main__`` (its
    flag definitions and ``app.run``, which always exits)."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [name] + [os.fsdecode(a) for a in argv]
    runpy.run_module(name, run_name="__main__", alter_sys=True)


def main():
    name = sys.argv[1]
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    for shared in SHARED_IMPORTS:
        importlib.import_module(shared)
    from drafters import registry
    registry.methods()  # imports every drafter module
    cases = json.load(sys.stdin)
    results = {}
    # No context manager or ``finally`` around the forks: a child leaves through SystemExit,
    # which must not run the parent's clean-up (it would delete the files the parent reads).
    tmp = tempfile.mkdtemp(prefix="bad_input_")
    out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
    for case in cases:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(name, [bytes.fromhex(a) for a in case["argv"]], out_path, err_path)
            os._exit(70)  # not reached: app.run exits
        _, status = os.waitpid(pid, 0)
        with open(err_path, encoding="utf-8", errors="replace") as f:
            results[case["name"]] = [os.waitstatus_to_exitcode(status), f.read()]
    shutil.rmtree(tmp)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
