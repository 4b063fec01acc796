"""Every decoding method is lossless on a packed target (``--weights=gguf|int8``): greedy output
identical to plain decoding of the SAME packed model, on the tiny GQA model.

The methods without weights run through ``experiments.methods.Run`` (the CLI's path, the method
defaults); the drafters with weights (heads, EAGLE, EAGLE-3, the block drafter, REST) get random
params (adversarial drafts) and, where they read the target's embedding or LM head, read the
packed ones. gguf (Q4_1 layers, Q8_0 embedding, the embedded model's formats) covers every
method; int8 covers EAGLE (a tree drafter that reads the target's embedding and LM head): the
two formats differ only inside the kernel and the packing, which ``tests/test_packed.py``
checks format by format (and the int8 tiny models against their float models).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import registry
from drafters.block_diffusion import BlockDiffusionDrafter, decode_params as block_params
from drafters.blockwise import BlockwiseDrafter
from drafters.eagle import EagleDrafter
from drafters.eagle3 import Eagle3Drafter, decode_params as eagle3_params
from drafters.eagle_weights import random_params
from drafters.hydra import HydraDrafter
from drafters.medusa import MedusaDrafter
from drafters.rest import RestDrafter
from drafters.rest_datastore import build_datastore
from experiments import methods
from models import packing
from models.llama import LlamaModel
from specjax import decode
from specjax.speculative import speculative_generate
from tinymodels import PROMPTS, rows_of

CONFIG = decode.DecodeConfig(max_new_tokens=12, eos_ids=(13,))
UNTRAINED = [m.name for m in registry.methods() if m.weights is None and m.name != "ar"]
WEIGHTED = [m.name for m in registry.methods() if m.weights is not None]


@functools.lru_cache(maxsize=2)
def _packed_target(weights):
    """``(model, params, reference rows)``: the tiny GQA model packed as ``weights``."""
    model, params = kit.tiny_model("gqa")
    numpy_params = jax.tree.map(np.asarray, params)
    config, pparams = packing.pack_float(model.config, numpy_params, weights)
    from specjax import packed
    pparams = packed.as_jax(pparams, jnp.float32)
    pmodel = LlamaModel(config)
    plain = decode.generate(pmodel, pparams, PROMPTS, CONFIG)
    return pmodel, pparams, rows_of(plain)


@pytest.mark.parametrize("name", UNTRAINED)
def test_untrained_method_is_lossless_on_a_packed_target(name):
    model, params, rows = _packed_target("gguf")
    method = registry.get(name)
    options = method.make_options(draft_layers=1) if name == "draft_model" else None
    run = methods.Run(name, "tiny-gqa", CONFIG, options, weights="gguf")
    lm = models_loaded(model, params)
    drafter, dparams = run.drafter(lm)
    got = run.engine(lm, drafter).compile(params, dparams, PROMPTS).run()
    assert got.tokens == rows


def models_loaded(model, params):
    from models.registry import LoadedModel
    return LoadedModel(model=model, params=params, tokenizer=None, name="tiny-gqa")


def _weighted(name, model):
    """``(drafter, random params)`` of a drafter with weights."""
    rng = np.random.default_rng(7)
    if name in ("blockwise", "medusa", "hydra"):
        cls = {"blockwise": BlockwiseDrafter, "medusa": MedusaDrafter, "hydra": HydraDrafter}
        drafter = cls[name].create(model)
        return drafter, kit.noisy_params(drafter)
    if name == "eagle":
        drafter = EagleDrafter.create(model)
        return drafter, random_params(drafter, seed=3)
    if name == "eagle3":
        drafter = Eagle3Drafter.create(model, 64)
        vmap = rng.permutation(drafter.vocab_size)[:drafter.draft_vocab]
        return drafter, eagle3_params(drafter, kit.noisy_params(drafter, 1), vmap)
    if name == "block_diffusion":
        drafter = BlockDiffusionDrafter.create(model, tree="chain", num_layers=1,
                                               draft_vocab_size=64)
        vmap = rng.permutation(drafter.vocab_size)[:drafter.draft_vocab_size]
        return drafter, block_params(kit.noisy_params(drafter, 2), vmap)
    if name == "rest":
        drafter = RestDrafter(model.vocab_size, num_candidates=8, num_nodes=6, draft_depth=4,
                              max_ngram=3, min_ngram=1)
        seqs = [list(rng.integers(0, model.vocab_size, 50)) for _ in range(20)] + PROMPTS
        return drafter, drafter.params_of(build_datastore(seqs, model.vocab_size, sort_depth=8))
    raise AssertionError(name)


@pytest.mark.parametrize("weights,name", [("gguf", n) for n in WEIGHTED] + [("int8", "eagle")])
def test_drafter_with_weights_is_lossless_on_a_packed_target(weights, name):
    model, params, rows = _packed_target(weights)
    drafter, dparams = _weighted(name, model)
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, CONFIG)
    assert rows_of(out) == rows
