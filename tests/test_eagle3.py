"""EAGLE-3 drafter: lossless decoding (static / dynamic trees, random and trained params), the
features it receives (the taps of its feature layers) and its draft cache, drafted ids mapped
from the draft vocabulary, training-time test, weights files and bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import corpus, draft_vocab, eagle_weights, head_weights, registry
from drafters.eagle import EagleDrafter
from drafters.eagle3 import (Eagle3Drafter, Eagle3Options, decode_params, load_shipped,
                             load_weights, save_weights)
from drafters.eagle3_train import make_trainer
from specjax import masks, train
from specjax.cache import KVCache
from specjax.prompts import make_prompt_batch
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, SpecLoop, speculative_generate
from sequence_kit import chi_square_pvalue, exact_joint, sample_sequences, seq_model
from tinymodels import PROMPTS, rows_of

SMALL_DYNAMIC = dict(tree="dynamic", top_k=3, depth=3, budget=6)
N_DRAFT = 40  # draft vocabulary of the trained drafter: most of the corpus labels, not all
SEQ_LEN = 32


@pytest.fixture(scope="module")
def data(target, reference, tmp_path_factory):
    """A corpus of the reference continuations (the target's own tokens), its draft vocabulary
    and one batch of all its windows."""
    model, params = target
    out = str(tmp_path_factory.mktemp("corpus") / "c")
    corpus.build(model, params, list(zip(PROMPTS, reference[1])), out,
                 layers=corpus.default_layers(model.num_layers))
    records = corpus.load([out], model)
    col = np.arange(records.tokens.shape[1])[None, :]
    valid = col < records.lengths[:, None]
    vocab_map = draft_vocab.frequent_ids(records.labels, valid, N_DRAFT, model.vocab_size)
    assert 0.8 < draft_vocab.coverage(vocab_map, records.labels, valid) < 1  # misses occur
    return records, vocab_map, records.batch(records.windows(SEQ_LEN), SEQ_LEN)


@pytest.fixture(scope="module")
def fitted(target, data):
    """TTT on the reference continuations: the trainer, its frozen inputs, the initial params,
    the loss of every step and the trained decode params (they draft right often)."""
    model, params = target
    _, vocab_map, batch = data
    trainer = make_trainer(model, vocab_map, target_params=params, seq_len=SEQ_LEN,
                           num_steps=3)
    frozen = trainer.frozen(params)
    init = jax.device_get(trainer.init_params(jax.random.key(0)))  # kept: steps donate
    tx = train.make_optimizer(1e-2, 5, 30)
    state = train.TrainState.create(init, tx)
    step = train.make_train_step(trainer.loss_fn, tx)
    history = []
    for _ in range(30):
        state, metrics = step(state, batch, frozen)
        history.append(jax.device_get(metrics))
    return dict(trainer=trainer, frozen=frozen, init=init, history=history,
                dparams=trainer.decode_params(state.params, vocab_map))


@pytest.fixture(scope="module")
def trained(fitted):
    return fitted["dparams"]


def _drafter(model, n, tree, cls=Eagle3Drafter):
    return cls.create(model, n, **(SMALL_DYNAMIC if tree == "dynamic" else {}))


def _random(drafter, seed=1):
    """Noisy params over a random draft vocabulary (adversarial drafts)."""
    vmap = np.random.default_rng(seed).permutation(drafter.vocab_size)[:drafter.draft_vocab]
    return decode_params(drafter, kit.noisy_params(drafter, seed), vmap)


# Lossless decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["static", "dynamic"])
@pytest.mark.parametrize("kind", ["random", "trained"])
def test_greedy_equals_plain_decoding(target, reference, trained, tree, kind):
    model, params = target
    config, ref_rows = reference
    drafter = _drafter(model, N_DRAFT, tree)  # one compiled loop for both kinds
    dparams = _random(drafter) if kind == "random" else trained
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, config)  # ragged
    assert rows_of(out) == ref_rows
    single = speculative_generate(model, params, drafter, dparams, [PROMPTS[1]], config)
    assert rows_of(single) == [ref_rows[1]]  # batch 1
    if kind == "trained":  # the fitted drafter gets most drafts accepted
        assert int(out.stats.accepted) > 0.5 * sum(map(len, ref_rows))


SEQ_TREES = {"static": dict(choices=[(0,), (1,), (0, 0), (1, 0)]),
             "dynamic": dict(tree="dynamic", top_k=2, depth=2, budget=4)}


@pytest.mark.parametrize("tree", sorted(SEQ_TREES))
def test_sequence_distribution_is_exact(tree):
    """Sampled continuations have the target's distribution, drafting from a permuted draft
    vocabulary of 6 of the 8 ids."""
    model, params = seq_model()
    drafter = Eagle3Drafter.create(model, 6, **SEQ_TREES[tree])
    dparams = decode_params(drafter, kit.noisy_params(drafter, 5), [5, 2, 7, 0, 3, 1])
    sampling = SamplingConfig(temperature=0.8, top_k=5)
    counts, total = sample_sequences(model, params, drafter, dparams, sampling, rows=2048,
                                     rounds=3)
    assert chi_square_pvalue(*exact_joint(model, params, sampling), counts, total) > 1e-3 / 2


# Features and the draft cache ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recording(Eagle3Drafter):
    """Keeps what the loop hands the drafter and what it drafted: ``(state, prefill features,
    the last round's verification features along the accepted path, accepted count, live,
    proposal tokens, the predicted feature the proposal started from)``."""

    def init(self, params, ctx, prompt_tokens, prompt_lengths):
        inner = super().init(params, ctx, prompt_tokens, prompt_lengths)
        b, w, t = prompt_tokens.shape[0], self.tree.max_depth + 1, self.tree.num_nodes
        hidden = ctx.prompt_hidden
        return (inner, hidden, jnp.zeros((b, w, hidden.shape[-1]), hidden.dtype),
                jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b, t), jnp.int32),
                inner.next_feature)

    def propose(self, params, state, ctx, key):
        proposal, inner, cache = super().propose(params, state[0], ctx, key)
        return proposal, (inner,) + state[1:5] + (proposal.tokens, state[0].next_feature), cache

    def commit(self, params, state, ctx, info):
        inner = super().commit(params, state[0], ctx, info)
        path = jnp.maximum(info.path[:, :self.tree.max_depth + 1], 0)
        feats = jnp.take_along_axis(info.verify_hidden, path[:, :, None], axis=1)
        return (inner, state[1], feats, info.num_accepted, info.live) + state[5:]


REF_WIDTH = 48


@functools.partial(jax.jit, static_argnums=0)
def _from_scratch(drafter, dparams, params, tokens):
    """The taps ``[W, n*E]`` of ``tokens int32[1, W]`` and the draft layer's outputs
    ``[W-1, E]`` and keys ``[K, W-1, D]`` on its true pairs (causal: a padded tail does not
    change the prefix)."""
    model = drafter.target
    w = tokens.shape[1]
    out = model.forward(params, tokens, jnp.arange(w)[None], model.init_cache(1, w),
                        masks.causal_mask(jnp.zeros((1,), jnp.int32), w, w),
                        hidden_layers=drafter.feature_layers)
    taps = jnp.concatenate([out.taps[i] for i in range(len(drafter.feature_layers))], -1)
    c = model.config
    cache = KVCache.init(1, 1, c.num_kv_heads, w - 1, c.head_dim)
    pos = jnp.arange(w - 1, dtype=jnp.int32)[None]
    g, cache = drafter.step(dparams, params, cache,
                            drafter.input_features(dparams, taps[:, :-1]), tokens[:, 1:], pos,
                            pos, masks.causal_mask(cache.lengths, w - 1, w - 1))
    return taps[0], g[0], cache.k[0, 0]


def _reference(drafter, dparams, params, seq):
    tokens = np.zeros((1, REF_WIDTH), np.int32)
    tokens[0, :len(seq)] = seq
    return [np.asarray(a) for a in _from_scratch(drafter, dparams, params, jnp.asarray(tokens))]


TOL = dict(atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_features_are_the_taps_and_the_cache_holds_fused_true_features(target, reference,
                                                                       trained, tree):
    """At prefill and at every verification the drafter gets the concatenated taps of its
    feature layers (against a direct forward with hidden_layers); after init / every commit
    its cache holds the layer's entries on the fused TRUE features; its drafts are the top
    draft ids of its own head, mapped to target ids."""
    model, params = target
    config, ref_rows = reference
    drafter = _drafter(model, N_DRAFT, tree, Recording)
    plain = _drafter(model, N_DRAFT, "static")  # the same layer: the reference's compile
    assert drafter.feature_layers == (0, 1, 2)
    batch = make_prompt_batch(PROMPTS, vocab_size=model.vocab_size)
    loop = SpecLoop(model, drafter, config, SpecConfig())
    state = loop.jit_start(params, trained, batch, jax.random.key(0), 64)
    prompt_feats = np.asarray(state.drafter_state[1])
    for b, prompt in enumerate(PROMPTS):
        taps = _reference(plain, trained, params, prompt)[0]
        np.testing.assert_allclose(prompt_feats[b, :len(prompt)], taps[:len(prompt)], **TOL)
    vmap, head = np.asarray(trained["vocab_map"]), np.asarray(trained["head"])
    for _ in range(4):
        old = np.asarray(state.cache.lengths)
        state = loop.jit_round(params, trained, state)
        ds, verify, acc, live, tokens, start = jax.device_get(
            state.drafter_state[:1] + state.drafter_state[2:])
        assert np.isin(tokens[:, 1:], vmap).all()
        if tree == "static":  # DEFAULT_CHOICES: ranks 0, 1, 2 at depth 1
            top3 = np.argsort(-(start @ head), axis=-1)[:, :3]
            np.testing.assert_array_equal(tokens[:, 1:4], vmap[top3])
        lengths = np.asarray(ds.cache.lengths)
        np.testing.assert_array_equal(lengths, state.cache.lengths)  # in step with the target
        for b, seq in enumerate(p + r for p, r in zip(PROMPTS, ref_rows)):
            n = int(lengths[b])  # committed; the pending token is seq[n]
            if len(seq) <= n:  # finished: the last round committed past max tokens
                continue
            taps, out, k = _reference(plain, trained, params, seq[:n + 1])
            np.testing.assert_allclose(np.asarray(state.pending_hidden[b]), taps[n - 1], **TOL)
            if live[b]:  # path node i verified the token at position old + i
                m = int(acc[b]) + 1
                np.testing.assert_allclose(verify[b, :m], taps[old[b]:old[b] + m], **TOL)
            np.testing.assert_allclose(ds.cache.k[0, b, :, :n], k[:, :n], **TOL)
            np.testing.assert_allclose(ds.next_feature[b], out[n - 1], **TOL)


# Training ------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_hits(drafter, dparams, params, batch):
    """``(hits, counts)`` at depths 1 and 2 computed as decoding does, with the draft cache.

    Depth 1: every slot's pair on the true fused features, causal. Depth 2: the chain rooted
    at slot ``s - 1``: a query at slot ``s`` with the layer's depth-1 output at ``s - 1`` and
    the token of slot ``s``, attending to the true entries before ``s`` and to itself; counted
    where that token is the target's own."""
    tokens, labels = batch["tokens"], batch["labels"]
    b, n = labels.shape
    c = drafter.target.config
    cache = KVCache.init(1, b, c.num_kv_heads, 2 * n, c.head_dim)
    slots = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    s = np.arange(n)
    causal = jnp.asarray(s[None, :] <= s[:, None]) & batch["valid"][:, None, :]
    g1, cache = drafter.step(dparams, params, cache,
                             drafter.input_features(dparams, batch["features"]), tokens[:, 1:],
                             batch["positions"], slots,
                             jnp.concatenate([causal, jnp.zeros((b, n, n), bool)], axis=2))
    prev = jnp.concatenate([jnp.zeros_like(g1[:, :1]), g1[:, :-1]], axis=1)
    chain = jnp.concatenate([jnp.asarray(s[None, :] < s[:, None]) & causal,
                             jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n))], axis=2)
    g2, _ = drafter.step(dparams, params, cache, prev, tokens[:, 1:], batch["positions"],
                         slots + n, chain)
    count1 = batch["label_mask"][:, 1:]  # slot s's label: labels[s + 1]
    agree = tokens[:, 1:-1] == labels[:, :-1]  # slot s's token is the target's own
    count2 = count1 & agree & jnp.asarray(s[None, :-1] >= 1)
    out = []
    for g, count in ((g1, count1), (g2, count2)):
        top = dparams["vocab_map"][jnp.argmax(drafter.draft_scores(dparams, None, g), -1)]
        out.append((((top[:, :-1] == labels[:, 1:]) & count).sum(), count.sum()))
    return out


