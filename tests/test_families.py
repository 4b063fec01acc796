"""Every decoding method is lossless on every model family: greedy output identical to plain
decoding of the same model, on tiny random models of each family's layers (the main method tests
run on Llama's layers, ``gqa``): Gemma 3's sandwich norms, q / k norms, GeGLU, scaled
embeddings, query scale and interleaved 6-token-window / global layers with their own rope
bases; Qwen3's q / k norms and wider heads; Mistral with a 5-token window on every layer;
Qwen2.5's qkv bias and tied embeddings; Llama 3.1's rope scaling.

Every registered method runs on every family but two that share Medusa's heads (the untrained
ones through ``experiments.methods.Run``, the CLI's path with the method defaults; the ones with
weights with random params: adversarial drafts). The windows are shorter than the prompts plus
the new tokens, so every loop verifies trees and chains whose keys fall in and out of a window,
including tree nodes whose slot is not their position. The model math itself is checked against
a numpy reference and transformers in tests/test_llama.py and tests/test_hf_parity.py.
"""

import functools

import pytest

import method_kit
import tinymodels as kit
from drafters import registry
from experiments import methods
from specjax import decode
from specjax.speculative import speculative_generate
from tinymodels import PROMPTS, rows_of

CONFIG = decode.DecodeConfig(max_new_tokens=12, eos_ids=(13,))
# The CLI's path takes its eos ids from the tokenizer: none for the tiny models.
RUN_CONFIG = decode.DecodeConfig(max_new_tokens=12)
UNTRAINED = [m.name for m in registry.methods() if m.weights is None and m.name != "ar"]
WEIGHTED = [m.name for m in registry.methods() if m.weights is not None]
# The families beside Llama's (tests/tinymodels.py kinds): Gemma 3, Qwen3, windowed Mistral,
# Qwen2.5 (qkv bias, tied embeddings), Llama 3.1 (rope scaling).
FAMILIES = kit.FAMILY_KINDS + ("qwen2", "llama3_rope")


@functools.lru_cache(maxsize=2 * len(FAMILIES))
def _target(kind, config=CONFIG):
    """``(model, params, plain decoding's rows)`` of a tiny family model."""
    model, params = kit.tiny_model(kind)
    return model, params, rows_of(decode.generate(model, params, PROMPTS, config))


# Blockwise and Hydra heads run on the same head machinery as Medusa (drafters/heads.py),
# which runs here.
SAME_AS_MEDUSA = ("blockwise", "hydra")


def _cases():
    return [(kind, name) for kind in FAMILIES for name in UNTRAINED + WEIGHTED
            if name not in SAME_AS_MEDUSA]


@pytest.mark.parametrize("kind,name", _cases())
def test_method_is_lossless_on_the_family(kind, name):
    if name in WEIGHTED:
        model, params, rows = _target(kind)
        drafter, dparams = method_kit.weighted_drafter(name, model)
        out = speculative_generate(model, params, drafter, dparams, PROMPTS, CONFIG)
        assert rows_of(out) == rows
        return
    model, params, rows = _target(kind, RUN_CONFIG)
    options = registry.get(name).make_options(draft_layers=1) if name == "draft_model" else None
    run = methods.Run(name, "tiny-gqa", RUN_CONFIG, options)
    lm = method_kit.loaded(model, params)
    drafter, dparams = run.drafter(lm)
    got = run.engine(lm, drafter).compile(params, dparams, PROMPTS).run()
    assert got.tokens == rows


@pytest.mark.parametrize("kind", ["gemma3", "mistral_window"])
def test_windows_matter_in_these_runs(kind):
    """The windows are not idle here: decoding the windowed models with their windows removed
    gives other tokens (so the equalities above are about windowed attention)."""
    import dataclasses
    from models.llama import LlamaModel
    model, params, rows = _target(kind)
    unwindowed = LlamaModel(dataclasses.replace(model.config, layer_windows=()))
    assert rows_of(decode.generate(unwindowed, params, PROMPTS, CONFIG)) != rows


def test_packed_weights_on_the_family():
    """--weights=gguf / int8 pack Gemma 3's linear layers (its extra norms stay float): a tree
    method gives the packed model's own plain decoding."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from models import packing
    from models.llama import LlamaModel
    from specjax import packed
    model, params = kit.tiny_model("gemma3")
    for weights in ("gguf", "int8"):
        config, pparams = packing.pack_float(model.config, jax.tree.map(np.asarray, params),
                                             weights)
        pmodel, pparams = LlamaModel(config), packed.as_jax(pparams, jnp.float32)
        rows = rows_of(decode.generate(pmodel, pparams, PROMPTS, CONFIG))
        drafter, dparams = method_kit.weighted_drafter("eagle", pmodel)
        out = speculative_generate(pmodel, pparams, drafter, dparams, PROMPTS, CONFIG)
        assert rows_of(out) == rows
