"""Makes the repository root importable however pytest is invoked (``pytest tests`` or
``python -m pytest``), so tests import ``specjax`` / ``models`` from this checkout."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drops every compiled executable after each test module. Without this, the whole suite
    in one process crashed twice while XLA compiled the same late test (an abort, then a
    segfault; the test passes alone). The likely cause is the per-process memory-map limit
    (vm.max_map_count = 65530): sampled during a run, the process's mappings grew by up to
    ~9,000 within one test module and fell back to ~1,500 once its programs were dropped."""
    yield
    jax.clear_caches()
    gc.collect()
