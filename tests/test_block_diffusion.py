"""Block drafter (``drafters/block_diffusion.py``): lossless decoding with random and trained
params (chain / static tree), the context-cache invariant, the sampling distribution, training
(loss, anchors, depth hits equal to decode-time drafts), weights files and bad input."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import block_diffusion_train as bdt
from drafters import corpus, draft_vocab, eagle_weights, head_weights, registry
from drafters.block_diffusion import (TRAIN_COMMAND, BlockDiffusionDrafter, BlockNet,
                                      decode_params, load_shipped, load_weights, save_weights)
from drafters.eagle import EagleDrafter
from specjax import masks
from specjax.cache import KVCache
from specjax.drafter import features_of
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, SpecLoop, speculative_generate
from specjax.prompts import make_prompt_batch
from sequence_kit import chi_square_pvalue, exact_joint, sample_sequences, seq_tiny_model
from tinymodels import PROMPTS, rows_of

N = 48  # draft vocabulary of the tiny model's drafter (its 128 ids: every label is inside)
LAYERS = 2  # drafter layers in the greedy tests (the sampling test uses the default, 1)
TRAIN_STEPS = 40


@pytest.fixture(scope="module")
def data(target, reference, tmp_path_factory):
    """``(trainer, batch, vocab_map)``: a corpus of the prompts + reference continuations built
    with ``corpus.build`` on the tiny model, one window per record."""
    model, params = target
    out = str(tmp_path_factory.mktemp("corpus") / "c")
    layers = corpus.default_layers(model.num_layers)
    corpus.build(model, params, list(zip(PROMPTS, reference[1])), out, layers=layers,
                 max_len=64)
    c = corpus.load([out], model, layers)
    batch = c.batch(c.windows(32), 32)
    vocab_map = draft_vocab.frequent_ids(batch["labels"], batch["valid"], N, model.vocab_size)
    assert draft_vocab.coverage(vocab_map, batch["labels"], batch["label_mask"]) == 1.0
    loaded = types.SimpleNamespace(model=model, params=params, name="tiny")
    trainer = bdt.make_trainer(loaded, vocab_map, seq_len=32, anchors_per_seq=16,
                               num_layers=LAYERS)  # the head starts from the target's
    return trainer, batch, vocab_map


@pytest.fixture(scope="module")
def trained(target, data):
    """``(dparams, losses)``: the drafter fitted to the reference continuations."""
    from specjax import train
    trainer, batch, vocab_map = data
    frozen = trainer.frozen(target[1])
    tx = train.make_optimizer(1e-2, 10, TRAIN_STEPS)
    state = train.TrainState.create(trainer.init_params(jax.random.key(0)), tx)
    step = train.make_train_step(trainer.loss_fn, tx)
    losses = []
    for i in range(TRAIN_STEPS):
        state, metrics = step(state, dict(batch, step=np.int32(i)), frozen)
        losses.append(float(metrics["loss"]))
    return trainer.decode_params(state.params, vocab_map), losses


def _drafter(model, tree, **kwargs):
    return BlockDiffusionDrafter.create(model, tree=tree, num_layers=LAYERS, draft_vocab_size=N,
                                        **kwargs)


def _random_params(drafter, seed=3):
    """Params drawn at unit-preserving scales (numpy: no PRNG kernels to compile) with a random
    vocabulary map: varied, mostly wrong drafts."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key.endswith("norm"):
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

    shapes = jax.eval_shape(drafter.init_params, jax.random.key(0))
    vocab_map = rng.permutation(drafter.vocab_size)[:drafter.draft_vocab_size]
    return decode_params(jax.tree_util.tree_map_with_path(draw, shapes), vocab_map)


# Lossless decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["chain", "static"])
def test_greedy_equals_plain_decoding(target, reference, trained, tree):
    model, params = target
    config, ref_rows = reference
    drafter = _drafter(model, tree)
    for dparams in (_random_params(drafter), trained[0]):
        out = speculative_generate(model, params, drafter, dparams, PROMPTS, config)  # ragged
        assert rows_of(out) == ref_rows
        single = speculative_generate(model, params, drafter, dparams, [PROMPTS[1]], config)
        assert rows_of(single) == [ref_rows[1]]  # batch 1
    # The fitted drafter gets most of the continuation accepted (random params: 0-1 tokens).
    assert int(out.stats.accepted) > 0.6 * sum(map(len, ref_rows))


