"""Every decoding method is lossless on a packed target (``--weights=gguf|gguf_a8|int8``): greedy
output identical to plain decoding of the SAME packed model, on the tiny GQA model.

The methods without weights run through ``experiments.methods.Run`` (the CLI's path, the method
defaults); the drafters with weights (heads, EAGLE, EAGLE-3, the block drafter, REST) get random
params (adversarial drafts) and, where they read the target's embedding or LM head, read the
packed ones. gguf (Q4_1 layers, Q8_0 embedding, the embedded model's formats) covers every
method; int8 covers EAGLE (a tree drafter that reads the target's embedding and LM head): the
two formats differ only inside the kernel and the packing, which ``tests/test_packed.py``
checks format by format (and the int8 tiny models against their float models). gguf_a8 (8-bit
activations: another model) covers chains, a draft model made of the target's own layers,
Jacobi, a static tree (token recycling), EAGLE and Hydra.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import method_kit
import tinymodels as kit
from drafters import registry
from experiments import methods
from models import packing
from models.llama import LlamaModel
from specjax import decode
from specjax.speculative import speculative_generate
from tinymodels import PROMPTS, rows_of

CONFIG = decode.DecodeConfig(max_new_tokens=12, eos_ids=(13,))
UNTRAINED = [m.name for m in registry.methods() if m.weights is None and m.name != "ar"]
WEIGHTED = [m.name for m in registry.methods() if m.weights is not None]


@functools.lru_cache(maxsize=3)
def _packed_target(weights):
    """``(model, params, reference rows)``: the tiny GQA model packed as ``weights``."""
    model, params = kit.tiny_model("gqa")
    numpy_params = jax.tree.map(np.asarray, params)
    config, pparams = packing.pack_float(model.config, numpy_params, weights.removesuffix("_a8"))
    config = dataclasses.replace(config, act8=weights.endswith("_a8"))
    from specjax import packed
    pparams = packed.as_jax(pparams, jnp.float32)
    pmodel = LlamaModel(config)
    plain = decode.generate(pmodel, pparams, PROMPTS, CONFIG)
    return pmodel, pparams, rows_of(plain)


@pytest.mark.parametrize("weights,name", [("gguf", n) for n in UNTRAINED] + [
    ("gguf_a8", n) for n in ("prompt_lookup", "draft_model", "jacobi", "token_recycling")])
def test_untrained_method_is_lossless_on_a_packed_target(weights, name):
    model, params, rows = _packed_target(weights)
    method = registry.get(name)
    options = method.make_options(draft_layers=1) if name == "draft_model" else None
    run = methods.Run(name, "tiny-gqa", CONFIG, options, weights=weights)
    lm = method_kit.loaded(model, params)
    drafter, dparams = run.drafter(lm)
    got = run.engine(lm, drafter).compile(params, dparams, PROMPTS).run()
    assert got.tokens == rows


@pytest.mark.parametrize("weights,name", [("gguf", n) for n in WEIGHTED] + [
    ("int8", "eagle"), ("gguf_a8", "eagle"), ("gguf_a8", "hydra")])
def test_drafter_with_weights_is_lossless_on_a_packed_target(weights, name):
    model, params, rows = _packed_target(weights)
    drafter, dparams = method_kit.weighted_drafter(name, model)
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, CONFIG)
    assert rows_of(out) == rows


# A drafter's own matrices as Q8_0 blocks (drafters/drafter_packing.py) ----------------------


def _drafter_outputs(name, drafter, dparams, model):
    """The drafter network's outputs on fixed random inputs: EAGLE's layer and (EAGLE-3) its
    fusion and draft-vocabulary scores; the block drafter's logits of one block."""
    rng = np.random.default_rng(5)
    e, b, s = model.config.hidden_size, 2, 6
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if name == "block_diffusion":
        taps = jnp.asarray(rng.normal(size=(b, s, len(drafter.feature_layers) * e)),
                           jnp.float32)
        first = jnp.asarray(rng.normal(size=(b, e)), jnp.float32)
        return [drafter.module.apply({"params": dparams["net"]}, taps, pos, first, 4)]
    feats = jnp.asarray(rng.normal(size=(b, s, e)), jnp.float32)
    out = [drafter.module.apply({"params": drafter.layer_params(dparams)}, feats, feats, pos)]
    if name == "eagle3":
        taps = jnp.asarray(rng.normal(size=(b, s, drafter.num_taps * e)), jnp.float32)
        out += [drafter.input_features(dparams, taps), drafter.draft_scores(dparams, None, out[0])]
    return out


@pytest.mark.parametrize("name,num_packed", [("eagle3", 7), ("block_diffusion", 6),
                                             ("eagle", 5)])
def test_drafter_packed_as_q8_0_is_its_dequantised_float_drafter_and_lossless(name, num_packed):
    from drafters import drafter_packing
    model, params, rows = _packed_target("gguf")
    drafter, dparams = method_kit.weighted_drafter(name, model)
    qparams = drafter_packing.pack_params(jax.device_get(dparams))
    # the layer's four products, fc, and (EAGLE-3) fuse and head, (block) head
    assert len(drafter_packing.packed_leaves(qparams)) == num_packed
    reference = drafter_packing.unpack_params(qparams, model.config)
    assert not drafter_packing.packed_leaves(reference)
    assert jax.tree.structure(reference) == jax.tree.structure(jax.device_get(dparams))
    # the kernel computes the float drafter of the dequantised values (float summation order
    # only), which differs from the unrounded drafter
    got = _drafter_outputs(name, drafter, qparams, model)
    want = _drafter_outputs(name, drafter, reference, model)
    unrounded = _drafter_outputs(name, drafter, dparams, model)
    for g, w, u in zip(got, want, unrounded):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))
        assert float(jnp.abs(u - w).max()) > 1e-4 * float(jnp.abs(w).max())
    # lossless, and the same rounds as the float drafter of the same values
    out = speculative_generate(model, params, drafter, qparams, PROMPTS, CONFIG)
    assert rows_of(out) == rows
    ref = speculative_generate(model, params, drafter, reference, PROMPTS, CONFIG)
    assert int(out.stats.accepted) == int(ref.stats.accepted)
    assert int(out.stats.target_calls) == int(ref.stats.target_calls)


