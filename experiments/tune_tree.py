"""Tunes the static tree of trained Medusa / Hydra heads, the EAGLE layer, the EAGLE-3 drafter,
the block drafter or Token Recycling's table walk; writes ``<weights>.tree.json``.

  python -m experiments.tune_tree --drafter=medusa \\
      --data_dir=/tmp/sj/distill,/tmp/sj/distill_extra,/tmp/sj/distill_extra2
  python -m experiments.tune_tree --drafter=hydra --data_dir=... --sizes=4,8,12,16 \\
      --output=/tmp/hydra.tree.json
  python -m experiments.tune_tree --drafter=eagle --data_dir=... --draft_vocab=8192
  python -m experiments.tune_tree --drafter=eagle3 --corpus_dir=/work/corpus/extra-regen-0 \\
      --eval_fraction=1 --sizes=1,2,3,4,6,8
  python -m experiments.tune_tree --drafter=token_recycling \\
      --corpus_dir=/work/corpus/extra-regen-0 --sizes=2,4,6,8,12,16

The self-distillation drafters (medusa, hydra, eagle) read ``--data_dir`` (``train_drafter``'s
data; ``--eval_fraction=1``: every record, for data they never trained on); the corpus
drafters (eagle3, block_diffusion) read ``--corpus_dir`` (``build_corpus``'s), whose held-out
records are ``train_corpus_drafter``'s split (same ``--eval_fraction`` / ``--seed``), or every
record with ``--eval_fraction=1`` (a corpus the
drafter never trained on, e.g. a regenerated one: there every drafted chain is the target's
own, while on a teacher-forced corpus a chain through a data token the target would not pick
counts as a miss from there on).

Two steps:

1. **Which nodes** (``specjax.tree_tuning``): on the HELD-OUT sequences of the training split
   (the same ``--eval_fraction`` / ``--seed`` as ``train_drafter``, so the heads never saw
   them), the rank of the target's true token under every head (EAGLE: at every depth, the
   layer fed its own predicted features) is measured with the true tokens on the path. The
   order of choices by hit count gives, for every node count N, the tree of N drafted nodes
   with the most expected accepted tokens on that data (an exact count, not an independence
   model).
2. **How many nodes**: a bigger tree accepts more but a round costs more (verification of N+1
   tokens; Hydra drafts level by level). For each N of ``--sizes`` the binary decodes the
   prompts of ``--measure_prompts`` held-out sequences (greedy, batch 1, as the benchmark
   does), each prompt under plain decoding and every N back to back (a shared CPU's speed
   drifts), and the N with the best speedup over plain decoding becomes ``default_nodes`` (or
   ``--default_nodes``). Every output must equal plain decoding's (exit status 1 otherwise).

``--draft_vocab=N`` drafts from token ids < N only (lossless; the heads then read N / V of the
LM head): the ranks, the order and the timing all use it, and the file records it.

The file holds the whole order (up to ``--max_nodes``), so ``--tree=tunedN`` in ``generate``
and ``benchmark`` picks any size later, plus the measured table under ``info``.

``token_recycling`` has no weights: its corpus is split by records (``--eval_fraction``, default
0.5), the first part builds the starting table (:func:`drafters.token_recycling.table_from_text`)
and the held-out part gives the ranks (the table walked and updated along each response,
:func:`drafters.token_recycling.walk_ranks`) and the timed prompts; the tree file goes beside
the shipped table (``token_recycling.safetensors``, from ``build_recycling_table``).
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import numpy as np

from absl import app, flags

from experiments import common, method_flags

FLAGS = flags.FLAGS

CORPUS_DRAFTERS = ("eagle3", "block_diffusion")
RECYCLING = "token_recycling"  # training-free: tuned on a corpus's text, no weights
flags.DEFINE_enum("drafter", "medusa", ["medusa", "hydra", "eagle", *CORPUS_DRAFTERS, RECYCLING],
                  "Drafter whose static tree to tune.")
flags.DEFINE_string("model", "smollm2-135m", "Target: registry name, HF directory or .gguf.")
flags.DEFINE_string("drafter_weights", None, "The drafter's weights (.safetensors); default: "
                    "the shipped file.")
flags.DEFINE_string("data_dir", None, "Self-distillation data (comma-separated directories), "
                    "as given to train_drafter.")
flags.DEFINE_string("corpus_dir", None, "eagle3 / block_diffusion: distillation corpus "
                    "(comma-separated directories), as built by build_corpus.")
flags.DEFINE_float("eval_fraction", None, "Held-out share of the sequences, as in training "
                   "(default 0.1 for --data_dir, 0.05 for --corpus_dir; 1 = every record of a "
                   "corpus the drafter never trained on). token_recycling: the share measured, "
                   "the rest builds the starting table (default 0.5; 1 = a cold table).")
flags.DEFINE_integer("batch_size", 4, "Corpus windows per rank batch (corpus drafters).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Split seed (as in training).")
flags.DEFINE_integer("max_nodes", 32, "Longest order stored (drafted nodes).", lower_bound=1)
flags.DEFINE_integer("max_depth", 0, "Deepest tree (0 = the drafter's: heads K, eagle 5).",
                     lower_bound=0)
flags.DEFINE_integer("seq_len", 192, "eagle: pairs per held-out window (as in training).",
                     lower_bound=2)
flags.DEFINE_integer("max_rank", None, "Candidates per head considered (top-k width; default "
                     "10, token_recycling: the table's width, 8).",
                     lower_bound=1)
flags.DEFINE_list("sizes", ["2", "4", "6", "8", "10", "12", "16", "20"],
                  "Node counts timed against plain decoding.")
flags.DEFINE_integer("measure_prompts", 6, "Held-out prompts decoded per timed size "
                     "(0 = no timing; then --default_nodes is required).", lower_bound=0)
flags.DEFINE_integer("max_new_tokens", 128, "New tokens per timed prompt.", lower_bound=1)
flags.DEFINE_integer("default_nodes", 0, "The file's default size (0 = the best measured).",
                     lower_bound=0)
flags.DEFINE_integer("packed_default_nodes", 0, "The file's default size for targets with "
                     "packed weights (--weights=gguf|gguf_a8|int8), e.g. the best size of a "
                     "tune_tree run with --weights=gguf (0 = the default size for every "
                     "format).", lower_bound=0)
flags.DEFINE_integer("draft_vocab", 0, "Draft only token ids < N (0 = all): the heads read "
                     "N / V of the LM head per round; stored with the tree.", lower_bound=0)
flags.DEFINE_string("output", None, "Tree file; default: <weights>.tree.json.")
method_flags.define_model_flags()
flags.adopt_module_key_flags(method_flags)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sizes(max_nodes: int) -> list[int]:
    try:
        sizes = sorted({int(s) for s in FLAGS.sizes})
    except ValueError as e:
        raise common.UserError(f"--sizes must be integers, got {FLAGS.sizes}") from e
    if not sizes or sizes[0] < 1:
        raise common.UserError("--sizes must be positive node counts")
    if sizes[-1] > max_nodes:
        raise common.UserError(f"--sizes go up to {sizes[-1]} nodes, over --max_nodes "
                               f"{max_nodes}")
    return sizes


def _measure(loaded, drafter_for, prompts, sizes):
    """``{size: (tokens, seconds, target_calls)}``, size 0 = plain decoding. Every method is
    compiled first; then each prompt runs under every method back to back, so a change in the
    machine's speed (a shared CPU) hits all methods alike. Every output must equal plain
    decoding's."""
    from experiments.bench_runner import MethodRunner
    run = _plain_run()
    runners = {size: MethodRunner(run, loaded, drafter=None if size == 0 else drafter_for(size))
               for size in [0] + sizes}
    recs = {size: [] for size in runners}
    for i, ids in enumerate(prompts):
        for size, runner in runners.items():
            rec = runner(ids)
            if size and rec["generated_ids"] != recs[0][i]["generated_ids"]:
                raise SystemExit(f"error: the {size}-node tree changed the output of held-out "
                                 f"prompt {i}: a losslessness bug, please report it")
            recs[size].append(rec)
    results = {size: (sum(r["new_tokens"] for r in rs), sum(r["wall_s"] for r in rs),
                      sum(r["target_calls"] for r in rs)) for size, rs in recs.items()}
    ar_rate = results[0][0] / results[0][1]
    for size, (tok, wall, calls) in results.items():
        _say(f"  {'ar' if size == 0 else f'{size} nodes':>9}: {tok / wall:6.1f} tok/s, "
             f"tau {tok / calls:.2f}, {tok / wall / ar_rate:.2f}x")
    return results


