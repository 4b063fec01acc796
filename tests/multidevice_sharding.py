"""Sharded decoding on 8 fake CPU devices: exact tokens, real shardings, sharded restore.

Run by ``tests/test_sharding.py`` in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the file name keeps pytest's default
discovery away from it, so every other test keeps one device); skipped with fewer than 8
devices. By hand::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/multidevice_sharding.py

(``test_sharding.py`` adds XLA CPU flags that only make compilation faster.)

The model has 8 query heads, 4 kv heads, MLP 128, vocabulary 128: on ``1x8`` the kv heads split
4 ways and are replicated over a ``group`` axis of 2, on ``2x4`` they split 4 ways, on ``8x1``
only the batch (8 rows) is split.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import tinymodels
from drafters import draft_model, medusa, prompt_lookup
from specjax import checkpoint, decode, sharding, speculative
from specjax.decode import DecodeConfig
from specjax.sampling import SamplingConfig

if jax.device_count() < 8:
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
                allow_module_level=True)

MESHES = [(1, 8), (2, 4), (8, 1)]
MESH_IDS = [f"{d}x{m}" for d, m in MESHES]
CONFIG = DecodeConfig(max_new_tokens=14)
TP = ("model", "group")


def _model():
    return tinymodels.tiny_model("llama", num_heads=8, num_kv_heads=4, num_layers=2)


def _prompts():
    # Eight rows of different lengths, with repeats so prompt lookup finds matches.
    base = [5, 17, 33, 5, 17, 40, 5, 17, 33, 9, 21, 5, 17]
    return [[(t + 7 * r) % 128 for t in base[: 5 + r]] for r in range(8)]


def _plan(data, model):
    return sharding.plan_for_config(data, model, _model()[0].config)


def _medusa(model):
    drafter = medusa.MedusaDrafter.create(model, num_heads=3)
    params = drafter.init_params(jax.random.key(1))
    rng = np.random.default_rng(3)  # the blocks start at zero: make them do something
    params = jax.tree.map(lambda w: np.asarray(w) + 0.3 * rng.standard_normal(w.shape), params)
    return drafter, jax.tree.map(lambda w: np.asarray(w, np.float32), params)


def _drafters(model, params):
    """``{name: (drafter, drafter params)}`` built from (sharded or plain) target params."""
    small, small_params = draft_model.from_target_layers(model, params, 1)
    return {
        "draft_model": (draft_model.DraftModelDrafter(small, draft_len=3), small_params),
        "prompt_lookup": (prompt_lookup.PromptLookupDrafter(draft_len=4), None),
        "medusa_tree": _medusa(model),
    }


_REFERENCE: dict = {}


def _reference(name):
    """Single-device tokens (computed once per method)."""
    if name not in _REFERENCE:
        model, params = _model()
        if name == "plain":
            out = decode.generate(model, params, _prompts(), CONFIG)
        else:
            drafter, dparams = _drafters(model, params)[name]
            out = speculative.speculative_generate(model, params, drafter, dparams, _prompts(),
                                                   CONFIG)
        _REFERENCE[name] = np.asarray(out.tokens)
    return _REFERENCE[name]


def _expected_param_specs(plan):
    """What the default rules must give on this model (kv heads always on ``model``)."""
    kv = P(None, None, "model", None)
    specs = {"wq": P(None, None, TP, None), "wk": kv, "wv": kv, "wo": P(None, TP, None, None),
             "w_gate": P(None, None, TP), "w_up": P(None, None, TP), "w_down": P(None, TP, None),
             "attn_norm": P(None, None), "mlp_norm": P(None, None)}
    return {"layers": specs, "embedder": {"embedding": P(TP, None)},
            "final_norm": P(None), "lm_head": P(None, TP)}


@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_params_are_sharded_as_declared(mesh):
    model, params = _model()
    plan = _plan(*mesh)
    placed = plan.shard_params(params, model.logical_axes())
    expected = _expected_param_specs(plan)
    sizes = dict(plan.mesh.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(placed)[0]:
        spec = expected
        for k in path:
            spec = spec[k.key]
        _assert_sharding(leaf, plan, spec)
        # The shards really are split: each device holds global / (product of its mesh axes).
        for dim, axes in enumerate(spec):
            parts = int(np.prod([sizes[a] for a in _mesh_axis_names(axes)]))
            assert leaf.addressable_shards[0].data.shape[dim] == leaf.shape[dim] // parts
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_get(params, path)))


def _mesh_axis_names(axes):
    """A PartitionSpec entry (None, one mesh axis, or a tuple of them) as a tuple of names."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_cache_and_state_are_sharded_as_declared(mesh):
    model, params = _model()
    plan = _plan(*mesh)
    placed = plan.shard_params(params, model.logical_axes())
    batch = decode.prepare_batch(_prompts(), model.vocab_size, plan)
    slots = CONFIG.slots_for(batch.tokens.shape[1])
    loop = decode.DecodeLoop(model, CONFIG, plan)
    state = loop.jit_start(placed, batch, jax.random.key(0), slots)
    state = loop.jit_step(placed, state)
    data, _ = plan.shape
    kv_parts = plan.mesh.shape["model"]
    for kv in (state.cache.k, state.cache.v):
        _assert_sharding(kv, plan, P(None, "data", "model", None, None))
        l, b, k, s, d = kv.shape
        assert kv.addressable_shards[0].data.shape == (l, b // data, k // kv_parts, s, d)
    for rows in (state.cache.lengths, state.pending, state.out_tokens, state.done):
        _assert_sharding(rows, plan, P("data"))
        assert rows.addressable_shards[0].data.shape[0] == rows.shape[0] // data



def test_speculative_state_and_drafter_params_are_sharded_as_declared():
    model, params = _model()
    plan = _plan(1, 8)  # kv heads on `model` (4), replicated over `group` (2)
    placed = plan.shard_params(params, model.logical_axes())
    drafter, dparams = _drafters(model, placed)["medusa_tree"]
    dparams = sharding.shard_drafter_params(plan, dparams)
    for leaf in jax.tree.leaves(dparams):
        assert leaf.sharding.is_fully_replicated and leaf.sharding.mesh == plan.mesh
    drafter = prompt_lookup.PromptLookupDrafter(draft_len=4)
    loop = speculative.SpecLoop(model, drafter, CONFIG, speculative.SpecConfig(), plan)
    batch, slots = loop.prepare(_prompts())
    state = loop.jit_start(placed, None, batch, jax.random.key(0), slots)
    state = loop.jit_round(placed, None, state)
    _assert_sharding(state.cache.k, plan, P(None, "data", "model", None, None))
    assert state.cache.k.addressable_shards[0].data.shape[2] == 1  # 4 kv heads / 4
    for rows in (state.history, state.pending_hidden, state.out_tokens, state.cache.lengths):
        _assert_sharding(rows, plan, P("data"))


def _assert_sharding(x, plan, spec):
    """``x`` is placed on the plan's devices exactly as ``spec`` says (jit may print an
    equivalent spec differently, e.g. without axes of size 1)."""
    want = jax.sharding.NamedSharding(plan.mesh, spec)
    assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)