def test_drafter_weights_option_resolves_by_target():
    from drafters import drafter_packing
    float_model, _ = kit.tiny_model("gqa")
    packed_model, _, _ = _packed_target("gguf")
    assert drafter_packing.resolve("auto", packed_model) == "q8_0"  # the CPU backend here
    assert drafter_packing.resolve("auto", float_model) == "float32"
    assert drafter_packing.resolve("q8_0", float_model) == "q8_0"
    assert drafter_packing.resolve("float32", packed_model) == "float32"
    with pytest.raises(ValueError, match="drafter_weights must be one of auto, float32, q8_0"):
        drafter_packing.resolve("int4", packed_model)
    with pytest.raises(ValueError, match="pack as q8_0"):
        drafter_packing.pack_params({}, "q4_0")


@pytest.mark.parametrize("name,field,default,packed_default", [
    ("prompt_lookup", "draft_len", "DRAFT_LEN", "PACKED_DRAFT_LEN"),
    ("sam", "draft_len", "DRAFT_LEN", "PACKED_DRAFT_LEN"),
    ("rest", "num_nodes", "NUM_NODES", "PACKED_NUM_NODES")])
def test_draft_size_default_follows_the_weight_format(name, field, default, packed_default,
                                                       tmp_path):
    """Without ``--draft_len`` / ``--num_nodes``, prompt lookup, SAM and REST draft their
    packed-weights size on a packed target and their float32 size otherwise; a given size wins
    on both."""
    import importlib
    module = importlib.import_module(f"drafters.{name}")
    float_model, float_params = kit.tiny_model("gqa")
    packed_model, packed_params, _ = _packed_target("gguf")
    method = registry.get(name)
    default, packed_default = getattr(module, default), getattr(module, packed_default)
    assert packed_default != default
    options = method.make_options()
    if name == "sam":
        options = dataclasses.replace(options, static="none")
    if name == "rest":
        from drafters.rest_datastore import build_datastore, save_datastore
        store = build_datastore([[1, 2, 3, 4, 5, 6, 7, 8, 9]], float_model.vocab_size)
        options = dataclasses.replace(options, datastore=save_datastore(
            str(tmp_path / "d.safetensors"), store))
    for model, params, size in ((float_model, float_params, default),
                                (packed_model, packed_params, packed_default)):
        ctx = registry.BuildContext(method_kit.loaded(model, params), None)
        drafter, _ = method.build(ctx, options)
        assert getattr(drafter, field) == size
        assert drafter.tree.num_nodes == size + 1
        drafter, _ = method.build(ctx, dataclasses.replace(options, **{field: 5}))
        assert getattr(drafter, field) == 5


def test_weights_of_names_the_format_a_model_was_loaded_as():
    float_model, _ = kit.tiny_model("gqa")
    assert packing.weights_of(float_model.config) == "float32"
    for weights in ("gguf", "gguf_a8", "int8"):
        assert packing.weights_of(_packed_target(weights)[0].config) == weights


@pytest.mark.parametrize("name", ["draft_model", "staged"])
def test_named_draft_model_takes_the_target_weight_format(name):
    """A named draft model is loaded in the target's format by default (drafting on packed
    weights gets as cheap as the target's step); ``draft_weights`` overrides it; the decoding
    stays the packed target's own."""
    from models import registry as models
    lm = models.load("tiny-gqa", weights="gguf")  # the draft below is the same registry model
    params = lm.params
    rows = rows_of(decode.generate(lm.model, params, PROMPTS, CONFIG))
    method = registry.get(name)
    ctx = registry.BuildContext(lm, None)
    drafter, dparams = method.build(ctx, method.make_options(draft_model="tiny-gqa"))
    assert packing.weights_of(drafter.model.config) == "gguf"
    assert any(leaf.dtype == np.uint8 for leaf in jax.tree.leaves(dparams))
    run = methods.Run(name, "tiny-gqa", CONFIG, method.make_options(draft_model="tiny-gqa"),
                      weights="gguf")
    drafter, dparams = run.drafter(lm)
    assert run.engine(lm, drafter).compile(params, dparams, PROMPTS).run().tokens == rows
    drafter, _ = method.build(ctx, method.make_options(draft_model="tiny-gqa",
                                                       draft_weights="float32"))
    assert packing.weights_of(drafter.model.config) == "float32"
    float_ctx = registry.BuildContext(models.load("tiny-gqa"), None)
    drafter, _ = method.build(float_ctx, method.make_options(draft_model="tiny-gqa"))
    assert packing.weights_of(drafter.model.config) == "float32"
    with pytest.raises(ValueError, match="draft_weights applies to a named --draft_model"):
        method.build(ctx, method.make_options(draft_weights="int8"))