DEFAULT_EAGLE_DEPTH = 5


def _plain_run():
    """The plain-decoding run trees are timed against (and the model load: --dtype and
    --attention reach the model through it)."""
    from experiments import methods
    from specjax import decode
    return methods.Run("ar", FLAGS.model, decode.DecodeConfig(max_new_tokens=FLAGS.max_new_tokens),
                       attention_impl=FLAGS.attention, dtype=FLAGS.dtype, weights=FLAGS.weights)


def _load(loaded, weights, **kwargs):
    """``(drafter, params)`` with ``--draft_vocab``: the generic tree or explicit choices."""
    if FLAGS.drafter == "eagle":
        from drafters import eagle_weights
        return eagle_weights.load_shipped(loaded, path=weights, draft_vocab=FLAGS.draft_vocab,
                                          **kwargs)
    if FLAGS.drafter == RECYCLING:
        from drafters import token_recycling
        drafter = token_recycling.TokenRecyclingDrafter.create(
            loaded.model.vocab_size, kwargs.get("choices"), _max_rank())
        return drafter, {"table": _recycling_table(loaded, drafter)}
    if FLAGS.drafter in CORPUS_DRAFTERS:  # the draft vocabulary is the weights' own map
        import importlib
        module = importlib.import_module(f"drafters.{FLAGS.drafter}")
        return module.load_shipped(loaded, path=weights, **kwargs)
    from drafters import head_weights
    return head_weights.load_shipped(FLAGS.drafter, loaded, path=weights,
                                     draft_vocab=FLAGS.draft_vocab, **kwargs)


