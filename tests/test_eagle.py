"""EAGLE drafter: lossless decoding (static / dynamic trees), the draft cache invariant, the
dynamic tree's top-N selection, training levels, resume and bad input."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import eagle_train, head_weights
from drafters.eagle import EagleDrafter
from drafters.eagle_weights import load_shipped, load_weights, random_params, save_weights
from specjax import masks, train
from specjax.cache import KVCache
from specjax.decode import DecodeConfig
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, SpecLoop, draft_context, speculative_generate
from specjax.prompts import make_prompt_batch
from specjax.tree import select_top_nodes
from sequence_kit import chi_square_pvalue, exact_joint, sample_sequences, seq_model
from tinymodels import PROMPTS, rows_of

SMALL_DYNAMIC = dict(tree="dynamic", top_k=3, depth=3, budget=6)


@pytest.fixture(scope="module")
def trained(target, reference):
    """A layer fitted to the reference continuations: it drafts right often."""
    model, params = target
    drafter = EagleDrafter.create(model)
    records = kit.teacher_records(model, params, PROMPTS, reference[1])
    data = eagle_train.window_dataset(records, 32)
    tx = train.make_optimizer(1e-2, 10, 150)
    state = train.TrainState.create(drafter.init_params(jax.random.key(0)), tx)
    step = train.make_train_step(eagle_train.make_loss_fn(drafter, 2, ce_weight=1.0,
                                                          ce_window=32), tx)
    for _ in range(150):
        state, _ = step(state, data, params)
    return state.params


# Lossless decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["static", "dynamic"])
@pytest.mark.parametrize("kind", ["random", "trained"])
def test_greedy_equals_plain_decoding(target, reference, trained, tree, kind):
    model, params = target
    config, ref_rows = reference
    drafter = EagleDrafter.create(model, **(SMALL_DYNAMIC if tree == "dynamic" else {}))
    dparams = random_params(drafter, seed=3) if kind == "random" else trained
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, config)  # ragged
    assert rows_of(out) == ref_rows
    single = speculative_generate(model, params, drafter, dparams, [PROMPTS[1]], config)
    assert rows_of(single) == [ref_rows[1]]  # batch 1
    if kind == "trained":  # the fitted layer gets drafts accepted
        assert int(out.stats.accepted) > 0.3 * sum(map(len, ref_rows))


def test_reduced_draft_vocabulary_is_lossless(target, reference, trained):
    model, params = target
    config, ref_rows = reference
    drafter = EagleDrafter.create(model, **SMALL_DYNAMIC, draft_vocab=40)
    out = speculative_generate(model, params, drafter, trained, PROMPTS, config)
    assert rows_of(out) == ref_rows
    ctx = _context_after_prefill(model, params, drafter, trained)
    proposal, _, _ = drafter.propose(trained, ctx[0], ctx[1], jax.random.key(0))
    assert (np.asarray(proposal.tokens)[:, 1:] < 40).all()
    with pytest.raises(ValueError, match="draft_vocab"):
        EagleDrafter.create(model, draft_vocab=model.vocab_size + 1)


def _context_after_prefill(model, params, drafter, dparams):
    batch = make_prompt_batch(PROMPTS, vocab_size=model.vocab_size)
    loop = SpecLoop(model, drafter, DecodeConfig(max_new_tokens=8))
    state = loop.jit_start(params, dparams, batch, jax.random.key(0), 64)
    return state.drafter_state, draft_context(state, params)


REF_WIDTH = 48


@functools.partial(jax.jit, static_argnums=0)
def _pairs_from_scratch(drafter, dparams, params, tokens):
    """Layer outputs ``[W-1, E]`` and keys ``[K, W-1, D]`` of the true pairs of ``tokens
    int32[1, W]`` (causal: a padded tail does not change the prefix)."""
    model = drafter.target
    w = tokens.shape[1]
    hidden = model.forward(params, tokens, jnp.arange(w)[None], model.init_cache(1, w),
                           masks.causal_mask(jnp.zeros((1,), jnp.int32), w, w)).hidden
    c = model.config
    cache = KVCache.init(1, 1, c.num_kv_heads, w - 1, c.head_dim)
    pos = jnp.arange(w - 1, dtype=jnp.int32)[None]
    out, cache = drafter.step(dparams, params, cache, hidden[:, :-1], tokens[:, 1:], pos, pos,
                              masks.causal_mask(cache.lengths, w - 1, w - 1))
    return out[0], cache.k[0, 0]


def _layer_reference(drafter, dparams, params, seq, num_pairs):
    """Layer outputs and K of the first ``num_pairs`` true pairs of ``seq``, from scratch."""
    tokens = np.zeros((1, REF_WIDTH), np.int32)
    tokens[0, :len(seq)] = seq
    out, k = _pairs_from_scratch(drafter, dparams, params, jnp.asarray(tokens))
    return np.asarray(out[:num_pairs]), np.asarray(k[:, :num_pairs])


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_draft_cache_holds_true_features_after_every_round(target, reference, trained, tree):
    model, params = target
    config, ref_rows = reference
    drafter = EagleDrafter.create(model, **(SMALL_DYNAMIC if tree == "dynamic" else {}))
    batch = make_prompt_batch(PROMPTS, vocab_size=model.vocab_size)
    loop = SpecLoop(model, drafter, config, SpecConfig())
    state = loop.jit_start(params, trained, batch, jax.random.key(0), 64)
    for _ in range(4):
        state = loop.jit_round(params, trained, state)
        ds = state.drafter_state
        for b, prompt in enumerate(PROMPTS):
            length = int(ds.cache.lengths[b])
            assert length == int(state.cache.lengths[b])  # in step with the target
            seq = (prompt + ref_rows[b])[:length + 1]  # committed + pending
            if len(seq) < length + 1:  # finished: the last round committed past max tokens
                continue
            out, k = _layer_reference(drafter, trained, params, seq, length)
            np.testing.assert_allclose(np.asarray(ds.cache.k[0, b, :, :length]), k,
                                       atol=2e-4, rtol=2e-4)
            np.testing.assert_allclose(np.asarray(ds.next_feature[b]), out[length - 1],
                                       atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_sequence_distribution_is_exact(tree):
    sampling = SamplingConfig(temperature=0.8, top_k=5)
    model, params = seq_model()
    kwargs = dict(tree="dynamic", top_k=2, depth=2, budget=4) if tree == "dynamic" else dict(
        choices=[(0,), (1,), (0, 0), (1, 0)])
    drafter = EagleDrafter.create(model, **kwargs)
    dparams = random_params(drafter, seed=5)
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter, dparams, sampling, SpecConfig(),
                                      rows=2048, rounds=3)
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3 / 2


# Dynamic tree selection ------------------------------------------------------------------------


def _select_reference(scores, parents, budget):
    """Plain Python: the ``budget`` best nodes by score (ties: lower index), BFS-ordered."""
    pool = len(scores)
    depth = []
    for m in range(pool):
        depth.append(1 if parents[m] < 0 else depth[parents[m]] + 1)
    ranked = sorted(range(pool), key=lambda m: (-scores[m], m))[:budget]
    valid = {m: scores[m] > -np.inf for m in ranked}
    bfs = sorted(ranked, key=lambda m: (not valid[m], depth[m], m))
    index = {m: i + 1 for i, m in enumerate(bfs)}
    tree_parents = [-1] + [(0 if parents[m] < 0 else index[parents[m]]) if valid[m] else -1
                           for m in bfs]
    return bfs, tree_parents, [True] + [valid[m] for m in bfs]


def _random_pool(rng, pool, invalid_tail=0):
    """A random generation-ordered pool whose scores are cumulative log-probabilities on a
    coarse grid (many exact ties, zero steps included)."""
    parents, scores = [], []
    for m in range(pool):
        p = int(rng.integers(-1, m)) if m else -1
        step = -0.5 * int(rng.integers(0, 4))  # 0 gives a child tied with its parent
        parents.append(p)
        scores.append((0.0 if p < 0 else scores[p]) + step)
    for m in range(pool - invalid_tail, pool):
        scores[m] = -np.inf
    return scores, parents


@pytest.mark.parametrize("invalid_tail", [0, 7])
def test_select_top_nodes_matches_python_reference(invalid_tail):
    rng = np.random.default_rng(invalid_tail)
    batch, pool = 6, 20
    for budget in (1, 5, 13, 20):
        rows = [_random_pool(rng, pool, invalid_tail) for _ in range(batch)]
        scores = np.array([r[0] for r in rows], np.float32)
        parents = np.array([r[1] for r in rows], np.int32)
        nodes, tree_parents, valid = jax.jit(select_top_nodes, static_argnums=2)(
            scores, parents, budget)
        for b in range(batch):
            ref_nodes, ref_parents, ref_valid = _select_reference(list(scores[b]),
                                                                  list(parents[b]), budget)
            assert np.asarray(nodes[b]).tolist() == ref_nodes
            assert np.asarray(tree_parents[b]).tolist() == ref_parents
            assert np.asarray(valid[b]).tolist() == ref_valid
            # ancestor-closed, BFS ordered
            for n in range(1, budget + 1):
                if ref_valid[n]:
                    assert 0 <= ref_parents[n] < n and ref_valid[ref_parents[n]]
    with pytest.raises(ValueError, match="budget"):
        select_top_nodes(np.zeros((1, 3), np.float32), np.full((1, 3), -1, np.int32), 4)


# Training ------------------------------------------------------------------------------------


def test_levels_reproduce_decode_time_chains(target, trained):
    """Level m at slot s equals drafting m steps from the commit point with the cache."""
    model, params = target
    drafter = EagleDrafter.create(model)
    seq = [4, 5, 6, 7, 8, 9, 10, 4, 5, 6, 21, 22, 23, 24]
    rec = kit.teacher_records(model, params, [seq[:3]], [seq[3:]])
    w, levels = 16, 3  # the whole sequence (13 pairs) plus 3 padding slots on the left
    data = eagle_train.window_dataset(rec, w)
    outs = eagle_train.level_features(
        drafter, trained, params, jnp.asarray(data["hidden"][:, :w]),
        jnp.asarray(data["tokens"][:, 1:w + 1]), jnp.asarray(data["positions"]),
        jnp.asarray(data["valid"]), levels)
    hidden = kit.full_forward(model, params, np.asarray([seq])).hidden
    c, n, slots = model.config, len(seq) - 1, len(seq)
    step = jax.jit(drafter.step)
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    true_out, true_cache = step(trained, params, KVCache.init(1, 1, c.num_kv_heads, slots,
                                                              c.head_dim),
                                hidden[:, :n], jnp.asarray([seq[1:]]), pos, pos,
                                masks.causal_mask(jnp.zeros((1,), jnp.int32), n, slots))
    first = len(seq) - 1 - w  # pair index of slot 0 (negative: padding)
    for m in range(levels):
        for s in range(m - first, w):
            start = first + s - m  # last true pair of the chain; drafting starts after it
            cache = true_cache.replace(lengths=jnp.asarray([start + 1], jnp.int32))
            feat = true_out[:, start:start + 1]
            for i in range(1, m + 1):
                slot = jnp.asarray([[start + i]], jnp.int32)
                mask = masks.causal_mask(jnp.asarray([start + 1]), i, slots)[:, -1:]
                feat, cache = step(trained, params, cache, feat,
                                   jnp.asarray([[seq[start + i + 1]]]), slot, slot, mask)
            np.testing.assert_allclose(np.asarray(outs[m][0, s]), np.asarray(feat[0, 0]),
                                       atol=2e-4, rtol=2e-4)


def test_loss_decreases_and_resume_gives_the_same_params(target, reference, tmp_path):
    model, params = target
    drafter = EagleDrafter.create(model)
    records = kit.teacher_records(model, params, PROMPTS, reference[1])
    data = eagle_train.window_dataset(records, 24)
    loss_fn = eagle_train.make_loss_fn(drafter, 2, ce_weight=1.0, ce_window=24)
    tx = train.make_optimizer(1e-2, 5, 40)
    step = train.make_train_step(loss_fn, tx)

    def get_batch(i):
        idx = train.batch_indices(0, i, len(PROMPTS), 2)
        return {k: v[idx] for k, v in data.items()}

    def fresh():
        return train.TrainState.create(drafter.init_params(jax.random.key(0)), tx)

    first = float(loss_fn(fresh().params, data, params)[0])
    full = train.train_loop(fresh(), step, get_batch, params, 40)
    assert float(loss_fn(full.params, data, params)[0]) < 0.5 * first
    acc = eagle_train.depth_accuracy(drafter, full.params, params, data, num_levels=2)
    assert acc[0] > 0.5
    meta = drafter.config_dict()
    with train.Checkpointer(tmp_path / "ck", every=10, meta=meta) as ck:
        train.train_loop(fresh(), step, get_batch, params, 40, checkpointer=ck, stop_after=25)
    with train.Checkpointer(tmp_path / "ck", every=10, meta=meta) as ck:
        state = ck.restore_or(fresh())
        assert int(state.step) == 25
        resumed = train.train_loop(state, step, get_batch, params, 40, checkpointer=ck)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = EagleDrafter.create(kit.tiny_model("gqa", vocab_size=64)[0]).config_dict()
    with train.Checkpointer(tmp_path / "ck", meta=other) as ck:
        with pytest.raises(train.TrainCheckpointError, match="vocab_size"):
            ck.restore_or(fresh())


# Bad input -------------------------------------------------------------------------------------


def test_tree_budget_errors(target):
    model, _ = target
    big = [(i,) for i in range(10)] + [(0, i) for i in range(10)]
    with pytest.raises(ValueError, match="budget"):
        EagleDrafter.create(model, choices=big, max_nodes=16)
    with pytest.raises(ValueError, match="budget"):
        EagleDrafter.create(model, tree="dynamic", budget=40, max_nodes=16)
    with pytest.raises(ValueError, match="exceeds"):
        EagleDrafter.create(model, tree="dynamic", top_k=2, depth=2, budget=7)
    with pytest.raises(ValueError, match="unknown EAGLE tree"):
        EagleDrafter.create(model, tree="bushy")


def test_weights_round_trip_and_errors(target, tmp_path):
    model, params = target
    drafter = EagleDrafter.create(model)
    dparams = random_params(drafter)
    path = str(tmp_path / "eagle.safetensors")
    save_weights(path, drafter, dparams, target_name="tiny", dtype="float32")
    back = load_weights(path, drafter)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), dparams, back))
    d2, p2 = load_shipped(model, path=path, tree="dynamic")
    assert d2.mode == "dynamic" and jax.tree.structure(p2) == jax.tree.structure(dparams)
    wider = kit.tiny_model("gqa", hidden_size=32, num_heads=4, head_dim=8)[0]
    with pytest.raises(head_weights.HeadWeightsError, match="hidden size"):
        load_shipped(wider, path=path)
    with pytest.raises(head_weights.HeadWeightsError, match="vocabulary"):
        load_shipped(kit.tiny_model("gqa", vocab_size=64)[0], path=path)
    save_weights(path, drafter, dparams)
    kit.truncate_file(path)
    with pytest.raises(head_weights.HeadWeightsError, match="damaged"):
        load_shipped(model, path=path)
    with pytest.raises(head_weights.HeadWeightsError, match="no head weights"):
        load_shipped(model, path=str(tmp_path / "missing.safetensors"))
    other = EagleDrafter.create(kit.tiny_model("gqa", vocab_size=64)[0])
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(model, params, other, random_params(other), [[1, 2]],
                             DecodeConfig(max_new_tokens=4))


def test_shipped_smollm2_weights_fit():
    path = head_weights.shipped_path("eagle", "smollm2-135m")
    assert os.path.exists(path), f"shipped weights {path} are missing from the repository"
    assert os.path.getsize(path) < 20e6
    from models.llama import LlamaModel
    drafter, params = load_shipped(LlamaModel(kit.smollm2_config()))
    assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_tree_flag_is_validated_per_method():
    from experiments import common, methods
    assert methods.tree_for("eagle", "chain", given=False) == "static"  # the flag's default
    assert methods.tree_for("eagle", "dynamic", given=True) == "dynamic"
    assert methods.tree_for("prompt_lookup", "tree", given=True) == "tree"
    with pytest.raises(common.UserError, match="static, dynamic"):
        methods.tree_for("eagle", "chain", given=True)
    with pytest.raises(common.UserError, match="chain, tree"):
        methods.tree_for("prompt_lookup", "dynamic", given=True)
    assert methods.tree_for("eagle", "tuned8", given=True) == "tuned8"
    assert methods.tree_for("medusa", "chain", given=False) == "tuned"
    for method in ("medusa", "hydra"):
        assert methods.tree_for(method, "tuned12", given=True) == "tuned12"
        assert methods.tree_for(method, "generic", given=True) == "generic"
        for bad in ("tuned0", "tunedx", "static", "chain"):
            with pytest.raises(common.UserError, match="tuned, tunedN, generic"):
                methods.tree_for(method, bad, given=True)
