"""Builds the packed-weight CPU matmul kernel (``packed_matmul.cc``) with the system C++ compiler.

The shared library is compiled against the XLA FFI headers of the jaxlib that is running
(``jax.ffi.include_dir()``), so its ABI always matches, and cached under
``$SPECJAX_CACHE_DIR/kernels`` (default ``~/.cache/specjax/kernels``) by a hash of the source,
the headers' jaxlib version, the compiler and its flags: a changed source or an upgraded jaxlib
builds a new library, an unchanged one is reused. The file is written atomically (compiled to a
temporary name, then renamed), so processes that build at the same time do not see a partial
library.

``make test`` and ``make demo`` run ``python -m specjax.kernels.cpu_matmul`` first (a no-op when
the library is up to date); otherwise the first use builds it (~10 s). Why not a
setuptools extension: pip builds packages in an isolated environment without jax, and a library
built there against one jaxlib's headers would silently outlive a jaxlib upgrade.

The compiler is ``$CXX`` or ``c++``; a missing compiler or a failed build raises
:class:`KernelBuildError` with the compiler's message and what to do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packed_matmul.cc")
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno")
_VERSION = 1  # bump to rebuild every cached library


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be built (no compiler, or the compiler failed)."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(
            f"no C++ compiler ({cxx!r} not found) to build specjax's CPU kernel for "
            "--weights=gguf|int8: install g++ (e.g. `apt-get install g++`) or set $CXX, or use "
            "--weights=float32.")
    return path


def _cache_dir() -> str:
    root = os.environ.get("SPECJAX_CACHE_DIR")
    if root is None:
        root = os.path.join(os.path.expanduser("~"), ".cache", "specjax")
    if not root:  # caching disabled: a per-process directory
        return tempfile.mkdtemp(prefix="specjax-kernels-")
    return os.path.join(root, "kernels")


def library_path() -> str:
    """The path of the built library, building it first when it is missing or stale."""
    import jax
    import jaxlib
    from jax import ffi

    include = ffi.include_dir()
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([
        source, jaxlib.__version__.encode(), jax.__version__.encode(), version.encode(),
        " ".join(FLAGS).encode(), str(_VERSION).encode()])).hexdigest()[:16]
    out_dir = _cache_dir()
    path = os.path.join(out_dir, f"packed_matmul-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    cmd = [cxx, *FLAGS, "-isystem", include, SOURCE, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise KernelBuildError(f"building specjax's CPU kernel failed ({' '.join(cmd)}):\n"
                               f"{tail}\nUse --weights=float32, or fix the compiler set-up.")
    os.replace(tmp, path)
    return path


def main() -> int:
    """Builds (if needed) and prints the library's path; 1 with the error on failure."""
    try:
        print(library_path())
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
