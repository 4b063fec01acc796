"""notebooks/quickstart.ipynb: committed with fresh outputs (every code cell executed, in
order, no errors), and it still executes top to bottom (a copy, with nbclient, from the
repository root, in a kernel running this interpreter); the committed file is left unchanged.

Executing the notebook takes a few minutes on the 2-core development CPU (mostly compilation).
"""

import hashlib
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

XLA_OPTIMIZE = True  # its time is running SmolLM2, not compiling (tests/conftest.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
CELL_TIMEOUT_S = 900  # the benchmark cell: ~2.5 min on a busy 2-core CPU
MAX_NOTEBOOK_BYTES = 200_000  # outputs stay small: text, one small PNG


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _digest() -> str:
    with open(NOTEBOOK, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_committed_notebook_has_outputs():
    nb = _read()
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert cells, "the notebook has no code cells"
    # Executed once, top to bottom, in one kernel: counts 1, 2, 3, ...
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), \
        "re-execute the whole notebook before committing (cells run out of order or not at all)"
    for i, cell in enumerate(cells, 1):
        assert cell.outputs, f"code cell {i} has no output: execute the notebook before committing"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"code cell {i} has an error output: {errors[0].get('ename')}"
    assert os.path.getsize(NOTEBOOK) <= MAX_NOTEBOOK_BYTES, "notebook outputs are too large"
    assert nb.metadata.kernelspec.name == "python3"


def test_notebook_executes():
    before = _digest()
    nb = _read()  # an in-memory copy: the committed file is never written
    # Test-only last cell: the kernel must run this interpreter (the project's virtualenv).
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
    for i, cell in enumerate(_code_cells(nb), 1):
        assert not [o for o in cell.outputs if o.output_type == "error"], f"code cell {i}"
    executable = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert _digest() == before, "executing the notebook modified the committed file"
