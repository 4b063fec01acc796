"""Train a feature drafter (``eagle3``, ``block_diffusion``) on a distillation corpus.

  python -m experiments.train_corpus_drafter --drafter=eagle3 \
      --corpus_dir=/work/corpus/sharegpt-tf-0 --steps=2000 --ckpt_dir=/work/ckpt/eagle3 \
      --output=drafters/weights/smollm2-135m/eagle3.safetensors

The corpus (``experiments/build_corpus.py``, format in ``drafters/corpus.py``) holds the
target's greedy labels and the taps of the drafter's ``feature_layers``. The draft vocabulary
is the ``--draft_vocab`` most frequent labels of the training records
(``drafters/draft_vocab.py``). Records are split into training and held-out ones
(``--eval_fraction``, seeded); every ``--eval_every`` steps the held-out top-1 accuracy per
draft depth is printed (the drafter's own earlier predictions fed back, as when decoding).
Training checkpoints every ``--ckpt_every`` steps to ``--ckpt_dir``: an interrupted run (Ctrl-C,
SIGTERM, a kill) resumes there when rerun with the same flags. The end writes the bf16 weights
(``--output``) and a summary with the training throughput (``--metrics_json``).

Several corpora train together (``--corpus_dir=a,b,c``): ``--corpus_weights=4,2,1`` repeats
each one's windows per epoch, ``--max_record_len`` keeps the last N positions of longer records
(a corpus of long prompts would widen every record in memory), and the held-out accuracy is
printed per directory. ``--init_weights`` starts from trained weights of the same drafter (a
fine-tune; their draft vocabulary is kept).

Each drafter's training is ``drafters/<name>_train.py``: ``make_trainer(target, vocab_map,
**options)``; ``--trainer_options=key=value,...`` passes its own options (e.g.
``block_size=8``; a list inside a value takes colons: ``feature_layers=2:15:27``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from absl import app, flags

from experiments import common, method_flags

DRAFTERS = ("eagle3", "block_diffusion")

FLAGS = flags.FLAGS
flags.DEFINE_enum("drafter", None, list(DRAFTERS), "The drafter to train.")
flags.DEFINE_string("model", "smollm2-135m", "Target: registry name, HF directory or .gguf.")
flags.DEFINE_string("corpus_dir", None, "Corpus directories, comma-separated.")
flags.DEFINE_integer("draft_vocab", 8192, "Draft vocabulary: the N most frequent labels.",
                     lower_bound=1)
flags.DEFINE_string("trainer_options", "", "The drafter's own training options, "
                    "comma-separated key=value (see drafters/<drafter>_train.py).")
flags.DEFINE_list("corpus_weights", [], "Times each --corpus_dir's windows appear per epoch "
                  "(integers, one per directory; default 1 each): weight a small regenerated "
                  "corpus up against a large teacher-forced one.")
flags.DEFINE_integer("max_record_len", 0, "Keep only the last N positions of longer records "
                     "(0 = all): corpora of long prompts widen every record in memory.",
                     lower_bound=0)
flags.DEFINE_string("init_weights", None, "Start from these weights of the same drafter "
                    "(.safetensors, e.g. the shipped ones) instead of a fresh init; their draft "
                    "vocabulary is kept (--draft_vocab is then ignored).")
flags.DEFINE_integer("steps", 1000, "Optimizer steps.", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Windows per step.", lower_bound=1)
flags.DEFINE_float("lr", 1e-3, "Peak learning rate.", lower_bound=0.0)
flags.DEFINE_integer("warmup", 100, "Linear warmup steps.", lower_bound=0)
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.", lower_bound=0.0)
flags.DEFINE_integer("seed", 0, "Init, split and data-order seed.")
flags.DEFINE_float("eval_fraction", 0.05, "Held-out share of the records.")
flags.DEFINE_integer("eval_windows", 32, "Held-out windows evaluated per corpus directory "
                     "(at most).", lower_bound=1)
flags.DEFINE_string("ckpt_dir", None, "Orbax checkpoints (resumed from when present).")
flags.DEFINE_integer("ckpt_every", 200, "Checkpoint every N steps (0 = only at the end).",
                     lower_bound=0)
flags.DEFINE_integer("eval_every", 200, "Held-out accuracy every N steps (0 = at the end).",
                     lower_bound=0)
flags.DEFINE_string("output", None, "Final bf16 weights (.safetensors).")
flags.DEFINE_string("metrics_json", None, "Eval history, accuracy and throughput (JSON).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
method_flags.define_model_flags()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def trainer_options(text: str) -> dict:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}``; UserError on a malformed entry."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise common.UserError(f"--trainer_options entry {item!r} is not key=value")
        out[key.strip()] = _value(value.strip())
    return out


def _hits(trainer, params, frozen, corpus, windows, seq_len):
    """``(hits, counts)`` per draft depth over ``windows``."""
    import numpy as np
    hits = counts = 0
    for s in range(0, len(windows), FLAGS.batch_size):
        chunk = windows[s:s + FLAGS.batch_size]
        keep = len(chunk)
        if keep < FLAGS.batch_size:  # a fixed batch shape: repeat, then mask the repeats
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], FLAGS.batch_size - keep, 0)])
        batch = corpus.batch(chunk, seq_len)
        batch["label_mask"][keep:] = False
        h, c = trainer.depth_hits(params, batch, frozen)
        hits, counts = hits + np.asarray(h), counts + np.asarray(c)
    return hits, counts


def _eval_windows(eval_set, seq_len: int, num_dirs: int) -> list:
    """Up to ``--eval_windows`` held-out windows of each corpus directory (a list per
    directory; empty for a directory with no held-out record)."""
    windows = eval_set.windows(seq_len)
    origin = eval_set.origin[windows[:, 0]]
    return [windows[origin == k][:FLAGS.eval_windows] for k in range(num_dirs)]


def _accuracy(trainer, params, frozen, eval_set, groups, seq_len) -> tuple:
    """``(top-1 per depth over every group, [top-1 per depth of each group or None])``."""
    import numpy as np
    total_h = total_c = 0
    per_dir = []
    for windows in groups:
        if not len(windows):
            per_dir.append(None)
            continue
        h, c = _hits(trainer, params, frozen, eval_set, windows, seq_len)
        total_h, total_c = total_h + h, total_c + c
        per_dir.append([float(a) for a in h / np.maximum(c, 1)])
    return [float(a) for a in total_h / np.maximum(total_c, 1)], per_dir


def _accuracy_text(overall, per_dir) -> str:
    text = " ".join(f"{a:.3f}" for a in overall)
    if len(per_dir) > 1:
        text += "  (by corpus: " + " | ".join(
            "-" if a is None else " ".join(f"{x:.3f}" for x in a) for a in per_dir) + ")"
    return text


def main(argv):
    common.start(argv, quiet=False)
    with common.user_errors():
        if not FLAGS.drafter:
            raise common.UserError(f"--drafter is required: one of {', '.join(DRAFTERS)}")
        if not FLAGS.corpus_dir:
            raise common.UserError("--corpus_dir is required (build one with python -m "
                                   "experiments.build_corpus)")
        if not 0.0 < FLAGS.eval_fraction < 1.0:
            raise common.UserError("--eval_fraction must be in (0, 1)")
        options = trainer_options(FLAGS.trainer_options)
        common.check_outputs(FLAGS, "output", "metrics_json",
                             dirs=("ckpt_dir",) if FLAGS.ckpt_dir else ())
        repeats = common.corpus_weights(FLAGS.corpus_weights,
                                        len([d for d in FLAGS.corpus_dir.split(",") if d]))
        init_map = None
        if FLAGS.init_weights:
            from drafters import head_weights as hw
            try:
                init_map = hw.read_vocab_map(FLAGS.init_weights, FLAGS.drafter)
            except hw.HeadWeightsError as e:
                raise common.UserError(f"--init_weights: {e}") from None
        dirs = common.corpus_dirs(FLAGS.corpus_dir)
        from drafters import corpus as corpus_lib
        method_flags.model_config(FLAGS)
        import jax
        import numpy as np
        from absl import logging
        logging.set_verbosity(logging.WARNING)
        from drafters import draft_vocab, head_weights
        from specjax import train

        loaded = method_flags.load_model(FLAGS)
        module = importlib.import_module(f"drafters.{FLAGS.drafter}")
        training = importlib.import_module(f"drafters.{FLAGS.drafter}_train")
        try:
            data = corpus_lib.load(dirs, loaded.model, max_len=FLAGS.max_record_len or None)
        except corpus_lib.CorpusError as e:
            raise common.UserError(str(e)) from None
        train_set, eval_set = data.split(FLAGS.eval_fraction, FLAGS.seed)
        col = np.arange(train_set.tokens.shape[1])[None, :]
        mask = (col >= train_set.prompt_lengths[:, None] - 1) & (col < train_set.lengths[:, None])
        vocab_map = (init_map if init_map is not None else
                     draft_vocab.frequent_ids(train_set.labels, mask, FLAGS.draft_vocab,
                                              loaded.model.vocab_size))
        try:
            trainer = training.make_trainer(loaded, vocab_map, **options)
        except (TypeError, ValueError) as e:
            raise common.UserError(f"--trainer_options: {e}") from None
        layers = tuple(trainer.drafter.feature_layers)
        if tuple(data.layers) != layers:
            raise common.UserError(f"the corpus holds the taps of layers {list(data.layers)}, "
                                   f"{FLAGS.drafter} reads {list(layers)}: rebuild it with "
                                   f"--layers={','.join(map(str, layers))}")
        seq_len = trainer.seq_len
        train_windows = train_set.windows(seq_len)
        if repeats is not None:
            train_windows = np.repeat(train_windows, np.asarray(repeats)[
                train_set.origin[train_windows[:, 0]]], axis=0)
        eval_groups = _eval_windows(eval_set, seq_len, len(dirs))
        if not len(train_windows) or not any(len(g) for g in eval_groups):
            raise common.UserError(f"{FLAGS.corpus_dir} has too few records to train on")
        cover = draft_vocab.coverage(vocab_map, train_set.labels, mask)
        _say(f"{FLAGS.drafter}: {len(train_set)} training records ({len(train_windows)} windows "
             f"of {seq_len}{', weighted ' + ','.join(map(str, repeats)) if repeats else ''}), "
             f"{len(eval_set)} held out; draft vocabulary {len(vocab_map)} covers {cover:.1%} "
             "of the training labels" + (f" (from {FLAGS.init_weights})" if init_map is not None
                                         else ""))

        frozen = trainer.frozen(loaded.params)
        tx = train.make_optimizer(FLAGS.lr, FLAGS.warmup, FLAGS.steps, FLAGS.weight_decay)
        if FLAGS.init_weights:
            try:
                start = trainer.trainable_params(module.load_weights(
                    FLAGS.init_weights, trainer.drafter, dtype="float32"))
            except head_weights.HeadWeightsError as e:
                raise common.UserError(f"--init_weights: {e}") from None
        else:
            start = trainer.init_params(jax.random.key(FLAGS.seed))
        state = train.TrainState.create(start, tx)
        step_fn = train.make_train_step(trainer.loss_fn, tx)
        n = len(train_windows)

        def get_batch(step):
            idx = train.batch_indices(FLAGS.seed, step, n, FLAGS.batch_size)
            # The step lets a drafter vary what it draws from a window (anchors) across epochs.
            return {**train_set.batch(train_windows[idx], seq_len), "step": np.int32(step)}

        history = []

        def eval_fn(st):
            overall, per_dir = _accuracy(trainer, st.params, frozen, eval_set, eval_groups,
                                         seq_len)
            out = {f"eval_acc_{k + 1}": a for k, a in enumerate(overall)}
            for d, accs in enumerate(per_dir):
                out.update({f"eval_acc_{k + 1}_corpus{d}": a for k, a in enumerate(accs or [])})
            return out

        def log_fn(step, metrics):
            history.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
            depths = sorted(int(k.split("_")[2]) for k in metrics
                            if k.startswith("eval_acc_") and "corpus" not in k)
            overall = [float(metrics[f"eval_acc_{k}"]) for k in depths]
            per_dir = [[float(metrics[f"eval_acc_{k}_corpus{d}"]) for k in depths]
                       if f"eval_acc_1_corpus{d}" in metrics else None for d in range(len(dirs))]
            _say(f"step {step}: loss {float(metrics['loss']):.3f}  held-out top-1 per depth: "
                 + _accuracy_text(overall, per_dir))

        meta = {"drafter": FLAGS.drafter, "model": loaded.name, "seed": FLAGS.seed,
                "batch_size": FLAGS.batch_size, "lr": FLAGS.lr, "warmup": FLAGS.warmup,
                "steps": FLAGS.steps, "draft_vocab": FLAGS.draft_vocab, "options": options,
                "corpus": ",".join(os.path.abspath(d) for d in dirs),
                "corpus_weights": repeats, "max_record_len": FLAGS.max_record_len,
                "init_weights": os.path.abspath(FLAGS.init_weights) if FLAGS.init_weights
                else None}
        state, start_step, wall = common.run_training(FLAGS, state, step_fn, get_batch, frozen,
                                                      meta, eval_fn, log_fn)
        steps_run = int(state.step) - start_step
        positions = steps_run * FLAGS.batch_size * seq_len
        acc, acc_by_dir = _accuracy(trainer, state.params, frozen, eval_set, eval_groups,
                                    seq_len)
        _say(f"done: {int(state.step)} steps ({steps_run} here) in {wall:.0f} s, "
             f"{positions / max(wall, 1e-9):.0f} window positions/s; held-out top-1 per depth: "
             + _accuracy_text(acc, acc_by_dir))
        summary = {"drafter": FLAGS.drafter, "steps": int(state.step), "train_wall_s": wall,
                   "window_positions_per_s": positions / max(wall, 1e-9),
                   "held_out_top1": acc, "held_out_top1_by_corpus": acc_by_dir,
                   "draft_vocab": FLAGS.draft_vocab,
                   "draft_vocab_coverage": cover, "history": history,
                   "train_records": len(train_set), "held_out_records": len(eval_set),
                   "train_windows": len(train_windows), "corpus_weights": repeats,
                   "init_weights": FLAGS.init_weights,
                   "options": options, "corpus": data.manifest.get("sources")}
        if FLAGS.output:
            dparams = trainer.decode_params(state.params, vocab_map)
            module.save_weights(FLAGS.output, trainer.drafter, dparams, target_name=loaded.name,
                                extra={k: summary[k] for k in ("steps", "held_out_top1",
                                                               "draft_vocab", "options")})
            _say(f"wrote {FLAGS.output} ({os.path.getsize(FLAGS.output) / 1e6:.1f} MB)")
        if FLAGS.metrics_json:
            common.write_json_atomic(FLAGS.metrics_json, summary)
        print(json.dumps({k: summary[k] for k in ("drafter", "steps", "held_out_top1",
                                                  "window_positions_per_s")}))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