def _max_rank() -> int:
    if FLAGS.max_rank is not None:
        return FLAGS.max_rank
    from drafters import token_recycling
    return token_recycling.DEFAULT_TOP_K if FLAGS.drafter == RECYCLING else 10


def _check_flags() -> float:
    """The flags that need no model; returns the held-out share."""
    corpus_drafter = FLAGS.drafter in CORPUS_DRAFTERS + (RECYCLING,)
    source, other = ("corpus_dir", "data_dir") if corpus_drafter else ("data_dir", "corpus_dir")
    if not getattr(FLAGS, source):
        what = "distillation corpus (build_corpus)" if corpus_drafter else \
            "training data (train_drafter)"
        raise common.UserError(f"--{source} is required for --drafter={FLAGS.drafter} (its "
                               f"{what})")
    if getattr(FLAGS, other):
        raise common.UserError(f"--{other} does not apply to --drafter={FLAGS.drafter}: use "
                               f"--{source}")
    if corpus_drafter and FLAGS.draft_vocab:
        raise common.UserError(f"--draft_vocab does not apply to --drafter={FLAGS.drafter}: it "
                               "drafts from its own vocabulary")
    fraction = FLAGS.eval_fraction
    if fraction is None:
        fraction = 0.5 if FLAGS.drafter == RECYCLING else 0.05 if corpus_drafter else 0.1
    if FLAGS.drafter != RECYCLING and not 0.0 < fraction <= 1.0:
        raise common.UserError("--eval_fraction must be in (0, 1] (1 = every record)")
    if FLAGS.drafter == RECYCLING and not 0.0 < fraction < 1.0:
        raise common.UserError("--eval_fraction must be in (0, 1): token_recycling builds its "
                               "table from the rest")
    return fraction


