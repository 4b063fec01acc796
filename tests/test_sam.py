"""SAM-Decoding: the device suffix automaton and its incremental match against brute force
(every prefix of random streams, rows of several lengths in one batch, rows independent, a
stream filling the capacity), the static automaton (build, matching, file round trip, damaged
files) against brute force, lossless decoding (greedy on the tiny model with no, a warm and an
adversarial static automaton; the exact sequence distribution under sampling) and the
build_sam_automaton binary end to end."""

import itertools
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import head_weights, registry
from drafters import suffix_automaton as sa
from drafters.sam import SamDrafter
from sequence_kit import SEQ_VOCAB, chi_square_pvalue, exact_joint, sample_sequences, seq_model
from specjax.decode import DecodeConfig, generate
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, speculative_generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = 48  # history slots of the automaton tests


# Brute force ----------------------------------------------------------------------------------


def _occurs_before(text, i, n):
    """End positions ``e < i`` of the occurrences of ``text[i-n+1 : i+1]`` in ``text[:i]``."""
    w = text[i - n + 1:i + 1]
    return [e for e in range(n - 1, i) if text[e - n + 1:e + 1] == w]


def _match(text, i):
    """``(n, first end)`` of the longest suffix of ``text[:i+1]`` that occurs ending before
    ``i`` (``(0, -1)`` when none)."""
    for n in range(i, 0, -1):
        ends = _occurs_before(text, i, n)
        if ends:
            return n, ends[0]
    return 0, -1


def _substrings(seqs, max_len):
    return {tuple(s[a:b]) for s in seqs for a in range(len(s))
            for b in range(a + 1, min(len(s), a + max_len) + 1)}


def _walks(trans, strings):
    """Which of ``strings`` a walk from the root accepts (``trans``: {(state, token): dest})."""
    out = {}
    for w in strings:
        v = sa.ROOT
        for c in w:
            v = trans.get((v, c))
            if v is None:
                break
        out[w] = v is not None
    return out


def _check_language(trans, seqs, vocab, max_len=None):
    """The automaton accepts every substring of ``seqs`` and, of every string up to 3 tokens,
    only those."""
    subs = _substrings(seqs, max_len or max(map(len, seqs)))
    assert all(_walks(trans, subs).values())
    short = [w for n in (1, 2, 3) for w in itertools.product(range(vocab), repeat=n)]
    assert _walks(trans, short) == {w: w in subs for w in short}


# The dynamic automaton --------------------------------------------------------------------------


def _streams(rng):
    """Rows of one batch: random small-vocabulary streams of several lengths, then the two that
    fill the capacity (``a b^(H-1)``: 2H - 1 states; ``a b^(H-2) c``: 3H - 4 transitions)."""
    rows = [rng.integers(0, v, n).tolist() for v, n in ((2, H), (3, 40), (4, 23), (5, 7), (3, 1))]
    return rows + [[0] + [1] * (H - 1), [0] + [1] * (H - 2) + [2]]


def _padded(rows):
    hist = np.zeros((len(rows), H), np.int32)
    for r, s in enumerate(rows):
        hist[r, :len(s)] = s
    return jnp.asarray(hist)


def _host(state, r):
    a = jax.tree.map(lambda x: np.asarray(x[r]), state.auto)
    ns, ne = int(a.num_states), int(a.num_edges)
    edges = {(int(s), int(t)): int(d) for s, t, d in zip(a.edge_src[:ne], a.edge_token[:ne],
                                                          a.edge_dest[:ne])}
    assert len(edges) == ne and (a.edge_src[ne:] == -1).all() and (a.length[ns:] == 0).all()
    return a, ns, edges