def test_ttt_loss_decreases_and_depth_hits_match_decoding(target, data, fitted):
    model, params = target
    _, vocab_map, batch = data
    trainer, frozen, init = fitted["trainer"], fitted["frozen"], fitted["init"]
    np.testing.assert_array_equal(  # the head starts from the target head's columns
        init["head"], np.asarray(draft_vocab.target_lm_head(model, params))[:, vocab_map])
    losses = [float(m["loss"]) for m in fitted["history"]]
    assert losses[-1] < 0.3 * losses[0]
    assert set(fitted["history"][-1]) >= {"acc_1", "acc_2", "acc_3", "ce_1", "ce_3"}
    for p in (trainer.decode_params(init, vocab_map), fitted["dparams"]):
        hits, counts = (np.asarray(a) for a in trainer.depth_hits(p, batch, frozen))
        assert hits.shape == counts.shape == (3,)
        direct = _teacher_forced_hits(trainer.drafter, p, params, batch)
        assert [(hits[d], counts[d]) for d in (0, 1)] == [tuple(map(int, x)) for x in direct]
        ranks = np.asarray(trainer.depth_ranks(p, batch, frozen))  # per root, for tune_tree
        assert ranks.shape == batch["labels"][:, 1:].shape + (3,)
        np.testing.assert_array_equal((ranks == 0).sum((0, 1)), hits)  # rank 0 = a top-1 hit
        np.testing.assert_array_equal((ranks >= 0).sum((0, 1)), counts)
    assert hits[0] > 0.5 * counts[0] > 0  # the trained drafter


