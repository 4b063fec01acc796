"""Training kit (specjax/train.py) and self-distillation data (drafters/distill.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import distill, heads
from experiments import spec_bench
from drafters.hydra import HydraDrafter
from drafters.medusa import MedusaDrafter
from specjax import train
from specjax.decode import DecodeConfig, generate

# Not tinymodels.PROMPTS: six prompts, so the distilled data spans two shards of (at most) 4
# records.
DISTILL_PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14], [20, 21],
                   [30, 31, 32, 33, 34]]
NEW = 12


@pytest.fixture(scope="module")
def data_dir(target, tmp_path_factory):
    model, params = target
    out = str(tmp_path_factory.mktemp("distill"))
    distill.distill(model, params, DISTILL_PROMPTS, out, max_new_tokens=NEW, batch_size=4,
                    shard_size=4, dtype="bfloat16", model_name="tiny-gqa")
    return out


def test_distill_records_match_the_target(target, data_dir):
    model, params = target
    manifest = json.load(open(os.path.join(data_dir, distill.MANIFEST)))
    assert manifest["num_records"] == len(DISTILL_PROMPTS) and len(manifest["shards"]) == 2
    assert not [f for f in os.listdir(data_dir) if f.startswith(".tmp")]
    rec = distill.load_records(data_dir, model)
    ref = generate(model, params, DISTILL_PROMPTS, DecodeConfig(max_new_tokens=NEW))
    by_prompt = {tuple(rec.tokens[i, :rec.prompt_lengths[i]]): i for i in range(len(rec))}
    all_hidden = np.asarray(kit.full_forward(model, params, rec.tokens).hidden)  # causal
    all_logits = np.asarray(model.lm_head(params, jnp.asarray(all_hidden)))
    for j, prompt in enumerate(DISTILL_PROMPTS):
        i = by_prompt[tuple(prompt)]
        response = rec.tokens[i, len(prompt):rec.lengths[i]].tolist()
        assert response == np.asarray(ref.tokens[j, :ref.lengths[j]]).tolist()
        n = rec.lengths[i]
        np.testing.assert_allclose(rec.hidden[i, :n], all_hidden[i, :n], atol=0.05, rtol=0.02)
        # The next token after position t is the target's greedy choice from hidden[t].
        t = len(prompt) - 1
        np.testing.assert_array_equal(np.argmax(all_logits[i, t:n - 1], -1), response)
    data = distill.position_dataset(rec, 3)
    assert data["hidden"].shape[0] == sum(NEW - 1 for _ in DISTILL_PROMPTS)
    np.testing.assert_array_equal(data["mask"].sum(0), [6 * (NEW - 1 - k) for k in range(3)])


def test_distill_from_given_answers_equals_generating_them(target, data_dir, tmp_path,
                                                         monkeypatch):
    """Given the target's answers (a regenerated corpus's), distill writes the same records
    without generating anything."""
    model, params = target
    rec = distill.load_records(data_dir, model)
    prompts = [rec.tokens[i, :rec.prompt_lengths[i]].tolist() for i in range(len(rec))]
    answers = [rec.tokens[i, rec.prompt_lengths[i]:rec.lengths[i]].tolist()
               for i in range(len(rec))]

    def refuse(*args, **kwargs):
        raise AssertionError("generate called although the answers were given")

    monkeypatch.setattr(distill, "generate", refuse)
    out = str(tmp_path / "given")
    distill.distill(model, params, prompts, out, batch_size=4, shard_size=4, dtype="bfloat16",
                    model_name="tiny-gqa", responses=answers)
    got = distill.load_records(out, model)
    key = lambda r, i: tuple(r.tokens[i, :r.lengths[i]].tolist())  # noqa: E731
    mine = {key(got, i): i for i in range(len(got))}
    assert sorted(mine) == sorted(key(rec, i) for i in range(len(rec)))
    for i in range(len(rec)):
        j, n = mine[key(rec, i)], rec.lengths[i]
        assert got.prompt_lengths[j] == rec.prompt_lengths[i]
        np.testing.assert_array_equal(got.hidden[j, :n], rec.hidden[i, :n])
    with pytest.raises(ValueError, match="responses for"):
        distill.distill(model, params, prompts, str(tmp_path / "x"), responses=answers[:2])


def test_interrupted_distillation_resumes_from_its_last_shard(target, data_dir, tmp_path,
                                                               monkeypatch):
    """Interrupted after its first shard, a run resumes with the same prompts and settings and
    ends with the records of an uninterrupted run; other settings are refused."""
    model, params = target
    out = str(tmp_path / "resumed")
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # during the second batch: shard 0 (4 records) is complete
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    kwargs = dict(max_new_tokens=NEW, batch_size=4, shard_size=4, dtype="bfloat16",
                  model_name="tiny-gqa")
    monkeypatch.setattr(distill, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill.distill(model, params, DISTILL_PROMPTS, out, **kwargs)
    assert sorted(os.listdir(out)) == ["progress.json", "shard-00000.npz"]
    with pytest.raises(distill.DistillDataError, match="other prompts or settings"):
        distill.distill(model, params, DISTILL_PROMPTS[:5], out, **kwargs)
    monkeypatch.setattr(distill, "generate", generate)
    manifest = distill.distill(model, params, DISTILL_PROMPTS, out, **kwargs)
    assert manifest["num_records"] == len(DISTILL_PROMPTS)
    assert "progress.json" not in os.listdir(out)
    got, want = distill.load_records(out, model), distill.load_records(data_dir, model)
    as_set = lambda r: {tuple(r.tokens[i, :r.lengths[i]]) for i in range(len(r))}  # noqa: E731
    assert as_set(got) == as_set(want)


def test_distill_bad_input(target, data_dir, tmp_path):
    model, params = target
    with pytest.raises(FileExistsError):
        distill.distill(model, params, DISTILL_PROMPTS, data_dir, max_new_tokens=2)
    with pytest.raises(distill.DistillDataError, match="manifest"):
        distill.load_records(str(tmp_path))
    other = kit.tiny_model("gqa", vocab_size=64)[0]
    with pytest.raises(distill.DistillDataError, match="vocabulary"):
        distill.load_records(data_dir, other)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(data_dir):
        (broken / f).write_bytes(open(os.path.join(data_dir, f), "rb").read())
    shard = broken / "shard-00001.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(distill.DistillDataError, match="damaged"):
        distill.load_records(str(broken))
    bad_jsonl = tmp_path / "q.jsonl"
    bad_jsonl.write_text('{"turns": []}\n')
    with pytest.raises(ValueError, match="Spec-Bench"):
        spec_bench.read_prompt_texts(str(bad_jsonl))


def _setup(target, data_dir, steps=12, lr=3e-3):
    model, params = target
    drafter = MedusaDrafter.create(model)
    data = distill.position_dataset(distill.load_records(data_dir, model), drafter.num_heads)
    tx = train.make_optimizer(lr, 2, steps)
    state = train.TrainState.create(drafter.init_params(jax.random.key(0)), tx)
    step_fn = train.make_train_step(heads.make_loss_fn(drafter), tx)
    n = data["hidden"].shape[0]

    def get_batch(step):
        idx = train.batch_indices(0, step, n, 16)
        return {k: v[idx] for k, v in data.items()}

    return drafter, data, state, step_fn, get_batch, params


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loss_decreases(target, data_dir):
    model, params = target
    drafter = HydraDrafter.create(model)
    data = distill.position_dataset(distill.load_records(data_dir, model), drafter.num_heads)
    loss_fn = jax.jit(heads.make_loss_fn(drafter))
    tx = train.make_optimizer(1e-2, 2, 40)
    state = train.TrainState.create(drafter.init_params(jax.random.key(0)), tx)
    step_fn = train.make_train_step(heads.make_loss_fn(drafter), tx)
    before = float(loss_fn(state.params, data, params)[0])
    state = train.train_loop(state, step_fn, lambda s: data, params, 40)
    after = float(loss_fn(state.params, data, params)[0])
    assert after < 0.7 * before
    acc = heads.head_accuracy(drafter, state.params, params, data)
    assert acc[0] > 0.5


def test_checkpoint_round_trip_and_resume(target, data_dir, tmp_path):
    drafter, _, state0, step_fn, get_batch, params = _setup(target, data_dir)
    meta = {"drafter": "medusa", "n": 1}
    # Uninterrupted: 12 steps.
    full = train.train_loop(jax.tree.map(jnp.copy, state0), step_fn, get_batch, params, 12)
    # Interrupted after step 6 (checkpoint every 3), then resumed by a fresh checkpointer.
    with train.Checkpointer(tmp_path / "ck", every=3, meta=meta) as ckpt:
        part = train.train_loop(jax.tree.map(jnp.copy, state0), step_fn, get_batch, params, 12,
                                checkpointer=ckpt, stop_after=6)
        assert int(part.step) == 6 and ckpt.latest_step() == 6
        restored = ckpt.restore(state0)
        assert _equal(restored, part)  # exact round trip (step, params, optimizer state)
    with train.Checkpointer(tmp_path / "ck", every=3, meta=meta) as ckpt:
        resumed = ckpt.restore_or(jax.tree.map(jnp.copy, state0))
        assert int(resumed.step) == 6
        resumed = train.train_loop(resumed, step_fn, get_batch, params, 12, checkpointer=ckpt)
        assert ckpt.latest_step() == 12
    assert int(resumed.step) == int(full.step) == 12
    assert _equal(resumed.params, full.params)
    assert _equal(resumed.opt_state, full.opt_state)


# orbax leaves un-awaited read coroutines behind when a restore fails (its internals).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_errors(target, data_dir, tmp_path):
    model, _ = target
    drafter, _, state, _, _, _ = _setup(target, data_dir)
    meta = {"drafter": "medusa", "num_heads": 3}
    with train.Checkpointer(tmp_path / "ck", meta=meta) as ckpt:
        with pytest.raises(FileNotFoundError):
            ckpt.restore(state)
        ckpt.save(state)
    with train.Checkpointer(tmp_path / "ck", meta={**meta, "num_heads": 4}) as ckpt:
        with pytest.raises(train.TrainCheckpointError, match="num_heads"):
            ckpt.restore(state)
    # Same meta, different parameter shapes (another model size).
    other = MedusaDrafter.create(kit.tiny_model("gqa", vocab_size=128, hidden_size=32,
                                                num_heads=4, head_dim=8)[0])
    tx = train.make_optimizer(1e-3, 2, 12)
    small = train.TrainState.create(other.init_params(jax.random.key(0)), tx)
    with train.Checkpointer(tmp_path / "ck", meta=meta) as ckpt:
        with pytest.raises(train.TrainCheckpointError, match="does not fit|shape"):
            ckpt.restore(small)
    # Damaged files.
    for root, _, files in os.walk(tmp_path / "ck"):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "wb") as fh:
                fh.write(b"garbage")
    with train.Checkpointer(tmp_path / "ck", meta=meta) as ckpt:
        with pytest.raises(train.TrainCheckpointError, match="unreadable|damaged"):
            ckpt.restore(state)


def test_batch_indices_deterministic_epochs():
    a = train.batch_indices(3, 5, 10, 4)
    np.testing.assert_array_equal(a, train.batch_indices(3, 5, 10, 4))
    seen = np.concatenate([train.batch_indices(3, s, 10, 5) for s in range(2)])
    assert sorted(seen.tolist()) == list(range(10))  # one epoch sees every example once
    with pytest.raises(ValueError):
        train.batch_indices(0, 0, 0, 4)
    with pytest.raises(ValueError, match="learning rate"):
        train.make_optimizer(0.0, 1, 10)
