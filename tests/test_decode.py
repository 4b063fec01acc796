"""Plain decoding, the reference for every other method: greedy equals naive full-recompute
decoding, batching and padding change nothing, EOS stops only its row, ``stream`` yields what
``generate`` returns, and bad input fails with a clear message."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from specjax import decode
import tinymodels as kit
from specjax.cache import CacheCapacityError
from specjax.decode import DecodeConfig
from specjax.prompts import make_prompt_batch
from specjax.sampling import SamplingConfig

N = 6  # max_new_tokens; every prompt + N fits the [1, 16] naive-reference width
# Not tinymodels.PROMPTS: short enough for that width, with ids across the vocabulary of 128.
SHORT_PROMPTS = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2], [60, 61, 62, 63, 64]]
GREEDY = DecodeConfig(max_new_tokens=N)
SAMPLED = DecodeConfig(max_new_tokens=N, sampling=SamplingConfig(temperature=1.0, top_k=3))


def _checked_rows(out):
    """Each row's generated tokens as a list (``tinymodels.rows_of``); asserts the -1 padding
    past the length."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert np.all(tokens[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] == -1)
    return kit.rows_of(out)


@pytest.fixture(scope="module")
def greedy_rows(target):
    model, params = target
    return _checked_rows(decode.generate(model, params, SHORT_PROMPTS, GREEDY))


def test_greedy_equals_naive_reference_and_each_row_alone(target, greedy_rows):
    model, params = target
    out = decode.generate(model, params, SHORT_PROMPTS, GREEDY)
    assert out.tokens.shape == (len(SHORT_PROMPTS), N)
    for prompt, row in zip(SHORT_PROMPTS, greedy_rows):
        assert row == kit.greedy_reference(model, params, prompt, N, width=16)
        alone = decode.generate(model, params, [prompt], GREEDY)
        assert _checked_rows(alone) == [row]
    # The model is not degenerate (the comparisons above could otherwise pass trivially).
    assert len({t for row in greedy_rows for t in row}) > 4
    assert int(out.stats.target_calls) == N and int(out.stats.steps) == N - 1


def test_top_k_1_sampling_equals_greedy(target, greedy_rows):
    model, params = target
    config = DecodeConfig(max_new_tokens=N, sampling=SamplingConfig(temperature=0.7, top_k=1))
    assert (_checked_rows(decode.generate(model, params, SHORT_PROMPTS, config, jax.random.key(3)))
            == greedy_rows)


def test_sampling_same_key_same_output_and_tokens_within_top_k(target, greedy_rows):
    model, params = target
    a = _checked_rows(decode.generate(model, params, SHORT_PROMPTS, SAMPLED, jax.random.key(1)))
    b = _checked_rows(decode.generate(model, params, SHORT_PROMPTS, SAMPLED, jax.random.key(1)))
    c = _checked_rows(decode.generate(model, params, SHORT_PROMPTS, SAMPLED, jax.random.key(2)))
    assert a == b
    assert a != c and a != greedy_rows  # the key matters; it really samples
    # Every sampled token is among the top 3 of the target's logits given that row's prefix.
    for prompt, row in zip(SHORT_PROMPTS, a):
        logits = kit.chain_logits(model, params, prompt + row[:-1])[len(prompt) - 1:]
        top3 = np.argsort(-logits, axis=-1)[:, :3]
        assert all(tok in top3[i] for i, tok in enumerate(row))


def _eos_choice(rows):
    """EOS ids whose first occurrence stops the rows at three different lengths, all < N."""
    for picks in itertools.product(*[range(N - 1) for _ in rows]):
        eos = {row[k] for row, k in zip(rows, picks)}
        lengths = [next(i for i, t in enumerate(row) if t in eos) + 1 for row in rows]
        if len(set(lengths)) == len(rows) and max(lengths) < N:
            return tuple(sorted(eos)), lengths
    raise AssertionError("test data: no EOS choice stops the rows at distinct lengths")