@functools.partial(jax.jit, static_argnums=0)
def _context_from_scratch(drafter, dparams, params, tokens):
    """Per drafter layer ``(k, v)`` ``[1, W, Kh, Dh]``: the context entries of the TRUE
    features of ``tokens int32[1, W]`` (a causal forward: a padded tail does not change the
    prefix)."""
    model, w = drafter.target, tokens.shape[1]
    out = model.forward(params, tokens, jnp.arange(w)[None], model.init_cache(1, w),
                        masks.causal_mask(jnp.zeros((1,), jnp.int32), w, w),
                        hidden_layers=drafter.feature_layers)
    return drafter.module.apply({"params": dparams["net"]},
                                features_of(out, drafter.feature_layers), jnp.arange(w)[None],
                                method=BlockNet.context_kv)


def _true_context(drafter, dparams, params, seq):
    """Per drafter layer ``(k, v)``, each ``[Kh, len(seq), Dh]`` (the cache's layout)."""
    tokens = np.zeros((1, 48), np.int32)
    tokens[0, :len(seq)] = seq
    kv = _context_from_scratch(drafter, dparams, params, jnp.asarray(tokens))
    return [tuple(np.asarray(a[0, :len(seq)]).transpose(1, 0, 2) for a in pair) for pair in kv]


def test_context_cache_holds_true_features_after_every_round(target, reference, trained):
    model, params = target
    config, ref_rows = reference
    drafter = _drafter(model, "static")
    dparams = trained[0]
    batch = make_prompt_batch(PROMPTS, vocab_size=model.vocab_size)
    loop = SpecLoop(model, drafter, config, SpecConfig())
    state = loop.jit_start(params, dparams, batch, jax.random.key(0), 64)
    true_kv = [_true_context(drafter, dparams, params, p + r) for p, r in zip(PROMPTS, ref_rows)]
    multi = 0
    for _ in range(4):
        before = np.asarray(state.drafter_state.cache.lengths)
        state = loop.jit_round(params, dparams, state)
        cache = state.drafter_state.cache
        multi += int((np.asarray(cache.lengths) - before > 1).sum())
        for b, prompt in enumerate(PROMPTS):
            length = int(cache.lengths[b])
            assert length == int(state.cache.lengths[b])  # in step with the target
            if len(prompt + ref_rows[b]) < length:  # finished: committed past max tokens
                continue
            for i, (k, v) in enumerate(true_kv[b]):  # every layer, every committed position
                np.testing.assert_allclose(np.asarray(cache.k[i, b, :, :length]),
                                           k[:, :length], atol=2e-4, rtol=2e-4)
                np.testing.assert_allclose(np.asarray(cache.v[i, b, :, :length]),
                                           v[:, :length], atol=2e-4, rtol=2e-4)
    assert multi > 0  # rounds that committed several tokens at once were checked


def test_sequence_distribution_is_exact():
    sampling = SamplingConfig(temperature=1.0)
    model, params = seq_tiny_model()
    drafter = BlockDiffusionDrafter.create(model, choices=[(0,), (1,), (0, 0), (1, 0)],
                                           block_size=2)
    dparams = _random_params(drafter, seed=5)
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter, dparams, sampling, SpecConfig(),
                                     rows=2048, rounds=3)
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3


# Training ------------------------------------------------------------------------------------


def test_training_loss_decreases(trained):
    losses = trained[1]
    assert np.mean(losses[25:30]) < 0.3 * losses[0]