def _collective_shapes(hlo_text):
    """Result shapes of every cross-device data movement in compiled HLO."""
    ops = r"(?:all-gather|all-to-all|collective-permute|all-gather-start)"
    return {tuple(int(x) for x in m.group(1).split(",") if x)
            for m in re.finditer(r"= \(?[a-z0-9]+\[([0-9,]*)\][^=]*? " + ops + r"\(", hlo_text)}


def _assert_no_weight_movement(hlo_text, params, cache_shape):
    moved = _collective_shapes(hlo_text)
    weights = {tuple(w.shape) for w in jax.tree.leaves(params) if w.ndim >= 2}
    assert not (moved & weights), f"weights moved between devices: {moved & weights}"
    assert cache_shape not in moved, "the whole KV cache moved between devices"


@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_plain_decoding_exact_and_weights_stay_put(mesh):
    model, params = _model()
    plan = _plan(*mesh)
    placed = plan.shard_params(params, model.logical_axes())
    before = jax.tree.map(lambda w: w.sharding, placed)
    out = decode.generate(model, placed, _prompts(), CONFIG, plan=plan)
    np.testing.assert_array_equal(np.asarray(out.tokens), _reference("plain"))
    assert jax.tree.map(lambda w: w.sharding, placed) == before
    assert out.tokens.sharding.is_fully_replicated  # readable on every host
    # The compiled loop moves no weight and never the whole cache between devices.
    batch = decode.prepare_batch(_prompts(), model.vocab_size, plan)
    slots = CONFIG.slots_for(batch.tokens.shape[1])
    compiled = decode.DecodeLoop(model, CONFIG, plan).lower_run(
        placed, batch, jax.random.key(0), slots).compile()
    assert compiled.input_shardings[0][0] == jax.tree.map(lambda w: w.sharding, placed)
    c = model.config
    cache_shape = (c.num_layers, 8, c.num_kv_heads, slots, c.head_dim)
    _assert_no_weight_movement(compiled.as_text(), params, cache_shape)


