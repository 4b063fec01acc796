"""Limits checked before any work: the model's context (prompt + max_new_tokens), the memory a
run needs against what the device has free, and long lists of prompts decoded in batches that
fit (with the same tokens as one batch)."""

import numpy as np
import pytest

from drafters.prompt_lookup import PromptLookupDrafter
from experiments import methods
from models import registry as models
from specjax import decode, engine, memory, speculative
from specjax.decode import ContextLengthError, DecodeConfig


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny-llama")  # a context of 512 positions


def test_prompt_plus_new_tokens_must_fit_the_context(tiny):
    assert tiny.model.max_positions == 512
    config = DecodeConfig(max_new_tokens=12)
    fits = [list(np.arange(500) % 200 + 1)]
    out = decode.generate(tiny.model, tiny.params, fits, config)
    assert int(out.lengths[0]) == 12
    over = [fits[0] + [7]]
    message = ("a prompt of 501 tokens plus max_new_tokens=12 needs 513 positions, over the "
               "model's context of 512: shorten the prompt to at most 500 tokens or lower "
               "max_new_tokens to at most 11")
    for call in (lambda: decode.generate(tiny.model, tiny.params, over, config),
                 lambda: speculative.speculative_generate(tiny.model, tiny.params,
                                                          PromptLookupDrafter(), None, over,
                                                          config),
                 lambda: engine.Engine(tiny.model, config).compile(tiny.params, None, over)):
        with pytest.raises(ContextLengthError, match=message):
            call()
    with pytest.raises(ContextLengthError, match="shorten the prompt to at most 500 tokens$"):
        decode.generate(tiny.model, tiny.params, [[3] * 520], config)


def test_a_run_that_cannot_fit_is_refused_before_it_runs(tiny, monkeypatch):
    eng = engine.Engine(tiny.model, DecodeConfig(max_new_tokens=8))
    need = eng.required_bytes(tiny.params, None, [[1, 2, 3]])
    assert need and need > 0
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: need)  # 80% < need
    with pytest.raises(memory.MemoryBudgetError, match="decoding 1 prompt.* needs about .* GB "
                       "of device memory but .* GB are free: use fewer prompts per batch"):
        eng.compile(tiny.params, None, [[1, 2, 3]])


def test_rows_that_fit_takes_the_largest_batch_within_the_budget():
    cost = lambda b: 1000 + 100 * b  # noqa: E731
    assert memory.rows_that_fit(cost, 50, available=10_000) == 50
    assert memory.rows_that_fit(cost, 50, available=2_000) == 6  # 1000 + 100*6 <= 1600
    assert memory.rows_that_fit(cost, 50, available=100) == 1  # never less than one row
    assert memory.rows_that_fit(lambda b: None, 50, available=100) == 50  # unknown: one batch


def test_many_prompts_run_in_batches_that_fit_with_the_same_tokens(tiny, monkeypatch):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, size=n).tolist() for n in (5, 30, 12, 9, 40, 7, 21)]
    config = DecodeConfig(max_new_tokens=10)
    eng = engine.Engine(tiny.model, config)
    one_batch = eng.generate(tiny.params, None, prompts).tokens
    longest_first = sorted(prompts, key=len, reverse=True)
    one = eng.required_bytes(tiny.params, None, longest_first[:1])
    full = eng.required_bytes(tiny.params, None, longest_first)
    per_row = (full - one) / (len(prompts) - 1)
    free = (one + 2.5 * per_row) / memory.BUDGET_FRACTION  # room for 3 rows, not 4
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: free)
    for method in ("ar", "prompt_lookup"):
        result = methods.Run(method, "tiny-llama", config).generate(tiny, prompts)
        assert result.extra == {"batches": 3, "rows_per_batch": 3}
        assert result.generated == one_batch  # in prompt order, the tokens of one batch
        assert result.generation.tau >= 1.0 and result.summary()["new_tokens"] == sum(
            len(t) for t in one_batch)