def test_dynamic_automaton_and_match_against_brute_force():
    drafter = SamDrafter(vocab_size=8, draft_len=5, min_match=2)
    rows = _streams(np.random.default_rng(0))
    hist = _padded(rows)
    lens = np.array([len(s) for s in rows])
    update = jax.jit(lambda s, n: drafter.update(None, s, hist, n))
    draft = jax.jit(lambda s, n: drafter.draft(None, s, hist, n))
    state = drafter.init(None, types.SimpleNamespace(history=hist), hist, None)
    for k in range(1, H + 1):
        stop = jnp.asarray(np.minimum(k, lens), jnp.int32)
        state = update(state, stop)
        tokens, valid = (np.asarray(x) for x in draft(state, stop))
        for r, s in enumerate(rows):
            n = min(k, len(s))
            text = s[:n]
            a, ns, edges = _host(state, r)
            length, link, firstpos, _, trans = sa._online_sam(text)  # the host construction
            assert a.length[:ns].tolist() == length and a.link[:ns].tolist() == link
            assert a.firstpos[:ns].tolist() == firstpos
            assert edges == {(v, c): d for v, t in enumerate(trans) for c, d in t.items()}
            m, first = _match(text, n - 1)
            assert int(state.match_len[r]) == m, (r, k)
            if m:
                assert a.firstpos[int(state.match_state[r])] == first
                assert a.length[a.link[int(state.match_state[r])]] < m <= a.length[
                    int(state.match_state[r])]  # the state holds the match
            want = [text[first + 1 + d % (n - 1 - first)] for d in range(5)] if m >= 2 else []
            assert valid[r].tolist() == [bool(want)] * 5
            assert tokens[r, :len(want)].tolist() == want
            if k in (7, 23, H) and n == k:
                _check_language(edges, [text], max(s) + 1)
    assert int(state.auto.num_states[5]) == 2 * H - 1 and int(state.auto.num_edges[6]) == 3 * H - 4
    # A row alone equals the same row in the batch.
    alone = jax.jit(lambda s: drafter.update(None, s, hist[2:3], jnp.asarray(lens[2:3])))(
        drafter.init(None, types.SimpleNamespace(history=hist[2:3]), hist[2:3], None))
    for got, want in zip(jax.tree.leaves(alone), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(got)[0], np.asarray(want)[2])


# The static automaton -------------------------------------------------------------------------


def _static_trans(arrays):
    off, tok, dst = arrays["offsets"], arrays["edge_token"], arrays["edge_dest"]
    return {(v, int(tok[e])): int(dst[e]) for v in range(len(off) - 1)
            for e in range(off[v], off[v + 1])}


def test_static_automaton_against_brute_force(tmp_path):
    vocab, cap = 4, 6
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, vocab, n).tolist() for n in (25, 1, 12, 30, 9)]
    arrays = sa.build_static(seqs, vocab, continuation_cap=cap)
    trans = _static_trans(arrays)
    _check_language(trans, seqs, vocab)
    flat = arrays["tokens"].tolist()
    assert flat == [t for s in seqs for t in s + [vocab]]
    # Each state's end position: an occurrence of its strings with the longest continuation
    # before the separator (capped), the earliest on ties.
    for w in _substrings(seqs, 6):
        v = sa.ROOT
        for c in w:
            v = trans[(v, c)]
        ends = [e for e in range(len(w) - 1, len(flat)) if tuple(flat[e - len(w) + 1:e + 1]) == w]
        cont = [min(flat.index(vocab, e) - e - 1, cap) for e in ends]
        assert arrays["firstpos"][v] == ends[int(np.argmax(cont))], w
    # Matching: the longest suffix of a query stream that occurs in one of the sequences.
    queries = np.stack([rng.integers(0, vocab, 40) for _ in range(3)]).astype(np.int32)
    dev = {k: jnp.asarray(v) for k, v in arrays.items()}

    def scan(row):
        def step(c, tok):
            c = sa.static_step(dev, c[0], c[1], tok, sa.search_steps(vocab))
            return c, c
        return jax.lax.scan(step, (jnp.int32(0), jnp.int32(0)), row)[1]
    states, lens = (np.asarray(x) for x in jax.jit(jax.vmap(scan))(jnp.asarray(queries)))
    subs = _substrings(seqs, 40)
    for q, row in enumerate(queries.tolist()):
        for i in range(len(row)):
            n = max([m for m in range(1, i + 2) if tuple(row[i - m + 1:i + 1]) in subs] or [0])
            assert lens[q, i] == n
            e = arrays["firstpos"][states[q, i]]
            assert n == 0 or flat[e - n + 1:e + 1] == row[i - n + 1:i + 1]
    # The file: compact dtypes, the same arrays back; damaged files refused with what to do.
    path = sa.save_static(str(tmp_path / "sam.safetensors"), arrays, vocab, source="test")
    from safetensors.numpy import load_file, save_file
    assert load_file(path)["edge_token"].dtype == np.uint16
    back = sa.load_static(path, vocab)
    for k in sa.STATIC_KEYS:
        np.testing.assert_array_equal(back[k], arrays[k])
        assert back[k].dtype == np.int32
    err = head_weights.HeadWeightsError
    with pytest.raises(err, match="built for a vocabulary of 4 tokens, the target has 5"):
        sa.load_static(path, 5)
    bad = dict(arrays, edge_dest=arrays["edge_dest"] + len(arrays["length"]))
    sa.save_static(str(tmp_path / "bad.safetensors"), bad, vocab)
    with pytest.raises(err, match="damaged suffix automaton .edge_dest is inconsistent"):
        sa.load_static(str(tmp_path / "bad.safetensors"), vocab)
    save_file({"table": np.zeros((4, 2), np.uint16)}, str(tmp_path / "other.safetensors"),
              metadata={"drafter": "token_recycling"})
    with pytest.raises(err, match="not a suffix automaton file .drafter 'token_recycling'"):
        sa.load_static(str(tmp_path / "other.safetensors"), vocab)
    kit.truncate_file(path)
    with pytest.raises(err, match="not a suffix automaton file"):
        sa.load_static(path, vocab)
    with pytest.raises(err, match="build_sam_automaton"):
        sa.load_static(str(tmp_path / "none.safetensors"), vocab)
    with pytest.raises(ValueError, match="at least one non-empty"):
        sa.build_static([[], []], vocab)
    with pytest.raises(ValueError, match=r"token ids must be in 0..3"):
        sa.build_static([[1, 4]], vocab)