def _self_distilled_ranks(loaded, drafter, params, fraction):
    """``(ranks, depth, held-out prompts, description)`` from ``--data_dir``."""
    from drafters import distill, heads
    dirs = [d for d in FLAGS.data_dir.split(",") if d]
    records = distill.concat_records([distill.load_records(d, loaded.model) for d in dirs])
    held_out = (records if fraction >= 1.0 else  # data the drafter never trained on
                distill.split_records(records, fraction, FLAGS.seed)[1])
    if FLAGS.drafter == "eagle":
        from drafters import eagle_train
        depth = FLAGS.max_depth or DEFAULT_EAGLE_DEPTH
        data = eagle_train.window_dataset(held_out, FLAGS.seq_len)
        ranks = eagle_train.depth_ranks(drafter, params, loaded.params, data, depth)
    else:
        depth = FLAGS.max_depth or drafter.num_heads
        if depth > drafter.num_heads:
            raise common.UserError(f"--max_depth {depth} is over the {drafter.num_heads} heads")
        data = distill.position_dataset(held_out, drafter.num_heads)
        ranks = heads.true_ranks(drafter, params, loaded.params, data)
    prompts = [held_out.tokens[r, :held_out.prompt_lengths[r]].tolist()
               for r in range(min(FLAGS.measure_prompts, len(held_out)))]
    return ranks, depth, prompts, f"{len(held_out)} sequences"


def _corpus_ranks(loaded, drafter, params, fraction):
    """``(ranks, depth, held-out prompts, description)`` from ``--corpus_dir``: every
    held-out window through the trainer's ``depth_ranks``, one row per counted root."""
    import importlib
    import numpy as np
    from drafters import corpus as corpus_lib
    dirs = [d for d in FLAGS.corpus_dir.split(",") if d]
    try:
        data = corpus_lib.load(dirs, loaded.model, drafter.feature_layers)
    except corpus_lib.CorpusError as e:
        raise common.UserError(str(e)) from None
    held_out = data if fraction >= 1.0 else data.split(fraction, FLAGS.seed)[1]
    training = importlib.import_module(f"drafters.{FLAGS.drafter}_train")
    vocab_map = np.asarray(params["vocab_map"])
    if FLAGS.drafter == "eagle3":
        depth = FLAGS.max_depth or DEFAULT_EAGLE_DEPTH
        trainer = training.make_trainer(loaded, vocab_map, seq_len=FLAGS.seq_len,
                                        num_steps=depth, feature_layers=drafter.feature_layers)
        net = params
    else:
        depth = FLAGS.max_depth or drafter.block_size
        if depth > drafter.block_size:
            raise common.UserError(f"--max_depth {depth} is over the {drafter.block_size} slots "
                                   "of a block")
        trainer = training.make_trainer(
            loaded, vocab_map, seq_len=FLAGS.seq_len, anchors_per_seq=min(32, FLAGS.seq_len),
            block_size=drafter.block_size, num_layers=drafter.num_layers,
            feature_layers=drafter.feature_layers)
        net = params["net"]
    frozen = trainer.frozen(loaded.params)
    windows = held_out.windows(FLAGS.seq_len)
    rows, size = [], FLAGS.batch_size
    for s in range(0, len(windows), size):
        chunk = windows[s:s + size]
        keep = len(chunk)
        if keep < size:  # a fixed batch shape: repeat the last window, drop the repeats
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - keep, 0)])
        ranks = np.asarray(trainer.depth_ranks(net, held_out.batch(chunk, FLAGS.seq_len),
                                               frozen))[:keep, :, :depth]
        rows.append(ranks[ranks[..., 0] >= 0])
    ranks = np.concatenate(rows) if rows else np.zeros((0, depth), np.int32)
    prompts = [held_out.tokens[r, :held_out.prompt_lengths[r]].tolist()
               for r in range(min(FLAGS.measure_prompts, len(held_out)))]
    return ranks, depth, prompts, f"{len(held_out)} corpus records"


