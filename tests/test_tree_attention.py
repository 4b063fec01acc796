"""The Pallas tree-attention kernel equals its reference, which equals naive softmax attention.

The kernel runs in Pallas interpret mode on the CPU. Interpret mode fills every output buffer with
NaN before the kernel runs, so a block the kernel forgets to write shows up as NaN (poisoned
outputs, checked on the raw per-split results too). The cache slots at and beyond
``lengths + T`` are poisoned with NaN for the kernel while the reference sees zeros there: the
kernel must never let them leak. Every case draws fresh random inputs from its own seed.

Tolerances: float32 inputs agree to 2e-5 (only summation order differs); bfloat16 inputs to 2e-2
absolute + relative (the kernel rounds unnormalised probabilities to bf16 before the PV product,
the reference normalised ones, and the outputs are rounded to bf16: a few bf16 ulps of values of
order 1).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels
from specjax import masks
from specjax.kernels import tree_attention as ta

TOL = {"float32": 2e-5, "bfloat16": 2e-2}


# ----------------------------------------------------------------------------- inputs

def _ancestors(parents, valid):
    """``bool[T, T]`` ancestor-or-self visibility; invalid nodes see only themselves."""
    t = len(parents)
    vis = np.eye(t, dtype=bool)
    for n in range(1, t):
        if valid[n] and valid[parents[n]]:
            vis[n] |= vis[parents[n]]
    return vis


def _visible(kind, batch, t, rng):
    """``bool[B, T, T]``: chain, branching tree, tree with padding nodes, arbitrary, or none."""
    rows = []
    for _ in range(batch):
        if kind == "chain":
            rows.append(np.tril(np.ones((t, t), bool)))
            continue
        parents = np.array([-1] + [int(rng.integers(0, n)) for n in range(1, t)])
        valid = np.ones(t, bool)
        if kind == "padded":
            valid[rng.random(t) < 0.4] = False
            valid[0] = True
        if kind == "random":  # lookahead-style: any pattern, each node sees itself
            rows.append((rng.random((t, t)) < 0.5) | np.eye(t, dtype=bool))
        elif kind == "blind":  # node 0 sees nothing at all (tests the zero-output rule)
            vis = _ancestors(parents, valid)
            vis[0, 0] = False
            rows.append(vis)
        else:
            rows.append(_ancestors(parents, valid))
    return np.stack(rows)


def _inputs(case, seed):
    """Random q / caches (clean and NaN-poisoned beyond ``lengths + T``), lengths, visible."""
    rng = np.random.default_rng(seed)
    b, t, h, kv, d, s = case["B"], case["T"], case["H"], case["K"], case["D"], case["S"]
    dtype = jnp.dtype(case["dtype"])
    q = rng.standard_normal((b, t, h, d))
    k = rng.standard_normal((b, kv, s, d))
    v = rng.standard_normal((b, kv, s, d))
    lengths = np.asarray(case["lengths"], np.int32)
    beyond = np.arange(s)[None, :] >= (lengths + t)[:, None]  # [B, S] never visible
    poison = beyond[:, None, :, None]
    k, v = np.where(poison, 0.0, k), np.where(poison, 0.0, v)
    k_bad = np.where(poison, np.nan, k)
    v_bad = np.where(poison, np.nan, v)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    visible = _visible(case["tree"], b, t, rng)
    return (cast(q), cast(k), cast(v), cast(k_bad), cast(v_bad), jnp.asarray(lengths),
            jnp.asarray(visible))


def _naive(q, k, v, lengths, visible):
    """float64 numpy: per row, head and node, softmax over the visible slots (zeros if none)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    out = np.zeros((b, t, h, d))
    for i in range(b):
        n = int(lengths[i])
        for head in range(h):
            kh = head // (h // kv)
            for node in range(t):
                keys = [slot for slot in range(s) if slot < n or
                        (0 <= slot - n < t and visible[i, node, slot - n])]
                if not keys:
                    continue
                scores = np.array([q[i, node, head] @ k[i, kh, slot] for slot in keys])
                w = np.exp(scores / np.sqrt(d) - np.max(scores / np.sqrt(d)))
                out[i, node, head] = (w / w.sum()) @ v[i, kh, keys]
    return out


# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_naive_softmax(seed):
    rng = np.random.default_rng(100 + seed)
    b, t, kv, g, d, s = 3, int(rng.integers(1, 6)), int(rng.integers(1, 3)), 2, 8, 12
    case = dict(B=b, T=t, H=kv * g, K=kv, D=d, S=s, dtype="float32",
                tree=["chain", "padded", "blind"][seed],
                lengths=[0, s, int(rng.integers(0, s))])  # empty, full (no room), ragged
    q, k, v, _, _, lengths, visible = _inputs(case, seed)
    got = np.asarray(ta.tree_attention_reference(q, k, v, lengths, visible))
    np.testing.assert_allclose(got, _naive(q, k, v, lengths, np.asarray(visible)),
                               atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- kernel

CASES = [
    # decode-like: one node, empty cache, multi-head
    dict(B=1, T=1, H=4, K=4, D=32, S=16, lengths=[0], tree="chain", dtype="float32"),
    # MQA, a full cache (lengths + T == S), several blocks and splits
    dict(B=2, T=4, H=4, K=1, D=32, S=32, lengths=[0, 28], tree="chain", dtype="float32",
         block_k=8, splits=2),
    # GQA, branching tree, nodes running past the cache end (47 + 6 > 48), 3 splits
    dict(B=3, T=6, H=8, K=2, D=64, S=48, lengths=[47, 5, 20], tree="tree", dtype="float32",
         block_k=16, splits=3),
    # padded tree, S not a multiple of block_k (the wrapper pads the cache), bf16
    dict(B=2, T=7, H=6, K=3, D=32, S=40, lengths=[33, 0], tree="padded", dtype="bfloat16",
         block_k=16),
    # arbitrary visibility, several row blocks (block_r < T * G)
    dict(B=1, T=8, H=4, K=2, D=64, S=64, lengths=[56], tree="random", dtype="float32",
         block_k=16, block_r=8, splits=2),
    # lengths == S: no node fits; a query that sees nothing in a row of length 0
    dict(B=3, T=5, H=2, K=2, D=32, S=24, lengths=[24, 0, 10], tree="blind", dtype="bfloat16",
         block_k=8),
    # default block sizes, a 16-node tree, MHA
    dict(B=1, T=16, H=8, K=8, D=64, S=128, lengths=[100], tree="tree", dtype="float32"),
    # the Triton tiling (pow-2 >= 16 tiles) and the Mosaic TPU call, in interpret mode
    dict(B=2, T=5, H=4, K=2, D=32, S=64, lengths=[60, 3], tree="tree", dtype="float32",
         layout="gpu", block_k=16, splits=3),
    dict(B=2, T=3, H=4, K=1, D=64, S=48, lengths=[0, 40], tree="padded", dtype="bfloat16",
         layout="tpu", block_k=16, splits=3),
]


def _case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items() if k not in ("lengths",))


def _sizes(case):
    return ta.BlockSizes(block_r=case.get("block_r", 0), block_k=case.get("block_k", 0),
                         num_splits=case.get("splits", 0))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case):
    seed = zlib.crc32(_case_id(case).encode())
    q, k, v, k_bad, v_bad, lengths, visible = _inputs(case, seed)
    want = ta.tree_attention_reference(q, k, v, lengths, visible)
    got = ta.tree_attention(q, k_bad, v_bad, lengths, visible, impl="pallas", interpret=True,
                            block_sizes=_sizes(case), layout=case.get("layout"))
    assert got.shape == q.shape and got.dtype == q.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), "NaN from a poisoned output block or cache slot"
    tol = TOL[case["dtype"]]
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=f"seed {seed}")
    if case["tree"] == "blind":
        assert (got[1, 0] == 0).all()  # row 1 has lengths 0 and node 0 sees nothing


def test_every_split_block_is_written():
    """Raw per-split outputs: no NaN left from the poisoned buffers, splits past ``lengths``
    report an empty softmax (l = 0) and a zero output."""
    case = dict(B=2, T=3, H=2, K=1, D=32, S=64, lengths=[5, 64], tree="chain", dtype="float32")
    q, _, _, k_bad, v_bad, lengths, visible = _inputs(case, 7)
    p = ta.plan("interpret", 2, 1, 3, 2, 64, ta.BlockSizes(block_k=8, num_splits=4))
    kn = jnp.zeros((2, 1, p.nodes, 32))
    qr = jnp.pad(q.reshape(2, 3, 1, 2, 32).transpose(0, 2, 1, 3, 4).reshape(2, 1, 6, 32),
                 ((0, 0), (0, 0), (0, p.rows - 6), (0, 0)))
    vis = jnp.zeros((2, p.rows, p.nodes), jnp.int32)
    o, m, l = ta.call_generic(lengths, qr, k_bad, v_bad, kn, kn, vis, p, ta.BlockSizes(),
                              0.1, interpret=True, backend="interpret")
    for x in (o, m, l):
        assert np.isfinite(np.asarray(x)).all()
    # row 0 (length 5) has committed slots in split 0 only
    assert (np.asarray(l)[0, :, 1:] == 0).all() and (np.asarray(o)[0, :, 1:] == 0).all()
    assert (np.asarray(l)[0, :, 0, :6] > 0).all() and (np.asarray(l)[1] > 0).all()


