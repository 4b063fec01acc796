"""Test kit: drafters with random weights (adversarial drafts) for "every method is lossless"
tests on any tiny target (tests/test_packed_methods.py, tests/test_families.py)."""

from __future__ import annotations

import numpy as np

import tinymodels as kit
from drafters.block_diffusion import BlockDiffusionDrafter, decode_params as block_params
from drafters.blockwise import BlockwiseDrafter
from drafters.eagle import EagleDrafter
from drafters.eagle3 import Eagle3Drafter, decode_params as eagle3_params
from drafters.eagle_weights import random_params
from drafters.hydra import HydraDrafter
from drafters.medusa import MedusaDrafter
from drafters.rest import RestDrafter
from drafters.rest_datastore import build_datastore
from tinymodels import PROMPTS


def loaded(model, params, name: str = "tiny-gqa"):
    """A :class:`models.registry.LoadedModel` of a tiny model built in a test."""
    from models.registry import LoadedModel
    return LoadedModel(model=model, params=params, tokenizer=None, name=name)


def weighted_drafter(name: str, model):
    """``(drafter, random params)`` of the method ``name`` that needs weights, for ``model``."""
    rng = np.random.default_rng(7)
    draft_vocab = min(64, model.vocab_size)
    if name in ("blockwise", "medusa", "hydra"):
        cls = {"blockwise": BlockwiseDrafter, "medusa": MedusaDrafter, "hydra": HydraDrafter}
        drafter = cls[name].create(model)
        return drafter, kit.noisy_params(drafter)
    if name == "eagle":
        drafter = EagleDrafter.create(model)
        return drafter, random_params(drafter, seed=3)
    if name == "eagle3":
        drafter = Eagle3Drafter.create(model, draft_vocab)
        vmap = rng.permutation(drafter.vocab_size)[:drafter.draft_vocab]
        return drafter, eagle3_params(drafter, kit.noisy_params(drafter, 1), vmap)
    if name == "block_diffusion":
        drafter = BlockDiffusionDrafter.create(model, tree="chain", num_layers=1,
                                               draft_vocab_size=draft_vocab)
        vmap = rng.permutation(drafter.vocab_size)[:drafter.draft_vocab_size]
        return drafter, block_params(kit.noisy_params(drafter, 2), vmap)
    if name == "rest":
        drafter = RestDrafter(model.vocab_size, num_candidates=8, num_nodes=6, draft_depth=4,
                              max_ngram=3, min_ngram=1)
        seqs = [list(rng.integers(0, model.vocab_size, 50)) for _ in range(20)] + PROMPTS
        return drafter, drafter.params_of(build_datastore(seqs, model.vocab_size, sort_depth=8))
    raise AssertionError(name)