@pytest.mark.parametrize("method", ["draft_model", "prompt_lookup", "medusa_tree"])
@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_speculative_decoding_exact(mesh, method):
    model, params = _model()
    plan = _plan(*mesh)
    placed = plan.shard_params(params, model.logical_axes())
    drafter, dparams = _drafters(model, placed)[method]
    if method == "medusa_tree":
        dparams = sharding.shard_drafter_params(plan, dparams)
    out = speculative.speculative_generate(model, placed, drafter, dparams, _prompts(), CONFIG,
                                           plan=plan)
    np.testing.assert_array_equal(np.asarray(out.tokens), _reference(method))
    assert out.stats.accepted > 0 or method == "medusa_tree"  # the drafts were really used


def test_speculative_loop_moves_no_weights():
    model, params = _model()
    plan = _plan(2, 4)
    placed = plan.shard_params(params, model.logical_axes())
    drafter, dparams = _drafters(model, placed)["draft_model"]
    loop = speculative.SpecLoop(model, drafter, CONFIG, speculative.SpecConfig(), plan)
    batch, slots = loop.prepare(_prompts())
    compiled = loop.lower_run(placed, dparams, batch, jax.random.key(0), slots).compile()
    c = model.config
    _assert_no_weight_movement(compiled.as_text(), params,
                               (c.num_layers, 8, c.num_kv_heads, slots, c.head_dim))


def test_lookahead_and_stream_exact_on_2x4():
    from drafters import lookahead
    model, params = _model()
    plan = _plan(2, 4)
    placed = plan.shard_params(params, model.logical_axes())
    drafter, dparams = lookahead.make(model, window=3, ngram=3, guess_set=2)
    out = speculative.speculative_generate(model, placed, drafter, dparams, _prompts(), CONFIG,
                                           plan=plan)
    np.testing.assert_array_equal(np.asarray(out.tokens), _reference("plain"))
    ref = _reference("plain")
    got = [[] for _ in range(ref.shape[0])]
    for tokens, emitted in decode.stream(model, placed, _prompts(), CONFIG, plan=plan):
        for row in np.nonzero(emitted)[0]:
            got[row].append(int(tokens[row]))
    for row, tokens in enumerate(got):
        assert tokens == [t for t in ref[row] if t >= 0]


def test_sampled_decoding_same_tokens_on_2x4():
    model, params = _model()
    plan = _plan(2, 4)
    placed = plan.shard_params(params, model.logical_axes())
    config = DecodeConfig(max_new_tokens=10, sampling=SamplingConfig(temperature=1.0))
    key = jax.random.key(7)
    ref = decode.generate(model, params, _prompts(), config, key=key)
    out = decode.generate(model, placed, _prompts(), config, key=key, plan=plan)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_checkpoint_restores_into_sharded_arrays(tmp_path):
    model, params = _model()
    path = checkpoint.save(tmp_path / "ckpt", params)
    plan = _plan(2, 4)
    shardings = plan.tree_shardings(model.logical_axes())
    for like in (jax.eval_shape(model.init, jax.random.key(0)), None):
        restored = checkpoint.restore(path, like=like, shardings=shardings)
        flat = jax.tree_util.tree_flatten_with_path(restored)[0]
        for (p, leaf), want in zip(flat, jax.tree.leaves(shardings)):
            assert leaf.sharding == want, jax.tree_util.keystr(p)
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(_get(params, p)))
    # The restored params decode exactly like the originals.
    out = decode.generate(model, restored, _prompts(), CONFIG, plan=plan)
    np.testing.assert_array_equal(np.asarray(out.tokens), _reference("plain"))
    abstract = plan.abstract_params(jax.eval_shape(model.init, jax.random.key(0)),
                                    model.logical_axes())
    again = checkpoint.restore(path, like=abstract)
    assert jax.tree.map(lambda w: w.sharding, again) == shardings