def test_head_starts_as_the_target_head(target, data):
    model, params = target
    trainer, _, vocab_map = data
    init = trainer.init_params(jax.random.key(1))
    want = np.asarray(draft_vocab.target_lm_head(model, params))[:, vocab_map]
    np.testing.assert_array_equal(np.asarray(init["head"]), want)
    np.testing.assert_array_equal(np.asarray(init["out_norm"]), np.asarray(params["final_norm"]))
    bare = bdt.make_trainer(model, vocab_map, seq_len=32, anchors_per_seq=16, num_layers=LAYERS)
    assert not np.allclose(np.asarray(bare.init_params(jax.random.key(1))["head"]), want)


def test_anchors_are_labelled_distinct_and_deterministic(data):
    trainer, batch, _ = data
    anchors, ok = map(np.asarray, trainer.anchors(batch))
    again, _ = trainer.anchors(batch)
    np.testing.assert_array_equal(anchors, np.asarray(again))
    other, _ = trainer.anchors(dict(batch, step=np.int32(1)))
    assert not np.array_equal(anchors, np.asarray(other))
    for row, row_ok, mask in zip(anchors, ok, batch["label_mask"]):
        assert len(set(row.tolist())) == len(row)
        assert row_ok.tolist() == mask[row].tolist()
        assert row_ok.sum() == min(len(row), mask.sum())  # labelled positions come first


def test_depth_hits_match_decode_time_drafts(target, data, trained):
    """Every labelled anchor's block in the training forward has the logits of the decode-time
    block (``block_logits`` on a cache of the true features, ``lengths`` = the anchor), and
    ``depth_hits`` counts its top-1 hits per depth over the consistent slots only (data tokens
    between the anchor and the slot equal to the target's labels; some are broken here)."""
    model, params = target
    trainer, batch, vocab_map = data
    tokens = batch["tokens"].copy()  # every 8th token no longer the target's choice
    tokens[:, 3::8] = (tokens[:, 3::8] + 1) % model.vocab_size
    batch = dict(batch, tokens=tokens)
    drafter = trainer.drafter  # a chain: the logits of every slot
    rng = np.random.default_rng(7)  # the fitted params, perturbed: some misses
    net = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                       trained[0]["net"])
    frozen = trainer.frozen(params)
    hits, counts = map(np.asarray, trainer.depth_hits(net, batch, frozen))
    dparams = decode_params(net, vocab_map)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    kv = jax.jit(trainer.context)(net, arrays)
    k_slots, (b, w), c = drafter.block_size, batch["valid"].shape, model.config
    empty = KVCache.init(LAYERS, 1, c.num_kv_heads, w + k_slots, c.head_dim)
    write, block = jax.jit(drafter.write_context), jax.jit(drafter.block_logits)
    want_hits, want_counts = np.zeros(k_slots, int), np.zeros(k_slots, int)
    train_blocks = jax.jit(trainer.blocks)
    every = jnp.arange(w, dtype=jnp.int32)[None]  # every position an anchor, in one forward
    for r in range(b):
        row = {k: v[r:r + 1] for k, v in arrays.items()}
        train_logits = np.asarray(train_blocks(
            net, row, frozen, [(kk[r:r + 1], vv[r:r + 1]) for kk, vv in kv], every,
            row["label_mask"])[0][0])
        cache = write(dparams, empty, row["features"], jnp.zeros((1,), jnp.int32))
        for a in np.flatnonzero(batch["label_mask"][r]):
            logits = np.asarray(block(dparams, params, cache.replace(
                lengths=jnp.asarray([a], jnp.int32)), row["tokens"][:, a])[0][0])
            np.testing.assert_allclose(train_logits[a], logits, atol=2e-4, rtol=2e-4)
            top = vocab_map[np.argmax(logits, axis=-1)]
            for i in range(k_slots):
                chain = all(tokens[r, q] == batch["labels"][r, q - 1]
                            for q in range(a + 1, a + i + 1))
                if a + i < w and batch["label_mask"][r, a + i] and chain:
                    want_counts[i] += 1
                    want_hits[i] += int(top[i] == batch["labels"][r, a + i])
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_array_equal(hits, want_hits)
    ranks = np.asarray(trainer.depth_ranks(net, batch, frozen))  # per anchor, for tune_tree
    assert ranks.shape == (b, w, k_slots)
    np.testing.assert_array_equal((ranks == 0).sum((0, 1)), hits)  # rank 0 = a top-1 hit
    np.testing.assert_array_equal((ranks >= 0).sum((0, 1)), counts)
    assert 0 < hits.sum() < counts.sum()  # a meaningful comparison: some hits, some misses
    assert 0 < counts[-1] < counts[0]  # deep slots counted, some left out as inconsistent