def test_eos_stops_only_its_row(target, greedy_rows):
    model, params = target
    eos, lengths = _eos_choice(greedy_rows)
    out = decode.generate(model, params, SHORT_PROMPTS, dataclasses.replace(GREEDY, eos_ids=eos))
    rows = _checked_rows(out)
    for row, full, n in zip(rows, greedy_rows, lengths):
        assert row == full[:n]  # same tokens up to and including the EOS, then nothing
        assert row[-1] in eos
    assert np.asarray(out.lengths).tolist() == lengths
    # The loop ran exactly as long as the longest row: rows that stopped early did not hold
    # the others back, and the loop did not run on after the last EOS.
    assert int(out.stats.target_calls) == max(lengths) < N


def _stream_rows(model, params, prompts, config, key=None):
    rows = [[] for _ in prompts]
    for tokens, emitted in decode.stream(model, params, prompts, config, key):
        assert tokens.shape == emitted.shape == (len(prompts),)
        for b in np.flatnonzero(emitted):
            rows[b].append(int(tokens[b]))
    return rows


def test_stream_yields_exactly_the_generated_tokens(target, greedy_rows):
    model, params = target
    eos, lengths = _eos_choice(greedy_rows)
    config = dataclasses.replace(GREEDY, eos_ids=eos)
    streamed = _stream_rows(model, params, SHORT_PROMPTS, config)
    assert streamed == _checked_rows(decode.generate(model, params, SHORT_PROMPTS, config))
    assert [len(r) for r in streamed] == lengths


def test_stream_sampling_uses_the_key_like_generate(target):
    model, params = target
    key = jax.random.key(1)
    assert (_stream_rows(model, params, SHORT_PROMPTS, SAMPLED, key)
            == _checked_rows(decode.generate(model, params, SHORT_PROMPTS, SAMPLED, key)))


@dataclasses.dataclass(frozen=True)
class _CountingModel:
    """Delegates to a model and counts how often ``forward`` is traced (equality and hash
    ignore the counter, so jit treats equal wrappers as one static argument)."""

    inner: object
    traces: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        self.traces.append(1)
        return self.inner.forward(*args, **kwargs)


def test_prompt_lengths_in_one_bucket_compile_once(target):
    model, params = target
    counting = _CountingModel(model)
    config = DecodeConfig(max_new_tokens=2)
    decode.generate(counting, params, [[1, 2]], config)
    first = len(counting.traces)
    assert first > 0
    size = decode.num_compiled()
    decode.generate(counting, params, [[7] * 11], config)  # also in the 16-token bucket
    assert len(counting.traces) == first
    assert decode.num_compiled() == size
    # A longer prompt moves to the 32-token bucket and does trace again (the counter works).
    decode.generate(counting, params, [[7] * 20], config)
    assert len(counting.traces) > first


def test_bad_input_errors(target):
    model, params = target
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        DecodeConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decode.generate(model, params, [[1, 2], []], GREEDY)
    with pytest.raises(ValueError, match="no prompts"):
        decode.generate(model, params, [], GREEDY)
    # Token ids outside the vocabulary (the embedding lookup would silently yield NaN).
    with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
        decode.generate(model, params, [[1, 128]], GREEDY)
    with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
        next(decode.stream(model, params, [[-1, 3]], GREEDY))
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside \[0, 64\)"):
        make_prompt_batch([[0, 63, 64]], vocab_size=64)
    make_prompt_batch([[0, 63]], vocab_size=64)  # the edges themselves are fine


def test_prompt_longer_than_the_cache(target):
    model, params = target
    config = DecodeConfig(max_new_tokens=4, num_slots=16)
    for call in (lambda: decode.generate(model, params, [list(range(20))], config),
                 lambda: next(decode.stream(model, params, [list(range(20))], config))):
        with pytest.raises(CacheCapacityError) as info:
            call()
        msg = str(info.value)
        # Says what was asked for, what there is, and what to change.
        assert "needs 36 cache slots" in msg and "has 16" in msg
        assert "shorten the prompt" in msg and "max_new_tokens" in msg and "num_slots" in msg
    # Without an explicit size the cache is sized to fit (a multiple of 128).
    assert DecodeConfig(max_new_tokens=4).slots_for(32) == 128
    assert DecodeConfig(max_new_tokens=100).slots_for(32) == 256