def test_plan_tiles_fit_the_backends():
    gpu = ta.plan("gpu", 1, 8, 64, 4, 32768)
    assert gpu.nodes == 64 and gpu.block_r == 64 and gpu.rows == 256
    assert gpu.padded_slots == 32768 and gpu.split_size % gpu.block_k == 0
    assert ta.plan("gpu", 1, 2, 3, 1, 100).nodes == 16  # Triton dots need >= 16
    tpu = ta.plan("tpu", 1, 8, 64, 4, 32768)
    assert tpu.split_size == 2048 and tpu.num_splits == 16 and tpu.rows % 8 == 0
    with pytest.raises(ValueError, match="power of two"):
        ta.plan("gpu", 1, 1, 4, 1, 64, ta.BlockSizes(block_k=24))


def test_bad_input_is_rejected():
    q = jnp.zeros((2, 3, 4, 8))
    kv = jnp.zeros((2, 2, 16, 8))
    lengths = jnp.zeros((2,), jnp.int32)
    vis = jnp.ones((3, 3), bool)
    with pytest.raises(ValueError, match="impl must be"):
        ta.tree_attention(q, kv, kv, lengths, vis, impl="cuda")
    with pytest.raises(ValueError, match="visible must be"):
        ta.tree_attention(q, kv, kv, lengths, jnp.ones((4, 4), bool))
    with pytest.raises(ValueError, match="multiple of K"):
        ta.tree_attention(jnp.zeros((2, 3, 3, 8)), kv, kv, lengths, vis)
    with pytest.raises(ValueError, match="cannot be compiled"):
        ta.tree_attention(q, kv, kv, lengths, vis, impl="pallas", interpret=False, layout="tpu")


def test_auto_is_the_reference_on_cpu():
    case = dict(B=2, T=3, H=4, K=2, D=16, S=20, lengths=[4, 17], tree="tree", dtype="float32")
    q, k, v, _, _, lengths, visible = _inputs(case, 3)
    np.testing.assert_array_equal(ta.tree_attention(q, k, v, lengths, visible),
                                  ta.tree_attention_reference(q, k, v, lengths, visible))


# ----------------------------------------------------------------------------- module layout

def _kernel_imports():
    """``{module: the kernel modules it imports}`` for every module under ``specjax/kernels``,
    read from the source (imports inside functions count; relative imports are resolved)."""
    root = pathlib.Path(ta.__file__).parent.parent  # specjax/kernels
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_kernel_imports_run_one_way():
    """API package -> backends -> body: the body imports no kernel module, each backend only
    the body, and no kernel module imports the API package back (so no cycle)."""
    api = "specjax.kernels.tree_attention"
    body, backends = f"{api}.body", {f"{api}.generic", f"{api}.tpu"}
    graph = _kernel_imports()
    cpu = {m for m in graph if m.startswith("specjax.kernels.cpu_matmul")}  # the CPU matmul
    assert all(not (graph[m] - cpu) for m in cpu), "the CPU kernel imports no attention module"
    graph = {m: deps for m, deps in graph.items() if m not in cpu}
    assert set(graph) == {"specjax.kernels", api, body, *backends}, "place new modules here"
    assert graph[body] == set()
    for backend in backends:
        assert graph[backend] == {body}, backend
    assert graph[api] == {body, *backends}
    assert graph["specjax.kernels"] == set()  # hence nothing imports the API back


# ----------------------------------------------------------------------------- TreeMask + model

def test_tree_mask_dense_is_block_mask():
    rng = np.random.default_rng(5)
    lengths = np.array([0, 7, 12], np.int32)
    for visible in (rng.random((4, 4)) < 0.5, rng.random((3, 4, 4)) < 0.5):
        tm = masks.TreeMask.create(lengths, visible, 12)
        np.testing.assert_array_equal(tm.dense(), masks.block_mask(lengths, visible, 12))
        np.testing.assert_array_equal(tm.first(1).dense(),
                                      masks.block_mask(lengths, np.asarray(tm.visible)[:, :1, :1],
                                                       12))
    with pytest.raises(ValueError, match="visible must be"):
        masks.TreeMask.create(lengths, np.ones((2, 4, 4), bool), 12)


def _prefilled(model, params, prompt_lengths, num_slots, rng):
    """A cache holding random prompts of the given lengths (dense causal prefill)."""
    b, p = len(prompt_lengths), max(prompt_lengths)
    tokens = jnp.asarray(rng.integers(0, model.vocab_size, (b, p)), jnp.int32)
    cache = model.init_cache(b, num_slots)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out = tinymodels.forward(model, params, tokens, positions, cache,
                             masks.causal_mask(cache.lengths, p, num_slots))
    return out.cache.replace(lengths=jnp.asarray(prompt_lengths, jnp.int32))