def test_bad_meshes_and_batches_raise_clear_errors():
    model, params = _model()
    with pytest.raises(ValueError, match="needs 16 devices but only 8"):
        _plan(2, 8)
    with pytest.raises(ValueError, match="does not divide the 8 query heads"):
        _plan(1, 3)
    with pytest.raises(ValueError, match="does not divide the 4 query heads"):
        sharding.plan_for_config(1, 8, tinymodels.tiny_config("llama"))
    with pytest.raises(ValueError, match="MLP width 102"):
        sharding.plan_for_config(1, 4, tinymodels.tiny_config("llama", intermediate_size=102))
    plan = _plan(2, 4)
    placed = plan.shard_params(params, model.logical_axes())
    with pytest.raises(ValueError, match="batch of 3 rows does not split over the mesh's data "
                                         "axis of size 2"):
        decode.generate(model, placed, _prompts()[:3], CONFIG, plan=plan)
    drafter = prompt_lookup.PromptLookupDrafter(draft_len=4)
    with pytest.raises(ValueError, match="pad the batch to a multiple of 2"):
        speculative.speculative_generate(model, placed, drafter, None, _prompts()[:3], CONFIG,
                                         plan=plan)


def test_kv_heads_fewer_than_model_shards_split_by_gcd():
    # SmolLM2's shape: 9 heads, 3 kv heads. On 1x3 every device has one kv head; a 6-head,
    # 2-kv-head model on 1x6 puts 2 kv heads on `model` and 3 query heads per kv head on `group`.
    plan = sharding.make_plan(1, 3, num_heads=9, num_kv_heads=3, mlp_width=9, vocab_size=10)
    assert dict(plan.mesh.shape) == {"data": 1, "model": 3, "group": 1}
    assert plan.rules.as_dict()["vocab"] is None  # 3 does not divide 10: replicated
    plan = sharding.make_plan(1, 6, num_heads=6, num_kv_heads=2, mlp_width=12, vocab_size=12)
    assert dict(plan.mesh.shape) == {"data": 1, "model": 2, "group": 3}
    assert plan.shape == (1, 6) and str(plan) == "1x6"


def test_draft_model_params_fit_the_mesh_or_replicate():
    small, small_params = tinymodels.tiny_model("llama")  # 4 heads: not divisible by 8
    plan = _plan(1, 8)
    placed = sharding.shard_drafter_params(plan, small_params, small.logical_axes())
    _assert_sharding(placed["layers"]["wq"], plan, P())  # 4 heads over 8: replicated
    _assert_sharding(placed["layers"]["w_up"], plan, P(None, None, TP))  # MLP 128 over 8
    np.testing.assert_array_equal(np.asarray(placed["layers"]["w_up"]),
                                  np.asarray(small_params["layers"]["w_up"]))


def _packed_model():
    """The test model with ``--weights=gguf``'s packed params (Q4_1 layers, Q8_0 embedding)."""
    import jax.numpy as jnp
    from models import packing
    from models.llama import LlamaModel
    from specjax import packed
    model, params = _model()
    config, pparams = packing.pack_float(model.config, jax.tree.map(np.asarray, params), "gguf")
    return LlamaModel(config), packed.as_jax(pparams, jnp.float32)


@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_packed_weights_replicate_and_decode_exactly(mesh):
    # Packed weights have no logical axes (the kernel is a CPU custom call with no partitioning
    # rule): on a mesh they are replicated, the cache and rows still shard, and the tokens equal
    # the single-device packed model's, for plain decoding and a tree method.
    model, params = _packed_model()
    plain = np.asarray(decode.generate(model, params, _prompts(), CONFIG).tokens)
    drafter, dparams = _medusa(model)
    spec = np.asarray(speculative.speculative_generate(model, params, drafter, dparams,
                                                       _prompts(), CONFIG).tokens)
    plan = sharding.plan_for_config(*mesh, model.config)
    placed = plan.shard_params(params, model.logical_axes())
    packed_leaves = [leaf for leaf in jax.tree.leaves(placed) if leaf.dtype != np.float32]
    assert packed_leaves  # the quantised blocks really are there
    for leaf in packed_leaves:
        assert leaf.sharding.is_fully_replicated and leaf.sharding.mesh == plan.mesh
    out = decode.generate(model, placed, _prompts(), CONFIG, plan=plan)
    np.testing.assert_array_equal(np.asarray(out.tokens), plain)
    out = speculative.speculative_generate(model, placed, drafter,
                                           sharding.shard_drafter_params(plan, dparams),
                                           _prompts(), CONFIG, plan=plan)
    np.testing.assert_array_equal(np.asarray(out.tokens), spec)
