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


# How hard XLA optimises the programs a test file compiles. Most files compile many small
# programs and run each briefly: XLA's backend optimisation level 0 (JAX's
# ``jax_disable_most_optimizations``) compiles them much faster and changes no result. A file
# whose time goes into RUNNING the 30-layer SmolLM2 sets ``XLA_OPTIMIZE = True`` and keeps the
# level ``XLA_FLAGS`` gives (1 in ``make test``, 2 by default), which runs that model ~2.5x
# faster than level 0. The choice reaches the binaries a file starts as subprocesses through
# ``JAX_DISABLE_MOST_OPTIMIZATIONS``. Measured per file in CPU seconds (WORKSPACE "Decisions"),
# e.g. test_jacobi 54 -> 34 at level 0, test_notebook 442 at level 0 against 237 at level 2.
_OPT_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"


@pytest.fixture(autouse=True, scope="module")
def _xla_optimisation_level(request):
    optimise = bool(getattr(request.module, "XLA_OPTIMIZE", False))
    before_config = jax.config.values["jax_disable_most_optimizations"]
    before_env = os.environ.get(_OPT_ENV)
    jax.config.update("jax_disable_most_optimizations", not optimise)
    os.environ[_OPT_ENV] = "0" if optimise else "1"
    yield
    jax.config.update("jax_disable_most_optimizations", before_config)
    if before_env is None:
        os.environ.pop(_OPT_ENV, None)
    else:
        os.environ[_OPT_ENV] = before_env


# The longest files start first (measured durations, 2026-11-30 11:30, two workers, seconds): with
# ``--dist loadfile --no-loadscope-reorder`` a worker takes the next file in this order when it
# runs short of work, so no long file is left to run alone at the end. The rest follow in
# collection order.
SLOW_FILES_FIRST = ("test_smollm2_methods.py",  # ~250 (15 methods on gguf, SmolLM2)
                    "test_speculative.py",  # ~330
                    "test_families.py",  # ~240 (every method on 5 tiny families; 2026-12-01)
                    "test_embedded_models.py",  # ~160 (Gemma 3 270M, Qwen2.5-Coder 0.5B)
                    "test_bad_input.py",  # ~240
                    "test_notebook.py",  # ~230
                    "test_sharding.py",  # ~170 (a subprocess on 8 fake devices)
                    "test_eagle.py", "test_experiments.py", "test_gguf_smollm2.py",
                    "test_eagle3.py", "test_corpus.py", "test_compose.py",
                    "test_packed_methods.py", "test_adaptive.py", "test_heads.py",
                    "test_lookahead.py", "test_packaging.py", "test_sam.py",
                    "test_block_diffusion.py", "test_registry.py", "test_tree_attention.py",
                    "test_rest.py", "test_tree_tuning.py", "test_packed.py", "test_accept.py",
                    "test_limits.py", "test_token_recycling.py", "test_cross_vocab.py",
                    "test_staged.py", "test_hf_parity.py", "test_spm_tokenizer.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


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
