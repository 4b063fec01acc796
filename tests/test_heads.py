"""Draft-head drafters (blockwise, Medusa, Hydra): lossless decoding, trees, weights files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import head_weights, heads
from drafters.blockwise import BlockwiseDrafter
from drafters.hydra import HydraDrafter
from drafters.medusa import MedusaDrafter
from specjax.decode import DecodeConfig
from specjax.drafter import DraftContext
from specjax.sampling import SamplingConfig
from specjax.speculative import SpecConfig, speculative_generate
from specjax.tree import DraftTree
from sequence_kit import chi_square_pvalue, exact_joint, sample_sequences, seq_model
from tinymodels import PROMPTS, rows_of

CLASSES = {"blockwise": BlockwiseDrafter, "medusa": MedusaDrafter, "hydra": HydraDrafter}


def _oracle_params(drafter, model, params, rows):
    """A few hundred steps on the reference continuations: heads that often draft right."""
    from drafters import distill
    from specjax import train
    rec = kit.teacher_records(model, params, PROMPTS, rows)
    data = distill.position_dataset(rec, drafter.num_heads)
    tx = train.make_optimizer(3e-2, 5, 100)
    state = train.TrainState.create(drafter.init_params(jax.random.key(0)), tx)
    step = train.make_train_step(heads.make_loss_fn(drafter), tx)
    for _ in range(100):
        state, _ = step(state, data, params)
    return state.params


@pytest.mark.parametrize("name,kind", [("blockwise", "random"), ("medusa", "random"),
                                       ("hydra", "random"), ("blockwise", "trained"),
                                       ("medusa", "trained"), ("hydra", "trained")])
def test_greedy_equals_plain_decoding(target, reference, name, kind):
    model, params = target
    config, ref_rows = reference
    drafter = CLASSES[name].create(model)
    if kind == "random":
        dparams = kit.noisy_params(drafter)
    else:
        dparams = _oracle_params(drafter, model, params, ref_rows)
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, config)  # ragged
    assert rows_of(out) == ref_rows
    if kind == "trained":  # the trained heads actually get drafts accepted
        assert int(out.stats.accepted) > 0.3 * sum(map(len, ref_rows))
        return
    for i in (1,):  # batch 1
        single = speculative_generate(model, params, drafter, dparams, [PROMPTS[i]], config)
        assert rows_of(single) == [ref_rows[i]]


@pytest.mark.parametrize("name", ["blockwise", "medusa", "hydra"])
def test_draft_vocab_drafts_only_low_ids_and_stays_lossless(target, reference, name):
    model, params = target
    config, ref_rows = reference
    drafter = CLASSES[name].create(model, draft_vocab=40)
    dparams = kit.noisy_params(drafter)
    proposal, _, _ = drafter.propose(dparams, (), _context(model, params), jax.random.key(0))
    assert (np.asarray(proposal.tokens)[:, 1:] < 40).all()
    full = CLASSES[name].create(model)
    full_tokens = np.asarray(full.propose(dparams, (), _context(model, params),
                                          jax.random.key(0))[0].tokens)
    assert not (full_tokens[:, 1:] < 40).all()  # the limit is what keeps the drafts low
    out = speculative_generate(model, params, drafter, dparams, PROMPTS, config)
    assert rows_of(out) == ref_rows
    with pytest.raises(ValueError, match="draft_vocab"):
        CLASSES[name].create(model, draft_vocab=model.vocab_size + 1)
    if name != "blockwise":
        with pytest.raises(ValueError, match="draft_vocab"):
            CLASSES[name].create(model, draft_vocab=2)  # the default tree uses rank 2


def _context(model, params, batch=2, seed=0):
    key = jax.random.key(seed)
    return DraftContext(target_params=params, cache=None, history=None, history_len=None,
                        pending=jnp.array([3, 5][:batch], jnp.int32),
                        pending_hidden=jax.random.normal(key, (batch, model.hidden_size)),
                        done=jnp.zeros((batch,), bool))


def test_medusa_tree_tokens_follow_choices(target):
    model, params = target
    choices = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    drafter = MedusaDrafter.create(model, num_heads=3, choices=choices)
    dparams = kit.noisy_params(drafter)
    ctx = _context(model, params)
    proposal, _, _ = drafter.propose(dparams, (), ctx, jax.random.key(0))
    feats = drafter.module.apply({"params": dparams}, ctx.pending_hidden)
    logits = np.asarray(model.lm_head(params, feats))  # [B, K, V]
    order = np.argsort(-logits, axis=-1)
    tokens = np.asarray(proposal.tokens)
    np.testing.assert_array_equal(tokens[:, 0], [3, 5])
    for n, choice in enumerate(drafter.tree.choice_of_node[1:], 1):
        np.testing.assert_array_equal(tokens[:, n], order[:, len(choice) - 1, choice[-1]])


def test_hydra_nodes_depend_on_their_path(target):
    model, params = target
    choices = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    drafter = HydraDrafter.create(model, num_heads=3, choices=choices)
    dparams = kit.noisy_params(drafter)
    ctx = _context(model, params)
    proposal, _, _ = drafter.propose(dparams, (), ctx, jax.random.key(0))
    tokens = np.asarray(proposal.tokens)
    tree = drafter.tree
    h = ctx.pending_hidden
    for n in range(1, tree.num_nodes):  # recompute every node from its own ancestors
        path = [m for m in np.flatnonzero(tree.visible[n]) if m != n]
        d = len(path) - 1
        emb = model.embed(params, jnp.asarray(tokens[:, path]))
        feat = drafter.module.apply({"params": dparams}, d, h, emb,
                                    method=type(drafter.module).head)
        order = np.argsort(-np.asarray(model.lm_head(params, feat)), axis=-1)
        np.testing.assert_array_equal(tokens[:, n], order[:, tree.choice_rank[n]])
    # siblings are distinct tokens
    for kids in tree.children:
        for b in range(tokens.shape[0]):
            assert len(set(tokens[b, list(kids)])) == len(kids)


def test_untrained_heads_start_from_the_lm_head(target):
    model, params = target
    ctx = _context(model, params)
    base = np.asarray(jnp.argmax(model.lm_head(params, ctx.pending_hidden), -1))
    for name in ("medusa", "blockwise"):
        drafter = CLASSES[name].create(model)
        proposal, _, _ = drafter.propose(drafter.init_params(jax.random.key(0)), (), ctx,
                                         jax.random.key(0))
        np.testing.assert_array_equal(np.asarray(proposal.tokens)[:, 1], base)


def test_hydra_sequence_distribution_is_exact():
    sampling = SamplingConfig(temperature=0.8, top_k=5)
    model, params = seq_model()
    drafter = HydraDrafter.create(model, num_heads=2, choices=[(0,), (1,), (0, 0), (1, 0)])
    dparams = kit.noisy_params(drafter, scale=1.0)
    seqs, joint = exact_joint(model, params, sampling)
    counts, total = sample_sequences(model, params, drafter, dparams, sampling, SpecConfig(),
                                      rows=2048, rounds=3)
    assert chi_square_pvalue(seqs, joint, counts, total) > 1e-3


# Bad input -----------------------------------------------------------------------------------


def test_tree_budget_and_depth_errors(target):
    model, _ = target
    big = [(i,) for i in range(10)] + [(0, i) for i in range(10)]
    with pytest.raises(ValueError, match="budget"):
        MedusaDrafter.create(model, choices=big, max_nodes=16)
    with pytest.raises(ValueError, match="budget"):
        HydraDrafter.create(model, choices=big, max_nodes=16)
    with pytest.raises(ValueError, match="budget"):
        BlockwiseDrafter.create(model, num_heads=8, max_nodes=4)
    with pytest.raises(ValueError, match="heads"):
        MedusaDrafter.create(model, num_heads=1, choices=[(0,), (0, 0)])
    with pytest.raises(ValueError, match="chain"):
        BlockwiseDrafter(model, num_heads=2, tree=DraftTree.from_choices([(0,), (1,)]))


def test_incompatible_target_is_refused(target):
    model, params = target
    other = kit.tiny_model("gqa", vocab_size=64)[0]
    drafter = MedusaDrafter.create(other)
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(model, params, drafter, drafter.init_params(jax.random.key(0)),
                             [[1, 2]], DecodeConfig(max_new_tokens=4))


def test_weights_round_trip_and_errors(target, tmp_path):
    model, _ = target
    drafter = HydraDrafter.create(model)
    params = kit.noisy_params(drafter)
    path = str(tmp_path / "hydra.safetensors")
    head_weights.save_weights(path, drafter, params, target_name="tiny", dtype="float32")
    back = head_weights.load_weights(path, drafter)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, back))
    loaded_drafter, loaded = head_weights.load_shipped("hydra", model, path=path)
    assert loaded_drafter == drafter
    # bf16 file: a cast of the same values
    head_weights.save_weights(path, drafter, params)
    back = head_weights.load_weights(path, drafter)
    leaf = jax.tree.leaves(back)[0]
    assert leaf.dtype == jnp.float32
    # another model size / vocabulary
    wider = kit.tiny_model("gqa", hidden_size=32, num_heads=4, head_dim=8)[0]
    with pytest.raises(head_weights.HeadWeightsError, match="hidden size"):
        head_weights.load_shipped("hydra", wider, path=path)
    other_vocab = kit.tiny_model("gqa", vocab_size=64)[0]
    with pytest.raises(head_weights.HeadWeightsError, match="vocabulary"):
        head_weights.load_shipped("hydra", other_vocab, path=path)
    with pytest.raises(head_weights.HeadWeightsError, match="hydra"):
        head_weights.load_weights(path, MedusaDrafter.create(model))
    with pytest.raises(head_weights.HeadWeightsError, match="num_heads"):
        head_weights.load_weights(path, HydraDrafter.create(model, num_heads=2,
                                                     choices=[(0,), (0, 0)]))
    # corrupt / truncated / missing
    kit.truncate_file(path)
    with pytest.raises(head_weights.HeadWeightsError, match="damaged"):
        head_weights.load_shipped("hydra", model, path=path)
    with pytest.raises(head_weights.HeadWeightsError, match="no head weights"):
        head_weights.load_shipped("hydra", model, path=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown head drafter"):
        head_weights.load_shipped("eagle", model, path=path)


@pytest.mark.parametrize("name", ["blockwise", "medusa", "hydra"])
def test_shipped_smollm2_weights_fit(name):
    path = head_weights.shipped_path(name, "smollm2-135m")
    assert os.path.exists(path), f"shipped weights {path} are missing from the repository"
    assert os.path.getsize(path) < 20e6
    from models.llama import LlamaModel
    config = kit.smollm2_config()
    drafter, params = head_weights.load_shipped(name, LlamaModel(config))
    assert drafter.vocab_size == config.vocab_size
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