# Weights and bad input -----------------------------------------------------------------------


def test_weights_round_trip_and_errors(target, tmp_path):
    model, params = target
    drafter = _drafter(model, 16, "static")
    dparams = _random(drafter)
    path = str(tmp_path / "eagle3.safetensors")
    save_weights(path, drafter, dparams, target_name="tiny", dtype="float32")
    back = load_weights(path, drafter)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), dparams, back))
    assert back["vocab_map"].dtype == jnp.int32
    save_weights(path, drafter, dparams)  # bf16 floats, the map exact
    d2, p2 = load_shipped(model, path=path, tree="dynamic")
    assert d2.mode == "dynamic" and d2.draft_vocab == 16 and d2.feature_layers == (0, 1, 2)
    np.testing.assert_array_equal(p2["vocab_map"], dparams["vocab_map"])
    np.testing.assert_allclose(p2["head"], dparams["head"], rtol=2 ** -7)
    errors = head_weights.HeadWeightsError
    with pytest.raises(errors, match="feature_layers"):
        load_weights(path, Eagle3Drafter.create(model, 16, feature_layers=(0, 2)))
    with pytest.raises(errors, match="draft_vocab"):
        load_weights(path, _drafter(model, 8, "static"))
    with pytest.raises(errors, match="hidden size"):
        load_shipped(kit.tiny_model("gqa", hidden_size=32, num_heads=4, head_dim=8)[0],
                     path=path)
    with pytest.raises(errors, match="vocabulary"):
        load_shipped(kit.tiny_model("gqa", vocab_size=64)[0], path=path)
    eagle1 = EagleDrafter.create(model)
    eagle_weights.save_weights(path, eagle1, eagle_weights.random_params(eagle1))
    with pytest.raises(errors, match="holds 'eagle' weights"):
        load_shipped(model, path=path)
    save_weights(path, drafter, dparams)
    kit.truncate_file(path)
    with pytest.raises(errors, match="damaged"):
        load_shipped(model, path=path)
    command = "python -m experiments.train_corpus_drafter --drafter=eagle3"
    with pytest.raises(errors, match=command):
        load_shipped(model, path=str(tmp_path / "missing.safetensors"))
    from models import registry as models
    with pytest.raises(errors, match=command):  # no shipped weights for this model
        registry.build("eagle3", models.load("tiny-llama"))