_RECYCLING_SPLIT = {}  # (train, held_out) Corpus pair, loaded once


def _recycling_split(loaded, fraction):
    """The corpus split: the table learns from the first part, the ranks and the timed prompts
    come from the held-out part (a table never built from the text it is measured on)."""
    if not _RECYCLING_SPLIT:
        from drafters import corpus as corpus_lib
        dirs = [d for d in FLAGS.corpus_dir.split(",") if d]
        try:
            data = corpus_lib.load(dirs, loaded.model)
        except corpus_lib.CorpusError as e:
            raise common.UserError(str(e)) from None
        if fraction >= 1.0:
            _RECYCLING_SPLIT.update(train=data.subset(slice(0, 0)), held_out=data)
        else:
            _RECYCLING_SPLIT.update(zip(("train", "held_out"), data.split(fraction, FLAGS.seed)))
    return _RECYCLING_SPLIT["train"], _RECYCLING_SPLIT["held_out"]


def _texts(records):
    return [records.tokens[r, :records.lengths[r]].tolist() for r in range(len(records))]


_RECYCLING_TABLE = {}


def _recycling_table(loaded, drafter):
    """The starting table of the tuning runs: built from the training part (cold with
    ``--eval_fraction=1``)."""
    if "table" not in _RECYCLING_TABLE:
        from drafters import token_recycling
        train, _ = _recycling_split(loaded, _check_flags())
        _RECYCLING_TABLE["table"] = token_recycling.table_from_text(
            loaded.model, loaded.params, _texts(train), drafter.top_k)
    return _RECYCLING_TABLE["table"]


def _recycling_ranks(loaded, drafter, params, fraction):
    """``(ranks, depth, held-out prompts, description)``: every held-out response read by the
    target, the table walked and updated as :func:`drafters.token_recycling.walk_ranks` says,
    each record starting from the training part's table (a request starts from the warm
    table)."""
    from drafters import token_recycling
    _, held_out = _recycling_split(loaded, fraction)
    depth = FLAGS.max_depth or DEFAULT_EAGLE_DEPTH
    texts = _texts(held_out)
    tops = token_recycling.text_top_k(loaded.model, loaded.params, texts, drafter.top_k)
    rows = []
    for r, (text, top) in enumerate(zip(texts, tops)):
        n = len(text)
        consistent = held_out.labels[r, :n - 1] == held_out.tokens[r, 1:n]
        start = max(int(held_out.prompt_lengths[r]), 0)
        rows.append(token_recycling.walk_ranks(np.array(params["table"]), text, top, start,
                                               depth, consistent))
    ranks = np.concatenate(rows) if rows else np.zeros((0, depth), np.int32)
    ranks = ranks[ranks[:, 0] >= 0]
    prompts = [held_out.tokens[r, :held_out.prompt_lengths[r]].tolist()
               for r in range(min(FLAGS.measure_prompts, len(held_out)))]
    return ranks, depth, prompts, f"{len(held_out)} corpus records"


