"""Tuned static trees: optimal node choice, exact expected acceptance, tree files, head ranks."""

import dataclasses
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import head_weights, heads
from drafters.hydra import HydraDrafter
from drafters.medusa import DEFAULT_CHOICES, MedusaDrafter
from models.llama import LlamaModel
from specjax import accept, tree_tuning
from specjax.tree import DraftTree


def _random_ranks(seed, n=60, depth=3, width=3, miss=0.25):
    """Ranks skewed towards 0, with misses (``width``) and a few missing labels (-1)."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.geometric(0.55, size=(n, depth)) - 1, width)
    ranks[rng.random((n, depth)) < miss] = width
    ranks[rng.random(n) < 0.1, -1] = -1
    return ranks


def _prefix_closed_sets(universe):
    """Every non-empty subset of ``universe`` closed under prefixes."""
    for k in range(1, len(universe) + 1):
        for subset in itertools.combinations(universe, k):
            s = set(subset)
            if all(len(c) == 1 or c[:-1] in s for c in subset):
                yield subset


@pytest.mark.parametrize("seed", range(4))
def test_tuned_order_is_optimal_for_every_size(seed):
    """Brute force over every prefix-closed tree of ranks < 2 and depth <= 3 (14 nodes): the
    first n choices of the tuned order score the best of all n-node trees."""
    ranks = _random_ranks(seed, width=2)
    universe = [c for d in (1, 2, 3) for c in itertools.product(range(2), repeat=d)]
    best = {}
    for subset in _prefix_closed_sets(universe):
        value = tree_tuning.expected_accepted(subset, ranks)
        best[len(subset)] = max(best.get(len(subset), -1.0), value)
    order = tree_tuning.tuned_order(ranks, max_nodes=len(universe), max_rank=2)
    curve = tree_tuning.cumulative_expected(order, ranks)
    for n in range(1, len(order) + 1):
        assert tree_tuning.expected_accepted(order[:n], ranks) == pytest.approx(curve[n - 1])
        assert curve[n - 1] == pytest.approx(best[n]), n
        DraftTree.from_choices(order[:n])  # every cut is a valid tree
    # choices never hit are left out: beyond the order, no tree gains anything
    assert all(best[n] == pytest.approx(curve[-1]) for n in best if n >= len(order))


def test_label_ranks_follow_top_k_order_with_ties():
    logits = jnp.asarray([[1.0, 3.0, 3.0, 0.0]] * 4)
    order = np.asarray(jax.lax.top_k(logits[0], 4)[1])  # [1, 2, 0, 3]
    labels = jnp.asarray([2, 1, 3, 7])  # 7: outside the 4 candidates
    got = np.asarray(tree_tuning.label_ranks(logits, labels))
    assert got.tolist() == [int(np.flatnonzero(order == 2)[0]), 0, 3, 4]


def test_order_ties_go_to_the_parent_and_respect_max_rank_and_depth():
    ranks = np.array([[0, 0, 0], [0, 0, 0], [1, 5, 0], [2, -1, 0]])
    order = tree_tuning.tuned_order(ranks, max_nodes=10, max_rank=2)
    # (0,), (0, 0), (0, 0, 0) all hit twice: shallower first; (1,) hit once; rank 2 / 5: out
    assert order == [(0,), (0, 0), (0, 0, 0), (1,)]
    assert tree_tuning.tuned_order(ranks, max_nodes=10, max_rank=2, max_depth=1) == [(0,), (1,)]
    assert tree_tuning.tuned_order(ranks, max_nodes=2, max_rank=3) == [(0,), (0, 0)]
    with pytest.raises(ValueError, match="max_nodes"):
        tree_tuning.tuned_order(ranks, max_nodes=0)
    with pytest.raises(ValueError, match="integer array"):
        tree_tuning.tuned_order(np.zeros(3, np.int32), max_nodes=2)
    with pytest.raises(ValueError, match="prefix"):
        tree_tuning.expected_accepted([(0, 0)], ranks)


@pytest.mark.parametrize("seed", range(3))
def test_expected_accepted_equals_greedy_verification(seed):
    """Builds, per position, head candidates that put the true token at the measured rank,
    fills the tree's nodes from them, verifies with ``accept.greedy`` against a target that
    emits the true tokens, and compares the mean accepted length."""
    depth, width, vocab = 3, 4, 16
    ranks = _random_ranks(seed, n=80, depth=depth, width=width)
    choices = tree_tuning.tuned_order(ranks, max_nodes=9, max_rank=width)
    tree = DraftTree.from_choices(choices)
    rng = np.random.default_rng(seed + 10)
    n, t = ranks.shape[0], tree.num_nodes
    tokens = np.zeros((n, t), np.int32)
    logits = np.zeros((n, t, vocab), np.float32)
    for i in range(n):
        truth = rng.integers(vocab, size=depth)
        cands = []
        for d in range(depth):  # head d's candidates: the true token at rank ranks[i, d]
            others = [v for v in rng.permutation(vocab) if v != truth[d]]
            r = ranks[i, d]
            cands.append(others[:r] + [truth[d]] + others[r:] if 0 <= r < width else others)
        for node in range(1, t):
            c = tree.choice_of_node[node]
            tokens[i, node] = cands[len(c) - 1][c[-1]]
        for node in range(t):  # the target's next token after any node at depth d
            d = int(tree.depth[node])
            if d < depth:
                logits[i, node, truth[d]] = 1.0
    result = accept.greedy(jnp.asarray(tokens), tree, jnp.asarray(logits))
    # a label-less depth (-1) is a miss in the data; the simulated target still has a truth
    # there, so compare on positions with every label present
    full = (ranks >= 0).all(1)
    got = np.asarray(result.num_accepted)[full].mean()
    assert got == pytest.approx(tree_tuning.expected_accepted(choices, ranks[full]))


def test_tree_file_round_trip_and_damage(tmp_path):
    path = str(tmp_path / "x.tree.json")
    order = ((0,), (1,), (0, 0), (2,))
    tuned = tree_tuning.TunedTree(order, 3, 4096, {"note": "test"})
    tree_tuning.save_tree_file(path, tuned)
    back = tree_tuning.load_tree_file(path)
    assert back == tuned and back.info == {"note": "test"}
    assert back.choices() == [(0,), (1,), (0, 0)] and back.choices(4) == list(order)
    with pytest.raises(ValueError, match="1..4"):
        back.choices(5)
    # a second default for packed targets, kept through the file; absent: the one default
    both = tree_tuning.TunedTree(order, 3, 4096, {}, packed_default_nodes=1)
    tree_tuning.save_tree_file(str(tmp_path / "both.tree.json"), both)
    back2 = tree_tuning.load_tree_file(str(tmp_path / "both.tree.json"))
    assert back2.packed_default_nodes == 1
    assert back2.choices() == [(0,), (1,), (0, 0)] and back2.choices(packed=True) == [(0,)]
    assert back2.choices(4, packed=True) == list(order)  # an explicit size wins
    assert back.choices(packed=True) == back.choices()
    T = tree_tuning.TunedTree
    for bad, match in ((T(((0, 0), (0,)), 1), "prefix"), (T(order, 5), "default_nodes"),
                       (T(order, 2, 2), "draft_vocab"),
                       (T(order, 2, packed_default_nodes=5), "packed_default_nodes")):
        with pytest.raises(tree_tuning.TunedTreeError, match=match):
            tree_tuning.save_tree_file(path, bad)
    assert tree_tuning.load_tree_file(path) == tuned  # a failed save left the file alone
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[:len(text) // 2])
    with pytest.raises(tree_tuning.TunedTreeError, match="damaged"):
        tree_tuning.load_tree_file(path)
    doc = {"format": tree_tuning.TREE_FILE_FORMAT, "default_nodes": 1, "order": [[1, 0]]}
    with open(path, "w") as f:
        json.dump(doc, f)
    with pytest.raises(tree_tuning.TunedTreeError, match="prefix"):
        tree_tuning.load_tree_file(path)
    with pytest.raises(tree_tuning.TunedTreeError, match="no tuned tree"):
        tree_tuning.load_tree_file(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("cls", [MedusaDrafter, HydraDrafter])
@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_true_ranks_locate_labels_in_top_k(target, cls, draft_vocab):
    model, params = target
    drafter = cls.create(model, draft_vocab=draft_vocab)
    dparams = kit.noisy_params(drafter)
    rng = np.random.default_rng(0)
    m, k = 300, drafter.num_heads  # 300: two chunks, the second wrapped
    data = {"hidden": rng.normal(size=(m, model.hidden_size)).astype(np.float32),
            "tokens": rng.integers(model.vocab_size, size=(m, k + 1)).astype(np.int32),
            "mask": rng.random((m, k)) < 0.9}
    ranks = heads.true_ranks(drafter, dparams, params, data)
    assert ranks.shape == (m, k)
    assert ((ranks == -1) == ~data["mask"]).all()
    logits = drafter.train_logits(dparams, params, jnp.asarray(data["hidden"]),
                                  jnp.asarray(data["tokens"]))
    n = draft_vocab or model.vocab_size
    _, order = jax.lax.top_k(logits[..., :n], n)
    order = np.asarray(order)
    i, j = np.nonzero(data["mask"] & (data["tokens"][:, 1:] < n))
    assert (order[i, j, ranks[i, j]] == data["tokens"][i, j + 1]).all()
    outside = data["mask"] & (data["tokens"][:, 1:] >= n)
    assert (ranks[outside] == n).all() and (outside.any() == bool(draft_vocab))
    assert len(set(ranks[data["mask"]].tolist())) > 3  # not a degenerate all-zero answer


@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_eagle_depth_ranks_follow_the_self_fed_levels(target, draft_vocab):
    """Root r, depth d: the rank of token r + d + 1 under level d - 1 at slot r + d - 1 (the
    alignment ``test_eagle.test_levels_reproduce_decode_time_chains`` proves against
    decode-time drafting), in ``top_k`` order over the draft vocabulary."""
    from drafters import distill, eagle_train
    from drafters.eagle import EagleDrafter
    from drafters.eagle_weights import random_params
    model, params = target
    drafter = EagleDrafter.create(model, draft_vocab=draft_vocab)
    dparams = random_params(drafter, seed=3)
    rng = np.random.default_rng(1)
    lengths = np.array([20, 14, 9, 17, 12], np.int32)
    tokens = np.zeros((5, 20), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(1, model.vocab_size, size=n)
    hidden = np.asarray(distill.teacher_forced_hidden(model, params, tokens))
    rec = distill.Records(tokens, lengths, np.full(5, 4, np.int32), hidden, {})
    data = eagle_train.window_dataset(rec, 16)
    levels = 3
    ranks = eagle_train.depth_ranks(drafter, dparams, params, data, levels, chunk=2)
    outs = eagle_train.level_features(
        drafter, dparams, params, jnp.asarray(data["hidden"][:, :16]),
        jnp.asarray(data["tokens"][:, 1:17]), jnp.asarray(data["positions"]),
        jnp.asarray(data["valid"]), levels)
    lab = [np.asarray(m[1]) for m in eagle_train.level_masks(
        {k: jnp.asarray(v) for k, v in data.items()}, levels)]
    n = draft_vocab or model.vocab_size
    want = []
    for b in range(5):
        for r in range(16):
            if not lab[0][b, r]:
                continue
            row = []
            for m in range(levels):
                s = r + m
                if s >= 16 or not lab[m][b, s]:
                    row.append(-1)
                    continue
                label = int(data["tokens"][b, s + 2])
                logits = np.asarray(drafter.draft_logits(params, outs[m][b, s]))
                order = np.asarray(jax.lax.top_k(jnp.asarray(logits), n)[1])
                row.append(int(np.flatnonzero(order == label)[0]) if label < n else n)
            want.append(row)
    np.testing.assert_array_equal(ranks, np.array(want))
    # one root per response label in the window (16 slots: at most 15 labelled roots)
    assert ranks.shape[0] == sum(min(int(x) - 4, 15) for x in lengths)
    assert (ranks[:, 1] >= 0).sum() > 0 and (ranks == -1).any()


def test_load_shipped_picks_the_tuned_tree(target, tmp_path):
    model, _ = target
    drafter = MedusaDrafter.create(model)
    weights = str(tmp_path / "medusa.safetensors")
    head_weights.save_weights(weights, drafter, kit.noisy_params(drafter))
    # no tree file: the generic tree; asking for a tuned one is a clear error
    assert head_weights.load_shipped("medusa", model, path=weights)[0].tree == drafter.tree
    with pytest.raises(tree_tuning.TunedTreeError, match="tune_tree"):
        head_weights.load_shipped("medusa", model, path=weights, tree="tuned")
    order = ((0,), (1,), (0, 0), (2,), (0, 0, 0), (1, 0))
    tree_tuning.save_tree_file(head_weights.tree_file_of(weights),
                               tree_tuning.TunedTree(order, 4, draft_vocab=40))
    tuned = head_weights.load_shipped("medusa", model, path=weights)[0]
    assert tuned.tree == DraftTree.from_choices(order[:4]) and tuned.draft_vocab == 40
    full = head_weights.load_shipped("medusa", model, path=weights, draft_vocab=0)[0]
    assert full.draft_vocab == 0  # an explicit draft_vocab wins over the file's
    assert head_weights.load_shipped("medusa", model, path=weights, tree="tuned6")[0].tree == \
        DraftTree.from_choices(order)
    generic = head_weights.load_shipped("medusa", model, path=weights, tree="generic")[0]
    assert generic.tree == DraftTree.from_choices(DEFAULT_CHOICES) and generic.draft_vocab == 0
    assert head_weights.load_shipped("medusa", model, path=weights, choices=[(0,)])[0].tree == \
        DraftTree.from_choices([(0,)])
    for bad, match in (("tuned7", "1..6"), ("tuned0", "1..6"), ("wide", "unknown tree")):
        with pytest.raises(ValueError, match=match):
            head_weights.load_shipped("medusa", model, path=weights, tree=bad)
    # a packed target (--weights=gguf) takes the file's packed default size
    tree_tuning.save_tree_file(head_weights.tree_file_of(weights), tree_tuning.TunedTree(
        order, 4, draft_vocab=40, packed_default_nodes=2))
    packed_model = LlamaModel(dataclasses.replace(model.config,
                                                  weight_formats=(("wqkv", "q4_1"),)))
    assert head_weights.is_packed(packed_model) and not head_weights.is_packed(model)
    assert head_weights.load_shipped("medusa", packed_model, path=weights)[0].tree == \
        DraftTree.from_choices(order[:2])
    assert head_weights.load_shipped("medusa", model, path=weights)[0].tree == \
        DraftTree.from_choices(order[:4])


def test_eagle_load_shipped_tree_options(target, tmp_path):
    from drafters import eagle, eagle_weights
    model, _ = target
    drafter = eagle.EagleDrafter.create(model)
    weights = str(tmp_path / "eagle.safetensors")
    eagle_weights.save_weights(weights, drafter, eagle_weights.random_params(drafter))
    load = functools.partial(eagle_weights.load_shipped, model, path=weights)
    assert load()[0].tree == DraftTree.from_choices(eagle.DEFAULT_CHOICES)  # no tuned file
    order = ((0,), (0, 0), (1,), (0, 0, 0), (0, 1))
    tree_tuning.save_tree_file(head_weights.tree_file_of(weights),
                               tree_tuning.TunedTree(order, 3, draft_vocab=64))
    static = load()[0]
    assert static.tree == DraftTree.from_choices(order[:3]) and static.draft_vocab == 64
    assert load(tree="tuned5")[0].tree == DraftTree.from_choices(order)
    generic = load(tree="generic")[0]
    assert generic.tree == DraftTree.from_choices(eagle.DEFAULT_CHOICES)
    assert generic.draft_vocab == 0
    dynamic = load(tree="dynamic")[0]
    assert dynamic.mode == "dynamic" and dynamic.draft_vocab == 64
    assert load(tree="dynamic", draft_vocab=0)[0].draft_vocab == 0
    assert load(choices=[(0,)])[0].tree == DraftTree.from_choices([(0,)])
    with pytest.raises(ValueError, match="explicit choices"):
        load(tree="tuned2", choices=[(0,)])


@pytest.mark.parametrize("name", ["medusa", "hydra", "eagle"])
def test_shipped_smollm2_tree_files_fit_their_heads(name):
    weights = head_weights.shipped_path(name, "smollm2-135m")
    tuned = tree_tuning.load_tree_file(head_weights.tree_file_of(weights))
    order, info = tuned.order, tuned.info
    config, _ = head_weights.read_weights(weights)
    tree = DraftTree.from_choices(tuned.choices())
    if name != "eagle":  # one head per depth (EAGLE's num_heads are attention heads)
        assert tree.max_depth <= config["num_heads"]
    assert info["drafter"] == name and os.path.basename(weights) == info["weights"]
    assert str(tuned.default_nodes) in info["measured"]  # the default size was timed
    # tuned on held-out data: the stored curve rises and beats the generic tree's at its size
    from drafters import eagle
    generic = eagle.DEFAULT_CHOICES if name == "eagle" else DEFAULT_CHOICES
    curve = info["expected_accepted"]
    assert len(curve) == len(order) and all(b >= a for a, b in zip(curve, curve[1:]))
    assert curve[len(generic) - 1] >= info["generic_expected_accepted"]


def test_tune_tree_binary_on_a_tiny_model(tmp_path):
    """The whole binary as a user runs it: data and random heads for ``tiny-gqa``, ranks,
    timing against plain decoding, a valid tree file; bad flags fail with one line."""
    import subprocess
    import sys
    from drafters import distill
    from models import registry
    lm = registry.load("tiny-gqa")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, lm.model.vocab_size, size=n).tolist() for n in (5, 9, 7, 12, 6)]
    data = str(tmp_path / "data")
    distill.distill(lm.model, lm.params, prompts, data, max_new_tokens=24, batch_size=5,
                    model_name="tiny-gqa")
    drafter = MedusaDrafter.create(lm.model)
    weights = str(tmp_path / "medusa.safetensors")
    head_weights.save_weights(weights, drafter, kit.noisy_params(drafter), target_name="tiny-gqa")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "experiments.tune_tree", "--model=tiny-gqa",
                               f"--drafter_weights={weights}", *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)

    proc = run(f"--data_dir={data}", "--eval_fraction=0.4", "--sizes=1,2", "--max_nodes=4",
               "--max_rank=3", "--measure_prompts=2", "--max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr
    tuned = tree_tuning.load_tree_file(head_weights.tree_file_of(weights))
    assert tuned.default_nodes in (1, 2) and 1 <= len(tuned.order) <= 4
    assert max(max(c) for c in tuned.order) < 3
    assert set(tuned.info["measured"]) == {"0", "1", "2"}
    assert len(tuned.info["expected_accepted"]) == len(tuned.order)
    for args, match in (([], "--data_dir"),
                        ([f"--data_dir={data}", "--sizes=2,9", "--max_nodes=4"], "--max_nodes"),
                        ([f"--data_dir={data}", "--measure_prompts=0"], "--default_nodes")):
        bad = run(*args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert match in bad.stderr.strip().splitlines()[-1]