def test_bad_options(target):
    model, params = target
    method = registry.get("eagle3")
    assert method.weights == "eagle3" and method.trees == (
        ("static", "dynamic", "tunedN", "generic"), "static")
    assert Eagle3Options(tree="dynamic", dynamic_budget=8).dynamic_kwargs() == {"budget": 8}
    for bad, match in ((dict(tree="bushy"), "tree must be one of"),
                       (dict(dynamic_budget=8), "tree=dynamic only"),
                       (dict(tree="dynamic", dynamic_top_k=0), "dynamic_top_k must be >= 1")):
        with pytest.raises(ValueError, match=match):
            method.make_options(**bad)
    for kwargs, match in ((dict(draft_vocab=0), "draft vocabulary of 1..128"),
                          (dict(draft_vocab=200), "draft_vocab must be in"),
                          (dict(draft_vocab=16, feature_layers=(0, 3)), "feature_layers"),
                          (dict(draft_vocab=2), "3 tokens per node, more than the 2"),
                          (dict(draft_vocab=3, tree="dynamic", top_k=4), "4 tokens per node"),
                          (dict(draft_vocab=16, tree="bushy"), "unknown EAGLE tree")):
        with pytest.raises(ValueError, match=match):
            Eagle3Drafter.create(model, **kwargs)
    drafter = _drafter(model, 4, "static")
    for vmap, match in (([1, 2, 3], "must be 4 integer ids"), ([1, 2, 2, 3], "distinct"),
                        ([1, 2, 3, 128], "distinct target ids in 0..127")):
        with pytest.raises(ValueError, match=match):
            decode_params(drafter, {}, np.asarray(vmap))
    vmap = np.arange(8)
    for kwargs, match in ((dict(), "LM head"),
                          (dict(target_params=params, num_steps=0), "num_steps >= 1"),
                          (dict(target_params=params, step_decay=0.0), "step_decay"),
                          (dict(target_params=params, seq_len=1), "seq_len >= 2"),
                          (dict(target_params=params, feature_layers="1,x"), "integers"),
                          (dict(target_params=params, feature_layers="0:9"), "feature_layers")):
        with pytest.raises(ValueError, match=match):
            make_trainer(model, vmap, **kwargs)
    with pytest.raises(ValueError, match="distinct"):
        make_trainer(model, np.zeros(8, np.int32), target_params=params)
    trainer = make_trainer(model, vmap, target_params=params, feature_layers="2:0")
    assert trainer.drafter.feature_layers == (2, 0) and trainer.seq_len == 256
    deeper = Eagle3Drafter.create(kit.tiny_model("gqa", num_layers=4)[0], 16,
                                  feature_layers=(3,))
    with pytest.raises(ValueError, match="the target has 3 layers"):
        deeper.check_compatible(model)