def test_consistent_only_scores_only_slots_the_target_would_reach(target, data):
    """With ``consistent_only``, a batch whose data tokens are never the target's choices
    scores slot 0 only (the deeper slots' labels follow tokens the drafter cannot see)."""
    import dataclasses
    model, params = target
    trainer, batch, _ = data
    tokens = batch["tokens"].copy()
    tokens[:, 1:] = (batch["labels"] + 1) % model.vocab_size  # tokens[p] != labels[p - 1]
    broken = dict(batch, tokens=tokens, step=np.int32(0))
    frozen, net = trainer.frozen(params), trainer.init_params(jax.random.key(0))
    k = trainer.drafter.block_size
    weights = sum(trainer.weight_decay_per_depth ** i for i in range(k))
    for only in (True, False):
        loss, metrics = dataclasses.replace(trainer, consistent_only=only).loss_fn(
            net, broken, frozen)
        slot0_only = float(loss) == pytest.approx(float(metrics["ce"]) * k / weights,
                                                  rel=1e-5)
        assert slot0_only == only
        assert [float(metrics[f"acc_{d}"]) for d in range(2, k + 1)] == [0.0] * (k - 1)


# Weights and bad input -----------------------------------------------------------------------


def test_weights_round_trip_and_errors(target, trained, tmp_path):
    model, params = target
    drafter = _drafter(model, "static")
    dparams = trained[0]
    path = str(tmp_path / "block_diffusion.safetensors")
    save_weights(path, drafter, dparams, target_name="tiny", dtype="float32")
    back = load_weights(path, drafter)
    assert jax.tree.structure(back) == jax.tree.structure(dparams)
    for a, b in zip(jax.tree.leaves(dparams), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back["vocab_map"].dtype == jnp.int32
    d2, p2 = load_shipped(model, path=path, tree="chain")  # the architecture from the file
    assert d2.tree.is_chain and (d2.num_layers, d2.block_size, d2.draft_vocab_size) == (
        LAYERS, drafter.block_size, N)
    save_weights(path, drafter, dparams)  # bf16 floats, the map exact
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        assert f.get_tensor("vocab_map").dtype == np.int32
        assert str(f.get_tensor("net/head").dtype) == "bfloat16"
    np.testing.assert_array_equal(np.asarray(load_shipped(model, path=path)[1]["vocab_map"]),
                                  np.asarray(dparams["vocab_map"]))
    from specjax import tree_tuning
    with pytest.raises(tree_tuning.TunedTreeError):  # tunedN needs tune_tree's file
        load_shipped(model, path=path, tree="tuned2")
    with pytest.raises(ValueError, match="explicit choices"):
        load_shipped(model, path=path, tree="generic", choices=[(0,)])
    order = ((0,), (0, 0), (1,), (0, 0, 0))  # a tuned file: static reads its default size
    tree_tuning.save_tree_file(head_weights.tree_file_of(path), tree_tuning.TunedTree(
        order, 3, 0, {"drafter": "block_diffusion"}))
    for tree, want in (("static", order[:3]), ("tuned2", order[:2]), ("tuned4", order)):
        got = load_shipped(model, path=path, tree=tree)[0].tree.choice_of_node[1:]
        assert sorted(got) == sorted(want), tree
    generic = load_shipped(model, path=path, tree="generic")[0]
    assert generic.tree.num_nodes == _drafter(model, "static").tree.num_nodes
    with pytest.raises(head_weights.HeadWeightsError, match="block_size"):
        load_weights(path, BlockDiffusionDrafter.create(model, block_size=4, num_layers=LAYERS,
                                                        draft_vocab_size=N))
    wider = kit.tiny_model("gqa", hidden_size=32, num_heads=4, head_dim=8)[0]
    with pytest.raises(head_weights.HeadWeightsError, match="hidden size"):
        load_shipped(wider, path=path)
    with pytest.raises(head_weights.HeadWeightsError, match="vocabulary"):
        load_shipped(kit.tiny_model("gqa", vocab_size=64)[0], path=path)
    eagle = EagleDrafter.create(model)
    other = str(tmp_path / "eagle.safetensors")
    eagle_weights.save_weights(other, eagle, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                                          eagle.param_shapes()))
    with pytest.raises(head_weights.HeadWeightsError, match="holds 'eagle' weights"):
        load_shipped(model, path=other)
    kit.truncate_file(path)
    with pytest.raises(head_weights.HeadWeightsError, match="damaged"):
        load_shipped(model, path=path)
    missing = types.SimpleNamespace(model=model, params=params, name="no-such-model")
    with pytest.raises(head_weights.HeadWeightsError, match="train_corpus_drafter") as err:
        registry.build("block_diffusion", missing)
    assert TRAIN_COMMAND in str(err.value)