def test_draft_takes_the_longer_match_at_least_its_minimum_long():
    vocab, k = 4, 3
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, vocab, 30).tolist() for _ in range(3)]
    arrays = sa.build_static(seqs, vocab, continuation_cap=8)
    dev = {key: jnp.asarray(v) for key, v in arrays.items()}
    flat, subs = arrays["tokens"].tolist(), _substrings(seqs, H)
    rows = [rng.integers(0, vocab, n).tolist() for n in (5, 9, 14, 20, 31, 40)]
    hist, lens = _padded(rows), jnp.asarray([len(r) for r in rows], jnp.int32)
    drafted = {"dynamic": 0, "static": 0, "none": 0}
    for static_min in (1, 3, 5):
        drafter = SamDrafter(vocab, draft_len=k, min_match=2, static_min_match=static_min)
        state = drafter.init(dev, types.SimpleNamespace(history=hist), hist, None)
        state = drafter.update(dev, state, hist, lens)
        tokens, valid = (np.asarray(x) for x in drafter.draft(dev, state, hist, lens))
        for r, text in enumerate(rows):
            n = len(text)
            m, first = _match(text, n - 1)
            sn = max([j for j in range(1, n + 1) if tuple(text[n - j:]) in subs] or [0])
            assert int(state.static_len[r]) == sn
            dyn, st = (m if m >= 2 else 0), (sn if sn >= static_min else 0)
            if max(dyn, st) == 0:
                want, kind = [], "none"
            elif dyn >= st:
                want, kind = [text[first + 1 + d % (n - 1 - first)] for d in range(k)], "dynamic"
            else:
                e = int(arrays["firstpos"][int(state.static_state[r])])
                assert flat[e - sn + 1:e + 1] == text[n - sn:]
                want, kind = flat[e + 1:flat.index(vocab, e + 1)][:k], "static"
            drafted[kind] += 1
            assert valid[r].tolist() == [d < len(want) for d in range(k)], (static_min, r)
            assert tokens[r, :len(want)].tolist() == want
    assert min(drafted.values()) > 0  # every branch was taken


# Lossless decoding ------------------------------------------------------------------------------


def _tau(out):
    return int(np.asarray(out.lengths).sum()) / int(out.stats.row_calls)


