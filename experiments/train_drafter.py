"""Train draft heads (blockwise / medusa / hydra) or the EAGLE layer on a frozen target by
self-distillation.

  python -m experiments.train_drafter --drafter=medusa --data_dir=/tmp/distill \
      --prompts=../shared/data/spec_bench/dev.jsonl --num_prompts=160 --steps=600 \
      --ckpt_dir=/tmp/ckpt_medusa --output=drafters/weights/smollm2-135m/medusa.safetensors

If ``--data_dir`` holds no data yet, it is generated first from ``--prompts`` (a Spec-Bench
jsonl, by default without the questions the benchmark measures: ``--spec_bench_split``; or a
text file; chat template applied), or with ``--from_corpus`` from a regenerated corpus
(``build_corpus --path=regenerated``: its prompts and the target's answers, only the forward
runs): the target's greedy responses plus its final-norm
hidden states (``drafters/distill.py``). Then the heads train on the target's own next tokens
(AdamW, warmup + cosine, gradient clipping), checkpointing every ``--ckpt_every`` steps to
``--ckpt_dir`` (an interrupted run resumes from there with the same flags), printing per-head
top-1 accuracy on held-out sequences every ``--eval_every`` steps, and finally writing the bf16
head weights (no embedding / LM head) to ``--output``.

``--drafter=eagle`` trains the one-layer EAGLE drafter (``drafters/eagle.py``) on right-aligned
windows of ``--seq_len`` pairs, ``--batch_size`` sequences per step (default 8), with feature
regression plus ``--ce_weight`` x token cross-entropy at ``--levels`` levels of self-fed
features (``drafters/eagle_train.py``); the evaluation prints per-depth top-1 accuracy with the
drafter feeding its own features, as at decode time.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from experiments import common, method_flags, spec_bench

FLAGS = flags.FLAGS
flags.DEFINE_enum("drafter", "medusa", ["blockwise", "medusa", "hydra", "eagle"],
                  "Drafter type.")
flags.DEFINE_string("model", "smollm2-135m", "Target: registry name, HF directory or .gguf.")
flags.DEFINE_string("data_dir", None, "Self-distillation data directory (created from --prompts "
                    "if empty), or several, comma-separated, trained on together.")
flags.DEFINE_string("prompts", None, "Spec-Bench jsonl or text file used to create --data_dir.")
flags.DEFINE_string("from_corpus", None, "Create --data_dir from a regenerated corpus "
                    "(build_corpus --path=regenerated) instead of --prompts: its prompts and the "
                    "target's answers, one forward each, nothing generated again.")
flags.DEFINE_integer("num_prompts", 160, "Prompts used to create the data.", lower_bound=1)
flags.DEFINE_integer("prompt_offset", 0, "Skip this many prompts of --prompts first.",
                     lower_bound=0)
flags.DEFINE_integer("max_new_tokens", 128, "Response tokens generated per prompt.",
                     lower_bound=1)
flags.DEFINE_integer("gen_batch_size", 16, "Rows per generate call when creating the data.",
                     lower_bound=1)
flags.DEFINE_integer("max_prompt_len", 256, "Skip longer prompts when creating the data.",
                     lower_bound=1)
flags.DEFINE_enum("data_dtype", "bfloat16", ["bfloat16", "float32"], "Stored hidden dtype.")
method_flags.define_model_flags()
spec_bench.define_split_flags()
flags.adopt_module_key_flags(method_flags)
flags.DEFINE_integer("num_heads", 0, "Heads (0 = the drafter's default: 4 blockwise, 3 else).",
                     lower_bound=0)
flags.DEFINE_integer("num_layers", 1, "Residual blocks per head (blockwise: FFN width / E).",
                     lower_bound=1)
flags.DEFINE_integer("steps", 600, "Optimizer steps.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Positions per step (heads); sequences per step for "
                     "eagle (default 8 there).", lower_bound=1)
flags.DEFINE_float("lr", 1e-3, "Peak learning rate.", lower_bound=0.0)
flags.DEFINE_integer("warmup", 50, "Linear warmup steps.", lower_bound=0)
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.", lower_bound=0.0)
flags.DEFINE_float("loss_decay", 0.8, "Head k's loss weight is loss_decay ** k.")
flags.DEFINE_integer("seed", 0, "Init and data-order seed.")
flags.DEFINE_string("ckpt_dir", None, "Orbax checkpoints (resumed from when present).")
flags.DEFINE_integer("ckpt_every", 100, "Checkpoint every N steps (0 = only at the end).",
                     lower_bound=0)
flags.DEFINE_integer("eval_every", 100, "Held-out per-head accuracy every N steps.",
                     lower_bound=0)
flags.DEFINE_float("eval_fraction", 0.1, "Held-out share of the sequences.")
flags.DEFINE_string("output", None, "Final bf16 head weights (.safetensors).")
flags.DEFINE_string("metrics_json", None, "Write the eval history and final accuracy here.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_integer("seq_len", 256, "eagle: pairs per training window.", lower_bound=2)
flags.DEFINE_integer("levels", 3, "eagle: self-fed feature levels in the loss.", lower_bound=1)
flags.DEFINE_integer("eval_levels", 4, "eagle: draft depths evaluated.", lower_bound=1)
flags.DEFINE_float("ce_weight", 0.1, "eagle: token loss weight (regression weight 1).")
flags.DEFINE_float("level_decay", 0.8, "eagle: level m's loss weight is level_decay ** m.")
flags.DEFINE_integer("ce_window", 128, "eagle: token loss on the last N slots of a window.",
                     lower_bound=1)

DEFAULT_HEADS = {"blockwise": 4, "medusa": 3, "hydra": 3}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data_dirs() -> list[str]:
    """``--data_dir`` as a list (comma-separated directories are trained on together)."""
    return [d for d in FLAGS.data_dir.split(",") if d]


def _data_from_corpus(loaded, data_dir: str):
    from drafters import corpus, distill
    try:
        prompts, responses, m = corpus.read_answers(FLAGS.from_corpus)
    except corpus.CorpusError as e:
        raise common.UserError(f"--from_corpus: {e}") from None
    if m.get("model") and m["model"] != loaded.name:
        raise common.UserError(f"--from_corpus {FLAGS.from_corpus} holds {m['model']}'s answers, "
                               f"not {loaded.name}'s")
    _say(f"creating self-distillation data in {data_dir} from the {len(prompts)} answers of "
         f"{FLAGS.from_corpus}")
    t = time.time()
    manifest = distill.distill(
        loaded.model, loaded.params, prompts, data_dir, batch_size=FLAGS.gen_batch_size,
        eos_ids=loaded.tokenizer.eos_ids if loaded.tokenizer else (), dtype=FLAGS.data_dtype,
        max_prompt_len=FLAGS.max_prompt_len, model_name=loaded.name,
        max_new_tokens=max(len(r) for r in responses),
        source=f"{FLAGS.from_corpus} ({m.get('source')})", progress=FLAGS.progress,
        responses=responses)
    _say(f"  {manifest['num_records']} sequences ({manifest['skipped_long_prompts']} long "
         f"prompts skipped) in {time.time() - t:.0f} s")


def _make_data(loaded, data_dir: str):
    from drafters import distill
    if FLAGS.from_corpus:
        return _data_from_corpus(loaded, data_dir)
    if not FLAGS.prompts:
        raise common.UserError(f"--data_dir {data_dir!r} holds no data: pass --prompts (or "
                               "--from_corpus) to create it")
    if loaded.tokenizer is None:
        raise common.UserError(f"model {FLAGS.model!r} has no tokenizer to encode --prompts")
    try:
        texts, described = spec_bench.training_texts(FLAGS.prompts, FLAGS.num_prompts,
                                                     FLAGS.prompt_offset, FLAGS)
    except (OSError, ValueError) as e:
        raise common.UserError(str(e)) from None
    ids = spec_bench.encode_prompts(loaded.tokenizer, texts)
    _say(f"creating self-distillation data in {data_dir}: {len(ids)} prompts x "
         f"{FLAGS.max_new_tokens} tokens")
    t = time.time()
    manifest = distill.distill(
        loaded.model, loaded.params, ids, data_dir, max_new_tokens=FLAGS.max_new_tokens,
        batch_size=FLAGS.gen_batch_size, eos_ids=loaded.tokenizer.eos_ids,
        dtype=FLAGS.data_dtype, max_prompt_len=FLAGS.max_prompt_len, model_name=loaded.name,
        source=f"{described} offset={FLAGS.prompt_offset} n={FLAGS.num_prompts}",
        progress=FLAGS.progress)
    _say(f"  {manifest['num_records']} sequences ({manifest['skipped_long_prompts']} long "
         f"prompts skipped) in {time.time() - t:.0f} s")


def _run_training(loaded, drafter, state, step_fn, get_batch, eval_fn, log_fn, meta):
    """The shared loop: checkpoints / resume, periodic evaluation; returns (state, wall_s)."""
    state, _, wall = common.run_training(FLAGS, state, step_fn, get_batch, loaded.params, meta,
                                         eval_fn, log_fn)
    return state, wall


def _train_eagle(loaded, records, train_rec, eval_rec):
    import jax
    from drafters import eagle, eagle_train, eagle_weights
    from specjax import train
    drafter = eagle.EagleDrafter.create(loaded.model)
    train_data = eagle_train.window_dataset(train_rec, FLAGS.seq_len)
    eval_data = eagle_train.window_dataset(eval_rec, FLAGS.seq_len)
    n = len(train_rec)
    if n == 0 or not eval_data["label_mask"].any() or not train_data["label_mask"].any():
        raise common.UserError(f"{FLAGS.data_dir} has too few response tokens to train on")
    batch_size = FLAGS.batch_size if FLAGS["batch_size"].present else 8
    _say(f"eagle: one layer, {FLAGS.levels} levels; {n} training sequences "
         f"({int(train_data['label_mask'].sum())} labelled positions), {len(eval_rec)} held out "
         f"({int(eval_data['label_mask'].sum())})")
    tx = train.make_optimizer(FLAGS.lr, FLAGS.warmup, FLAGS.steps, FLAGS.weight_decay)
    state = train.TrainState.create(drafter.init_params(jax.random.key(FLAGS.seed)), tx)
    step_fn = train.make_train_step(eagle_train.make_loss_fn(
        drafter, FLAGS.levels, FLAGS.ce_weight, FLAGS.level_decay, FLAGS.ce_window), tx)

    def get_batch(step):
        idx = train.batch_indices(FLAGS.seed, step, n, batch_size)
        return {k: v[idx] for k, v in train_data.items()}

    history = []

    def eval_fn(st):
        acc = eagle_train.depth_accuracy(drafter, st.params, loaded.params, eval_data,
                                         FLAGS.eval_levels)
        return {f"eval_acc_{k}": float(a) for k, a in enumerate(acc)}

    def log_fn(step, metrics):
        history.append({"step": step, **metrics})
        accs = " ".join(f"{metrics[f'eval_acc_{k}']:.3f}" for k in range(FLAGS.eval_levels))
        _say(f"step {step}: loss {metrics['loss']:.3f} (reg {metrics['reg_0']:.3f}, ce "
             f"{metrics['ce_0']:.3f})  held-out top-1 per depth: {accs}")

    meta = {**drafter.config_dict(), "model": loaded.name, "seed": FLAGS.seed,
            "batch_size": batch_size, "lr": FLAGS.lr, "warmup": FLAGS.warmup,
            "steps": FLAGS.steps, "data_dir": ",".join(os.path.abspath(d) for d in _data_dirs()),
            "seq_len": FLAGS.seq_len, "levels": FLAGS.levels, "ce_weight": FLAGS.ce_weight,
            "level_decay": FLAGS.level_decay, "ce_window": FLAGS.ce_window}
    state, wall = _run_training(loaded, drafter, state, step_fn, get_batch, eval_fn, log_fn,
                                meta)
    acc = eagle_train.depth_accuracy(drafter, state.params, loaded.params, eval_data,
                                     FLAGS.eval_levels)
    _say(f"done: {int(state.step)} steps in {wall:.0f} s; held-out top-1 per depth: "
         + " ".join(f"{a:.3f}" for a in acc))
    summary = {"drafter": "eagle", "steps": int(state.step), "train_wall_s": wall,
               "held_out_top1": [float(a) for a in acc], "history": history,
               "train_sequences": n, "held_out_sequences": len(eval_rec),
               "held_out_positions": int(eval_data["label_mask"].sum()),
               "data": records.manifest.get("source")}
    if FLAGS.output:
        eagle_weights.save_weights(FLAGS.output, drafter, state.params, target_name=loaded.name,
                           extra={k: summary[k] for k in ("steps", "held_out_top1", "data")})
        _say(f"wrote {FLAGS.output} ({os.path.getsize(FLAGS.output) / 1e6:.1f} MB)")
    if FLAGS.metrics_json:
        common.write_json_atomic(FLAGS.metrics_json, summary)
    print(json.dumps({k: summary[k] for k in ("drafter", "steps", "held_out_top1")}))


def main(argv):
    common.start(argv, quiet=False)
    with common.user_errors():
        if not FLAGS.data_dir:
            raise common.UserError("--data_dir is required")
        if not 0.0 < FLAGS.eval_fraction < 1.0:
            raise common.UserError("--eval_fraction must be in (0, 1)")
        common.check_outputs(FLAGS, "output", dirs=("ckpt_dir",) if FLAGS.ckpt_dir else ())
        method_flags.model_config(FLAGS)  # an unknown or malformed model, before the load
        import jax
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

        from drafters import distill, head_weights, heads
        from specjax import train

        dirs = _data_dirs()
        if FLAGS.from_corpus and (len(dirs) != 1 or os.path.exists(
                os.path.join(dirs[0], distill.MANIFEST))):
            raise common.UserError("--from_corpus creates one new --data_dir: give a single "
                                   "directory that holds no data yet")
        loaded = method_flags.load_model(FLAGS)
        if len(dirs) == 1 and not os.path.exists(os.path.join(dirs[0], distill.MANIFEST)):
            _make_data(loaded, dirs[0])
        records = distill.concat_records([distill.load_records(d, loaded.model) for d in dirs])
        train_rec, eval_rec = distill.split_records(records, FLAGS.eval_fraction, FLAGS.seed)
        if FLAGS.drafter == "eagle":
            return _train_eagle(loaded, records, train_rec, eval_rec)
        num_heads = FLAGS.num_heads or DEFAULT_HEADS[FLAGS.drafter]
        drafter = head_weights.drafter_class(FLAGS.drafter).create(
            loaded.model, num_heads=num_heads, num_layers=FLAGS.num_layers)
        train_data = distill.position_dataset(train_rec, num_heads)
        eval_data = distill.position_dataset(eval_rec, num_heads)
        n = train_data["hidden"].shape[0]
        if n == 0 or eval_data["hidden"].shape[0] == 0:
            raise common.UserError(f"{FLAGS.data_dir} has too few response tokens to train on")
        _say(f"{FLAGS.drafter}: {num_heads} heads, tree of {drafter.tree.num_nodes} nodes; "
             f"{n} training positions ({len(train_rec)} seqs), "
             f"{eval_data['hidden'].shape[0]} held-out ({len(eval_rec)} seqs)")

        tx = train.make_optimizer(FLAGS.lr, FLAGS.warmup, FLAGS.steps, FLAGS.weight_decay)
        state = train.TrainState.create(drafter.init_params(jax.random.key(FLAGS.seed)), tx)
        step_fn = train.make_train_step(heads.make_loss_fn(drafter, FLAGS.loss_decay), tx)

        def get_batch(step):
            idx = train.batch_indices(FLAGS.seed, step, n, FLAGS.batch_size)
            return {k: v[idx] for k, v in train_data.items()}

        history = []

        def eval_fn(st):
            acc = heads.head_accuracy(drafter, st.params, loaded.params, eval_data)
            return {f"eval_acc_{k}": float(a) for k, a in enumerate(acc)}

        def log_fn(step, metrics):
            history.append({"step": step, **metrics})
            accs = " ".join(f"{metrics[f'eval_acc_{k}']:.3f}" for k in range(num_heads))
            _say(f"step {step}: loss {metrics['loss']:.3f}  held-out top-1 per head: {accs}")

        meta = {**drafter.config_dict(), "model": loaded.name, "seed": FLAGS.seed,
                "batch_size": FLAGS.batch_size, "lr": FLAGS.lr, "warmup": FLAGS.warmup,
                "steps": FLAGS.steps,
                "data_dir": ",".join(os.path.abspath(d) for d in _data_dirs())}
        state, wall = _run_training(loaded, drafter, state, step_fn, get_batch, eval_fn,
                                    log_fn, meta)
        acc = heads.head_accuracy(drafter, state.params, loaded.params, eval_data)
        _say(f"done: {int(state.step)} steps in {wall:.0f} s; held-out top-1 per head: "
             + " ".join(f"{a:.3f}" for a in acc))
        summary = {"drafter": FLAGS.drafter, "steps": int(state.step), "train_wall_s": wall,
                   "held_out_top1": [float(a) for a in acc], "history": history,
                   "train_positions": int(n), "held_out_positions":
                   int(eval_data["hidden"].shape[0]), "data": records.manifest.get("source")}
        if FLAGS.output:
            head_weights.save_weights(FLAGS.output, drafter, state.params, target_name=loaded.name,
                               extra={k: summary[k] for k in ("steps", "held_out_top1",
                                                              "data")})
            _say(f"wrote {FLAGS.output} ({os.path.getsize(FLAGS.output) / 1e6:.1f} MB)")
        if FLAGS.metrics_json:
            common.write_json_atomic(FLAGS.metrics_json, summary)
        print(json.dumps({k: summary[k] for k in ("drafter", "steps", "held_out_top1")}))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