@pytest.mark.parametrize("kind", ["gqa"])
def test_model_with_kernel_equals_dense_forward(kind):
    """Prefill from an empty cache and a speculative-verify-shaped tree forward over ragged
    rows: the kernel path (TreeMask, attention_impl='pallas', interpret) gives the dense path's
    logits and cache; the XLA path under a TreeMask is bit-identical to the dense mask."""
    model, params = tinymodels.tiny_model(kind)
    kernel_model = dataclasses.replace(
        model, config=dataclasses.replace(model.config, attention_impl="pallas"))
    rng = np.random.default_rng(11)
    num_slots = 24

    # prefill-shaped: lengths 0, causal block over 6 new tokens
    tokens = jnp.asarray(rng.integers(0, model.vocab_size, (2, 6)), jnp.int32)
    cache = model.init_cache(2, num_slots)
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    dense = masks.causal_mask(cache.lengths, 6, num_slots)
    tree = masks.TreeMask.create(cache.lengths, masks.causal_block(6), num_slots)
    want = tinymodels.forward(model, params, tokens, pos, cache, dense)
    got = tinymodels.forward(kernel_model, params, tokens, pos, cache, tree)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-5)

    # verify-shaped: rows of committed length 5 and 13, a 7-node tree with a padding node
    cache = _prefilled(model, params, [5, 13], num_slots, rng)
    parents = np.array([-1, 0, 0, 1, 1, 2, 3])
    valid = np.array([True, True, True, True, False, True, True])
    visible = np.stack([_ancestors(parents, valid), np.tril(np.ones((7, 7), bool))])
    depth = np.array([[0, 1, 1, 2, 2, 2, 3], [0, 1, 2, 3, 4, 5, 6]], np.int32)
    tokens = jnp.asarray(rng.integers(0, model.vocab_size, (2, 7)), jnp.int32)
    pos = cache.lengths[:, None] + jnp.asarray(depth)
    tree = masks.TreeMask.create(cache.lengths, visible, num_slots)
    want = tinymodels.forward(model, params, tokens, pos, cache, tree.dense())
    got = tinymodels.forward(kernel_model, params, tokens, pos, cache, tree)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(np.argmax(got.logits, -1), np.argmax(want.logits, -1))
    np.testing.assert_allclose(got.cache.k, want.cache.k, atol=1e-5)
    xla = tinymodels.forward(model, params, tokens, pos, cache, tree)
    np.testing.assert_array_equal(xla.logits, want.logits)

    # the root-only forward of a round with no draft
    got = tinymodels.forward(kernel_model, params, tokens[:, :1], pos[:, :1], cache,
                             tree.first(1))
    want = tinymodels.forward(model, params, tokens[:, :1], pos[:, :1], cache,
                              tree.dense()[:, :1])
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-5)


def test_model_rejects_a_mismatched_tree_mask():
    model, params = tinymodels.tiny_model("gqa")
    cache = model.init_cache(1, 16)
    tree = masks.TreeMask.create(cache.lengths, masks.causal_block(3), 12)
    with pytest.raises(ValueError, match="does not fit"):
        model.forward(params, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32),
                      cache, tree)
    with pytest.raises(ValueError, match="attention_impl"):
        tinymodels.tiny_config("gqa", attention_impl="triton")


def test_decoding_loops_on_the_kernel_equal_plain_decoding():
    """Plain and speculative decoding (prompt-lookup tree with narrow verify widths, and a
    draft model) with attention_impl='pallas' (interpret) give exactly the tokens of plain
    greedy decoding on the XLA path, ragged batch."""
    from drafters.draft_model import DraftModelDrafter, from_target_layers
    from drafters.prompt_lookup import PromptLookupDrafter
    from specjax.decode import DecodeConfig, generate
    from specjax.speculative import speculative_generate

    model, params = tinymodels.tiny_model("gqa")
    kernel_model = dataclasses.replace(
        model, config=dataclasses.replace(model.config, attention_impl="pallas"))
    prompts = [[1, 2, 3, 1, 2], [4, 5, 6, 7, 8, 9, 10, 4, 5, 6], [11]]
    config = DecodeConfig(max_new_tokens=10)
    want = np.asarray(generate(model, params, prompts, config).tokens)
    np.testing.assert_array_equal(np.asarray(generate(kernel_model, params, prompts,
                                                      config).tokens), want)
    lookup = PromptLookupDrafter(draft_len=3, num_branches=2)
    got = speculative_generate(kernel_model, params, lookup, None, prompts, config)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)
    small, small_params = from_target_layers(kernel_model, params, 1)
    got = speculative_generate(kernel_model, params, DraftModelDrafter(small, 2), small_params,
                               prompts, config)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)
