"""Blockwise parallel decoding's relaxed (LOSSY) acceptance rules: top-k membership and distance.

Rule level: hand-made logits with known answers. Loop level: at their strictest setting (top-1,
distance 0) the rules are exact greedy decoding; at their loosest they accept every draft, so an
always-wrong drafter gets K + 1 tokens per round, and the output is no longer the target's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters.scripted import ScriptedDrafter
from specjax import accept as accept_lib
from specjax.decode import DecodeConfig, generate
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, speculative_generate
from specjax.tree import DraftTree

GREEDY = SamplingConfig()
KEY = jax.random.key(0)


def _logits(rows):
    return jnp.asarray(np.log(np.asarray(rows, np.float64)), jnp.float32)


def test_topk_rule_on_a_chain():
    tree = DraftTree.chain(3)
    logits = _logits([[[.5, .3, .2, 1e-3]] * 4])  # top-1 is token 0, top-2 adds token 1
    tokens = jnp.array([[0, 1, 0, 2]], jnp.int32)
    top1 = accept_lib.topk_acceptance_lossy(KEY, tokens, tree, logits, GREEDY, top_k=1)
    greedy = accept_lib.greedy(tokens, tree, logits)
    assert int(top1.num_accepted[0]) == int(greedy.num_accepted[0]) == 0
    top2 = accept_lib.topk_acceptance_lossy(KEY, tokens, tree, logits, GREEDY, top_k=2)
    assert int(top2.num_accepted[0]) == 2  # 1 and 0 are in the top 2; 2 is not
    np.testing.assert_array_equal(np.asarray(top2.emitted[0]), [1, 0, 0, -1])
    top3 = accept_lib.topk_acceptance_lossy(KEY, tokens, tree, logits, GREEDY, top_k=3)
    np.testing.assert_array_equal(np.asarray(top3.emitted[0]), [1, 0, 2, 0])


def test_topk_rule_on_a_tree_keeps_the_deepest_passing_path():
    tree = DraftTree.from_parents([-1, 0, 0, 1, 2])  # two branches of depth 2
    logits = _logits([[[.5, .3, .2, 1e-3]] * 5])
    # Branch 1 -> 3: token 3 fails at depth 1; branch 2 -> 4: tokens 1, 1 pass top-2.
    tokens = jnp.array([[0, 3, 1, 0, 1]], jnp.int32)
    result = accept_lib.topk_acceptance_lossy(KEY, tokens, tree, logits, GREEDY, top_k=2)
    np.testing.assert_array_equal(np.asarray(result.path[0]), [0, 2, 4])
    np.testing.assert_array_equal(np.asarray(result.emitted[0]), [1, 1, 0])


def test_distance_rule():
    tree = DraftTree.chain(3)
    probs = np.full((1, 4, 8), 1e-3)
    probs[0, :, 4] = 1.0  # argmax is token 4 everywhere
    logits = _logits(probs)
    tokens = jnp.array([[0, 5, 3, 6]], jnp.int32)
    exact = accept_lib.distance_acceptance_lossy(KEY, tokens, tree, logits, GREEDY,
                                                 max_distance=0)
    assert int(exact.num_accepted[0]) == 0
    near = accept_lib.distance_acceptance_lossy(KEY, tokens, tree, logits, GREEDY,
                                                max_distance=1)
    np.testing.assert_array_equal(np.asarray(near.emitted[0]), [5, 3, 4, -1])
    far = accept_lib.distance_acceptance_lossy(KEY, tokens, tree, logits, GREEDY,
                                               max_distance=2)
    assert int(far.num_accepted[0]) == 3


def test_bad_rule_settings():
    with pytest.raises(ValueError, match="topk_k"):
        SpecConfig(acceptance="topk_lossy", topk_k=0)
    with pytest.raises(ValueError, match="max_distance"):
        SpecConfig(acceptance="distance_lossy", max_distance=-1)
    with pytest.raises(ValueError, match="unknown acceptance"):
        SpecConfig(acceptance="topk")


# In the loop -------------------------------------------------------------------------------------

# Three ragged rows of their own (not tinymodels.PROMPTS), decoded without EOS: every row runs
# NEW_TOKENS, so the round count below is exact.
THREE_PROMPTS = [[1, 2, 3, 1, 2], [4, 5, 6, 7, 8, 9, 10], [11]]
DRAFT_LEN = 3
NEW_TOKENS = 17


@pytest.fixture(scope="module")
def setup(target):
    model, params = target
    config = DecodeConfig(max_new_tokens=NEW_TOKENS)
    plain = generate(model, params, THREE_PROMPTS, config)
    reference = kit.script(THREE_PROMPTS, kit.rows_of(plain))
    return model, params, config, np.asarray(plain.tokens), reference


def _run(setup, mode, spec):
    model, params, config, _, reference = setup
    drafter = ScriptedDrafter(mode, DRAFT_LEN, model.vocab_size)
    return speculative_generate(model, params, drafter, reference, THREE_PROMPTS, config, spec)


@pytest.mark.parametrize("spec", [SpecConfig(acceptance="topk_lossy", topk_k=1),
                                  SpecConfig(acceptance="distance_lossy", max_distance=0)])
def test_strictest_setting_is_exact_greedy(setup, spec):
    out = _run(setup, "wrong", spec)
    np.testing.assert_array_equal(np.asarray(out.tokens), setup[3])
    assert int(out.stats.accepted) == 0


@pytest.mark.parametrize("spec", [SpecConfig(acceptance="topk_lossy", topk_k=128),
                                  SpecConfig(acceptance="distance_lossy", max_distance=128)])
def test_loosest_setting_accepts_every_draft(setup, spec):
    out = _run(setup, "wrong", spec)
    rounds = -(-(NEW_TOKENS - 1) // (DRAFT_LEN + 1))  # the prefill emits the first token
    assert int(out.stats.rounds) == rounds
    assert int(out.stats.accepted) == int(out.stats.drafted) > 0
    assert not np.array_equal(np.asarray(out.tokens), setup[3])  # lossy: not the target's


def test_topk_two_accepts_more_than_exact_match(setup):
    exact = _run(setup, "random", SpecConfig())
    np.testing.assert_array_equal(np.asarray(exact.tokens), setup[3])
    relaxed = _run(setup, "random", SpecConfig(acceptance="topk_lossy", topk_k=64))
    assert int(relaxed.stats.accepted) > int(exact.stats.accepted)
