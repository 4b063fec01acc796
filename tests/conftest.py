"""Shared fixtures, and the repository root made importable however pytest is invoked
(``pytest tests`` or ``python -m pytest``), so tests import ``specjax`` / ``models`` from this
checkout.

Fixtures (module-scoped: built once per test module that asks for them):

* ``target``: the tiny GQA model (vocabulary 128), ``(model, params)``;
* ``reference``: ``(config, rows)``, plain greedy decoding of ``tinymodels.PROMPTS`` on
  ``target`` (20 new tokens, EOS 13): the rows every lossless method must reproduce;
* ``small_vocab_target`` / ``small_vocab_reference``: the same for a multi-head tiny Llama with
  a vocabulary of ``tinymodels.SMALL_VOCAB`` (24 new tokens, EOS 13), used by the Jacobi and
  lookahead tests.

Constants and helpers tests import live in ``tinymodels.py`` and ``sequence_kit.py``.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

import tinymodels  # noqa: E402
from specjax.decode import DecodeConfig, generate  # noqa: E402


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


@pytest.fixture(scope="module")
def target():
    """The tiny GQA model (vocabulary 128): ``(model, params)``."""
    return tinymodels.tiny_model("gqa")


@pytest.fixture(scope="module")
def reference(target):
    """``(config, rows)``: plain greedy decoding of ``tinymodels.PROMPTS`` on ``target``."""
    model, params = target
    config = DecodeConfig(max_new_tokens=20, eos_ids=(13,))
    return config, tinymodels.rows_of(generate(model, params, tinymodels.PROMPTS, config))


@pytest.fixture(scope="module")
def small_vocab_target():
    """A multi-head tiny Llama with a vocabulary of ``tinymodels.SMALL_VOCAB``."""
    return tinymodels.tiny_model("llama", vocab_size=tinymodels.SMALL_VOCAB)


@pytest.fixture(scope="module")
def small_vocab_reference(small_vocab_target):
    """``(config, rows)``: plain greedy decoding of ``tinymodels.PROMPTS`` on
    ``small_vocab_target``."""
    model, params = small_vocab_target
    config = DecodeConfig(max_new_tokens=24, eos_ids=(13,))
    return config, tinymodels.rows_of(generate(model, params, tinymodels.PROMPTS, config))