def main(argv):
    common.start(argv)
    with common.user_errors():
        fraction = _check_flags()
        sizes = _sizes(FLAGS.max_nodes)
        if FLAGS.measure_prompts == 0 and not FLAGS.default_nodes:
            raise common.UserError("--measure_prompts=0 needs --default_nodes")
        if FLAGS.default_nodes > FLAGS.max_nodes:
            raise common.UserError("--default_nodes is over --max_nodes")
        if FLAGS.packed_default_nodes > FLAGS.max_nodes:
            raise common.UserError("--packed_default_nodes is over --max_nodes")
        common.check_outputs(FLAGS, "output")
        method_flags.model_config(FLAGS)  # an unknown or malformed model, before the load
        if FLAGS.corpus_dir:
            common.corpus_dirs(FLAGS.corpus_dir)  # before the slow load
        from drafters import head_weights
        from specjax import tree_tuning

        loaded = _plain_run().load()
        weights = FLAGS.drafter_weights or head_weights.shipped_path(FLAGS.drafter, loaded.name)
        output = FLAGS.output or head_weights.tree_file_of(weights)
        from specjax.files import check_writable
        check_writable(output, "the tree file")  # the default path too, before the long part
        try:
            drafter, params = _load(loaded, weights, tree="generic")
        except head_weights.HeadWeightsError as e:
            raise common.UserError(str(e)) from None
        t = time.time()
        find = _recycling_ranks if FLAGS.drafter == RECYCLING else \
            _corpus_ranks if FLAGS.drafter in CORPUS_DRAFTERS else _self_distilled_ranks
        ranks, depth, prompts, held_out = find(loaded, drafter, params, fraction)
        source = FLAGS.corpus_dir or FLAGS.data_dir
        if ranks.shape[0] == 0:
            raise common.UserError(f"{source} has no held-out response positions")
        order = tree_tuning.tuned_order(ranks, FLAGS.max_nodes, _max_rank(), depth)
        expected = tree_tuning.cumulative_expected(order, ranks)
        generic = [list(c) for c in drafter.tree.choice_of_node[1:]]  # with --draft_vocab
        generic_e = tree_tuning.expected_accepted(generic, ranks) \
            if drafter.tree.max_depth <= ranks.shape[1] else float("nan")
        _say(f"{FLAGS.drafter} (draft_vocab {FLAGS.draft_vocab or 'all'}): {ranks.shape[0]} "
             f"held-out positions ({held_out}),"
             f" ranks in {time.time() - t:.0f} s; expected accepted drafted tokens per round: "
             f"generic {len(generic)}-node tree {generic_e:.3f}; tuned "
             + ", ".join(f"{n}: {expected[n - 1]:.3f}" for n in sizes if n <= len(order)))
        if len(order) < sizes[-1]:
            raise common.UserError(f"only {len(order)} choices were ever hit on the held-out "
                                   f"data; use --sizes up to {len(order)}")
        measured = {}
        if FLAGS.measure_prompts:
            _say(f"timing {len(sizes)} sizes on {len(prompts)} held-out prompts x "
                 f"{FLAGS.max_new_tokens} tokens")
            measured = _measure(loaded, lambda n: _load(loaded, weights, choices=order[:n]),
                                prompts, sizes)
        if FLAGS.default_nodes:
            default_nodes = FLAGS.default_nodes
        else:
            ar_rate = measured[0][0] / measured[0][1]
            default_nodes = max(sizes, key=lambda n: measured[n][0] / measured[n][1])
            _say(f"best: {default_nodes} nodes, "
                 f"{measured[default_nodes][0] / measured[default_nodes][1] / ar_rate:.2f}x")
        info = {
            "drafter": FLAGS.drafter, "weights": os.path.basename(weights),
            "data_dir" if FLAGS.data_dir else "corpus_dir": source,
            "eval_fraction": fraction, "seed": FLAGS.seed,
            "held_out_positions": int(ranks.shape[0]), "max_rank": _max_rank(),
            "expected_accepted": [round(float(e), 4) for e in expected],
            "generic_expected_accepted": round(float(generic_e), 4),
            "measured": {str(n): {"tokens": tok, "wall_s": round(wall, 3), "target_calls": c}
                         for n, (tok, wall, c) in measured.items()},
            "measure_prompts": FLAGS.measure_prompts, "max_new_tokens": FLAGS.max_new_tokens,
            "command": "python -m experiments.tune_tree " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
        }
        info["weights_format"] = FLAGS.weights
        tree_tuning.save_tree_file(output, tree_tuning.TunedTree(
            tuple(order), default_nodes, FLAGS.draft_vocab, info, FLAGS.packed_default_nodes))
        _say(f"wrote {output}: {len(order)} choices, default {default_nodes} nodes: "
             f"{[list(c) for c in order[:default_nodes]]}"
             + (f"; {FLAGS.packed_default_nodes} for packed weights"
                if FLAGS.packed_default_nodes else ""))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