def test_bad_options(target):
    model, _ = target
    with pytest.raises(ValueError, match="unknown block_diffusion tree"):
        BlockDiffusionDrafter.create(model, tree="dynamic")
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        BlockDiffusionDrafter.create(model, block_size=1)
    with pytest.raises(ValueError, match="3 deep but a block has 2 slots"):
        BlockDiffusionDrafter.create(model, choices=[(0,), (0, 0), (0, 0, 0)], block_size=2)
    with pytest.raises(ValueError, match="ranks up to 3"):
        BlockDiffusionDrafter.create(model, choices=[(0,), (3,)], draft_vocab_size=3)
    with pytest.raises(ValueError, match="draft_vocab_size must be in 1..128"):
        BlockDiffusionDrafter.create(model, draft_vocab_size=129)
    with pytest.raises(ValueError, match="not all layers of a 3-layer target"):
        BlockDiffusionDrafter.create(model, feature_layers=(0, 3))
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        BlockDiffusionDrafter.create(model, num_layers=0)
    with pytest.raises(ValueError, match="choices apply to the static tree"):
        BlockDiffusionDrafter.create(model, tree="chain", choices=[(0,)])
    shallow = kit.tiny_model("mqa")[0]  # 2 layers, same sizes
    with pytest.raises(ValueError, match="not all layers of a 2-layer target"):
        BlockDiffusionDrafter.create(model).check_compatible(shallow)
    method = registry.get("block_diffusion")
    assert method.trees == (("static", "chain", "tunedN", "generic"), "static")
    assert method.weights == "block_diffusion" and method.make_options(tree="tuned3").tree == \
        "tuned3"
    with pytest.raises(ValueError, match="tree must be one of static, chain"):
        method.make_options(tree="dynamic")
    vocab_map = np.arange(10)
    assert bdt.make_trainer(model, vocab_map, feature_layers="0:2").drafter.feature_layers == (
        0, 2)  # as --trainer_options gives it
    with pytest.raises(ValueError, match="unknown block_diffusion training option lr"):
        bdt.make_trainer(model, vocab_map, lr=1.0)
    with pytest.raises(ValueError, match="anchors_per_seq"):
        bdt.make_trainer(model, vocab_map, seq_len=8, anchors_per_seq=9)
    with pytest.raises(ValueError, match="weight_decay_per_depth"):
        bdt.make_trainer(model, vocab_map, weight_decay_per_depth=0.0)
    with pytest.raises(ValueError, match="consistent_only must be true or false"):
        bdt.make_trainer(model, vocab_map, consistent_only="sometimes")
    assert not bdt.make_trainer(model, vocab_map, consistent_only=False).consistent_only
    with pytest.raises(ValueError, match="distinct"):
        bdt.make_trainer(model, np.array([1, 2, 2]))
    with pytest.raises(ValueError, match="ids up to 200"):
        bdt.make_trainer(model, np.array([1, 200]))
