"""REST: datastore queries against a brute-force scan, the trie against a plain Python reference,
the datastore file (round trip, bad files), lossless decoding (greedy on the tiny model with a
datastore of its own answers and one of random text; the exact sequence distribution under
sampling) and the build binary end to end."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import head_weights, registry
from drafters.rest import RestDrafter
from drafters.rest_datastore import (Datastore, build_datastore, load_datastore,
                                     save_datastore)
from sequence_kit import SEQ_VOCAB, chi_square_pvalue, exact_joint, sample_sequences, seq_model
from specjax.decode import DecodeConfig, generate
from specjax.drafter import DraftContext
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, speculative_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_sequences(rng, vocab, count, longest):
    return [rng.integers(0, vocab, rng.integers(0, longest + 1)).tolist() for _ in range(count)]


# The datastore query against a brute-force scan -----------------------------------------------


def _brute_matches(seqs, query, n, depth):
    """Continuations (tuples, cut at the sequence's end) after every occurrence of the last
    ``n`` tokens of ``query`` in ``seqs``."""
    key, out = list(query[-n:]), []
    for s in seqs:
        for p in range(n, len(s) + 1):
            if s[p - n:p] == key:
                out.append(tuple(s[p:p + depth]))
    return out


def test_retrieval_matches_a_brute_force_scan():
    rng = np.random.default_rng(0)
    vocab, depth, c = 4, 3, 6
    drafter = RestDrafter(vocab + 1, num_candidates=c, num_nodes=4, draft_depth=depth,
                          max_ngram=4, min_ngram=2)
    retrieve = jax.jit(drafter.retrieve)
    checked = {"exact": 0, "sampled": 0, "none": 0}
    for trial in range(6):
        seqs = _random_sequences(rng, vocab, 12, 40)
        # The drafter's vocabulary has one id more than the text uses: never matched.
        store = build_datastore(seqs, vocab + 1, sort_depth=drafter.max_ngram + depth)
        params = drafter.params_of(store)
        b, h = 16, 12
        history = rng.integers(0, vocab + 1, (b, h)).astype(np.int32)
        lengths = rng.integers(0, h + 1, b).astype(np.int32)
        got = retrieve(params, jnp.asarray(history), jnp.asarray(lengths))
        for r in range(b):
            query = history[r, :lengths[r]].tolist()
            want_n, want = 0, []
            for n in range(drafter.max_ngram, drafter.min_ngram - 1, -1):
                if len(query) >= n and _brute_matches(seqs, query, n, depth):
                    want_n, want = n, _brute_matches(seqs, query, n, depth)
                    break
            assert int(got.ngram[r]) == want_n and int(got.count[r]) == len(want), (trial, r)
            valid = np.asarray(got.valid[r])
            assert (valid[:, 1:] <= valid[:, :-1]).all()  # each continuation is a prefix
            conts = [tuple(np.asarray(got.tokens[r, i])[valid[i]].tolist())
                     for i in range(min(c, len(want)))]
            assert not valid[len(conts):].any()
            assert all(vocab not in cont for cont in conts)  # separators are never drafted
            if len(want) <= c:
                assert sorted(conts) == sorted(want), (trial, r)
                checked["exact" if want else "none"] += 1
            else:  # a sample of distinct occurrences: a sub-multiset
                for cont in set(conts):
                    assert conts.count(cont) <= want.count(cont), (trial, r)
                checked["sampled"] += 1
    assert min(checked.values()) >= 5, checked


# The trie against a Python reference ----------------------------------------------------------


def _ref_trie(conts, lengths, budget, depth):
    """The kept prefixes (tuples) and their counts; ties as ``top_k`` breaks them (lower pool
    index ``(d - 1) * C + first candidate``)."""
    count, first = {}, {}
    for i, (cont, n) in enumerate(zip(conts, lengths)):
        for d in range(1, n + 1):
            p = tuple(cont[:d])
            count[p] = count.get(p, 0) + 1
            first.setdefault(p, i)
    c = len(conts)
    ranked = sorted(count, key=lambda p: (-(count[p] * (depth + 1) + depth - len(p)),
                                          (len(p) - 1) * c + first[p]))
    return {p: count[p] for p in ranked[:budget]}


def test_trie_matches_the_reference_and_is_a_bfs_tree_closed_under_parents():
    rng = np.random.default_rng(1)
    b, c, depth = 64, 6, 4
    for budget in (1, 5, 12, 24):
        drafter = RestDrafter(8, num_candidates=c, num_nodes=budget, draft_depth=depth)
        conts = rng.integers(0, 3, (b, c, depth)).astype(np.int32)  # 3 ids: shared prefixes
        lengths = rng.integers(0, depth + 1, (b, c))
        valid = np.arange(depth)[None, None, :] < lengths[..., None]
        tokens, parents, node_valid = jax.jit(drafter.trie)(jnp.asarray(conts),
                                                           jnp.asarray(valid))
        tokens, parents, node_valid = map(np.asarray, (tokens, parents, node_valid))
        assert parents.shape == node_valid.shape == (b, drafter.tree.num_nodes)
        for r in range(b):
            want = _ref_trie(conts[r].tolist(), lengths[r].tolist(), budget, depth)
            kept = int(node_valid[r].sum()) - 1
            assert node_valid[r, :kept + 1].all() and not node_valid[r, kept + 1:].any()
            assert parents[r, 0] == -1 and (parents[r, kept + 1:] == -1).all()
            prefix = {0: ()}
            for n in range(1, kept + 1):
                par = parents[r, n]
                assert 0 <= par < n and par in prefix  # BFS order, closed under parents
                prefix[n] = prefix[par] + (int(tokens[r, n - 1]),)
            depths = [len(prefix[n]) for n in range(kept + 1)]
            assert depths == sorted(depths) and max(depths) <= drafter.tree.max_depth
            nodes = [prefix[n] for n in range(1, kept + 1)]
            assert len(set(nodes)) == len(nodes)  # distinct prefixes: no duplicate siblings
            assert set(nodes) == set(want), (budget, r)


# The datastore file ----------------------------------------------------------------------------


def test_datastore_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(2)
    seqs = _random_sequences(rng, 5, 6, 30)
    store = build_datastore(seqs, 5, sort_depth=6)
    assert store.num_sequences == 6 and store.suffix_array.size == sum(map(len, seqs))
    path = save_datastore(str(tmp_path / "ds.safetensors"), store, source="test")
    back = load_datastore(path, 5)
    np.testing.assert_array_equal(back.tokens, store.tokens)
    np.testing.assert_array_equal(back.suffix_array, store.suffix_array)
    assert (back.vocab_size, back.sort_depth, back.meta["source"]) == (5, 6, "test")
    with pytest.raises(head_weights.HeadWeightsError, match="vocabulary of 5, the target has 7"):
        load_datastore(path, 7)
    with pytest.raises(ValueError, match="over the datastore's sort depth 6"):
        RestDrafter(5, draft_depth=3, max_ngram=4).params_of(back)
    with pytest.raises(ValueError, match="ids must be in 0..4"):
        build_datastore([[1, 5]], 5)
    with pytest.raises(ValueError, match="no token"):
        build_datastore([[], []], 5)
    with pytest.raises(ValueError, match="num_nodes 20 is over"):
        RestDrafter(5, num_candidates=3, num_nodes=20, draft_depth=4)
    unsorted = Datastore(store.tokens, store.suffix_array[::-1].copy(), 5, 6)
    bad = save_datastore(str(tmp_path / "unsorted.safetensors"), unsorted)
    with pytest.raises(head_weights.HeadWeightsError, match="not sorted; build one with"):
        load_datastore(bad)
    holes = Datastore(store.tokens, store.suffix_array[1:].copy(), 5, 6)
    bad = save_datastore(str(tmp_path / "holes.safetensors"), holes)
    with pytest.raises(head_weights.HeadWeightsError, match="not a permutation"):
        load_datastore(bad)
    kit.truncate_file(path)
    with pytest.raises(head_weights.HeadWeightsError, match="is not a REST datastore"):
        load_datastore(path)
    with pytest.raises(head_weights.HeadWeightsError, match="build_rest_datastore"):
        load_datastore(str(tmp_path / "none.safetensors"))


def test_method_needs_a_datastore(tmp_path):
    from models import registry as models
    lm = models.load("tiny-gqa")
    with pytest.raises(head_weights.HeadWeightsError,
                       match="no REST datastore is shipped for tiny-gqa.*build_rest_datastore"):
        registry.build("rest", lm)
    path = save_datastore(str(tmp_path / "d.safetensors"),
                          build_datastore([[1, 2, 3, 4]], lm.model.vocab_size))
    drafter, params = registry.build("rest", lm, datastore=path, num_nodes=3)
    assert drafter.num_nodes == 3 and params["suffix_array"].shape == (4,)
    assert registry.get("rest").make_options().param_sharding() == "replicated"


# Lossless decoding -----------------------------------------------------------------------------


def test_greedy_equals_plain_decoding_with_a_good_and_an_adversarial_datastore(target,
                                                                               reference):
    model, params = target
    config, rows = reference
    drafter = RestDrafter(model.vocab_size, num_candidates=8, num_nodes=6, draft_depth=4,
                          max_ngram=3, min_ngram=1)
    rng = np.random.default_rng(3)
    stores = {"answers": [p + r for p, r in zip(kit.PROMPTS, rows)],
              "random": _random_sequences(rng, model.vocab_size, 40, 60)}
    tau = {}
    for name, seqs in stores.items():
        dparams = drafter.params_of(build_datastore(seqs, model.vocab_size, sort_depth=8))
        out = speculative_generate(model, params, drafter, dparams, kit.PROMPTS, config)
        assert kit.rows_of(out) == rows, name
        tau[name] = sum(map(len, rows)) / int(out.stats.row_calls)
    # Retrieved from these very answers, the drafts are accepted far more often.
    assert tau["answers"] > 2.5 and tau["answers"] > 1.5 * tau["random"], tau


def test_rows_draft_independently_of_their_batch_mates():
    rng = np.random.default_rng(4)
    store = build_datastore(_random_sequences(rng, 6, 20, 30), 6, sort_depth=7)
    drafter = RestDrafter(6, num_candidates=5, num_nodes=7, draft_depth=4, max_ngram=3,
                          min_ngram=1)
    params = drafter.params_of(store)
    history = jnp.asarray(rng.integers(0, 6, (5, 9)), jnp.int32)
    lengths = jnp.asarray([9, 4, 1, 0, 6], jnp.int32)

    @jax.jit
    def propose(history, lengths):
        ctx = DraftContext(None, None, history, lengths, history[:, 0], None, None)
        return drafter.propose(params, (), ctx, None)[0]

    batch = propose(history, lengths)
    assert not np.asarray(batch.valid[3, 1:]).any()  # no history: no match, nothing drafted
    for r in range(5):
        alone = propose(history[r:r + 1], lengths[r:r + 1])
        for field in ("tokens", "parents", "valid"):
            np.testing.assert_array_equal(getattr(alone, field)[0], getattr(batch, field)[r])


def test_sequence_distribution_is_exact():
    sampling = SamplingConfig(temperature=1.0)
    model, params = seq_model()
    drafter = RestDrafter(SEQ_VOCAB, num_candidates=6, num_nodes=5, draft_depth=3, max_ngram=2,
                          min_ngram=1)
    store = build_datastore(_random_sequences(np.random.default_rng(5), SEQ_VOCAB, 30, 20),
                            SEQ_VOCAB, sort_depth=5)
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter, drafter.params_of(store),
                                     sampling, SpecConfig())
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3


# The binary ------------------------------------------------------------------------------------


def test_build_rest_datastore_binary_on_a_tiny_corpus(tmp_path):
    from drafters import corpus
    from models import registry as models
    lm = models.load("tiny-gqa")
    rng = np.random.default_rng(6)
    examples = [(rng.integers(0, 128, 5).tolist(), rng.integers(0, 128, 12).tolist())
                for _ in range(6)]
    out = str(tmp_path / "corpus")
    corpus.build(lm.model, lm.params, examples, out, shard_size=4)
    path = str(tmp_path / "rest.safetensors")
    proc = subprocess.run([sys.executable, "-m", "experiments.build_rest_datastore",
                           "--model=tiny-gqa", f"--corpus_dir={out}", f"--output={path}",
                           "--max_tokens=60", "--sort_depth=8"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = load_datastore(path, lm.model.vocab_size)
    records = [p + r for p, r in examples][:3]  # whole records of 17 tokens until 60: 3
    sep = lm.model.vocab_size
    np.testing.assert_array_equal(store.tokens, np.concatenate([s + [sep] for s in records]))
    assert "build_rest_datastore" in store.meta["command"]
    drafter = RestDrafter(lm.model.vocab_size, num_candidates=4, num_nodes=4, draft_depth=4,
                          max_ngram=3, min_ngram=1)
    config = DecodeConfig(max_new_tokens=12)
    prompts = [records[0][:6], records[2][:4]]
    ref = kit.rows_of(generate(lm.model, lm.params, prompts, config))
    got = speculative_generate(lm.model, lm.params, drafter, drafter.params_of(store), prompts,
                               config)
    assert kit.rows_of(got) == ref
