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