def test_greedy_equals_plain_decoding_without_warm_and_adversarial_static(target, reference):
    model, params = target
    config, rows = reference
    drafter = SamDrafter(model.vocab_size, draft_len=4, min_match=2, static_min_match=2)
    rng = np.random.default_rng(2)
    seen = sorted({t for p in kit.PROMPTS for t in p})  # adversarial: matches, wrong drafts
    statics = {"none": None,
               "warm": sa.build_static([p + r for p, r in zip(kit.PROMPTS, rows)],
                                       model.vocab_size),
               "random": sa.build_static([rng.choice(seen, 200).tolist(),
                                          rng.integers(0, model.vocab_size, 300).tolist()],
                                         model.vocab_size)}
    tau = {}
    for name, arrays in statics.items():
        dparams = None if arrays is None else {k: jnp.asarray(v) for k, v in arrays.items()}
        out = speculative_generate(model, params, drafter, dparams, kit.PROMPTS, config)
        assert kit.rows_of(out) == rows, name
        tau[name] = _tau(out)
    # Drafted from the very answers, the static automaton is accepted far more often.
    assert tau["warm"] > 2.5 and tau["warm"] > 1.5 * tau["random"]


def test_the_texts_own_repeats_are_drafted(target, reference):
    """Dynamic only, on a target without attention (its next token a function of the last one:
    greedy text falls into a cycle): the automaton drafts the cycle from the text itself."""
    model, params = target
    config, _ = reference
    layers = dict(params["layers"], wo=jnp.zeros_like(params["layers"]["wo"]))
    params = dict(params, layers=layers)
    # Prompts ending in the target's own text (the last 16 tokens: the same prompt bucket as
    # the lossless test's, so the same program), which already went round its cycle.
    prompts = [(p + r)[-16:] for p, r in zip(kit.PROMPTS, kit.rows_of(
        generate(model, params, kit.PROMPTS, config)))]
    rows = kit.rows_of(generate(model, params, prompts, config))
    out = speculative_generate(model, params, SamDrafter(model.vocab_size, draft_len=4), None,
                               prompts, config)
    assert kit.rows_of(out) == rows
    assert _tau(out) > 3.0


def test_sequence_distribution_is_exact():
    sampling = SamplingConfig(temperature=1.0)
    model, params = seq_model()
    drafter = SamDrafter(SEQ_VOCAB, draft_len=3, min_match=1, static_min_match=1)
    rng = np.random.default_rng(3)
    arrays = sa.build_static([rng.integers(0, SEQ_VOCAB, 60).tolist() for _ in range(3)],
                             SEQ_VOCAB)
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter,
                                     {k: jnp.asarray(v) for k, v in arrays.items()}, sampling,
                                     SpecConfig(), rows=2048)  # 6144 samples, 512 sequences
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3


# The binary and the method ----------------------------------------------------------------------


def test_binary_builds_an_automaton_that_decodes_losslessly(tmp_path):
    from drafters import corpus
    from models import registry as models
    lm = models.load("tiny-gqa")
    examples = [(p, r) for p, r in zip(kit.PROMPTS, [[3, 9, 27, 81, 5] * 3, [6, 6, 6], [1, 2],
                                                       [100]])]
    out = str(tmp_path / "corpus")
    corpus.build(lm.model, lm.params, examples, out, layers=(0,), shard_size=2)
    path = str(tmp_path / "sam.safetensors")
    proc = subprocess.run([sys.executable, "-m", "experiments.build_sam_automaton",
                           "--model=tiny-gqa", f"--corpus_dir={out}", f"--output={path}",
                           "--max_tokens=18"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "18 response tokens of 2 records" in proc.stderr
    arrays = sa.load_static(path, lm.model.vocab_size)
    sep = lm.model.vocab_size
    assert arrays["tokens"].tolist() == [3, 9, 27, 81, 5] * 3 + [sep, 6, 6, 6, sep]
    method = registry.get("sam")
    with pytest.raises(ValueError, match="static_path is set but static=none"):
        method.build(registry.BuildContext(lm, SamplingConfig()),
                     method.make_options(static="none", static_path=path))
    drafter, dparams = registry.build("sam", lm, static_path=path)
    assert dparams["tokens"].shape == (20,)
    assert registry.build("sam", lm)[1] is None  # nothing shipped for tiny-gqa: dynamic only
    prompts = [[3, 9, 27], [4, 6, 6]]
    config = DecodeConfig(max_new_tokens=12)
    ref = kit.rows_of(generate(lm.model, lm.params, prompts, config))
    got = speculative_generate(lm.model, lm.params, drafter, dparams, prompts, config)
    assert kit.rows_of(got) == ref
