"""Train draft heads (blockwise / medusa / hydra) on a frozen target by self-distillation.

  python -m experiments.train_drafter --drafter=medusa --data_dir=/tmp/distill \
      --prompts=../shared/data/spec_bench/dev.jsonl --num_prompts=160 --steps=600 \
      --ckpt_dir=/tmp/ckpt_medusa --output=drafters/weights/smollm2-135m/medusa.safetensors

If ``--data_dir`` holds no data yet, it is generated first from ``--prompts`` (a Spec-Bench
jsonl or a text file, chat template applied): the target's greedy responses plus its final-norm
hidden states (``drafters/distill.py``). Then the heads train on the target's own next tokens
(AdamW, warmup + cosine, gradient clipping), checkpointing every ``--ckpt_every`` steps to
``--ckpt_dir`` (an interrupted run resumes from there with the same flags), printing per-head
top-1 accuracy on held-out sequences every ``--eval_every`` steps, and finally writing the bf16
head weights (no embedding / LM head) to ``--output``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("drafter", "medusa", ["blockwise", "medusa", "hydra"], "Head drafter type.")
flags.DEFINE_string("model", "smollm2-135m", "Target: registry name, HF directory or .gguf.")
flags.DEFINE_string("data_dir", None, "Self-distillation data directory (created if empty).")
flags.DEFINE_string("prompts", None, "Spec-Bench jsonl or text file used to create --data_dir.")
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
flags.DEFINE_integer("num_heads", 0, "Heads (0 = the drafter's default: 4 blockwise, 3 else).",
                     lower_bound=0)
flags.DEFINE_integer("num_layers", 1, "Residual blocks per head (blockwise: FFN width / E).",
                     lower_bound=1)
flags.DEFINE_integer("steps", 600, "Optimizer steps.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Positions per step.", lower_bound=1)
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

DEFAULT_HEADS = {"blockwise": 4, "medusa": 3, "hydra": 3}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _make_data(loaded, data_dir: str):
    from drafters import distill
    if not FLAGS.prompts:
        raise common.UserError(f"--data_dir {data_dir!r} holds no data: pass --prompts to "
                               "create it")
    if loaded.tokenizer is None:
        raise common.UserError(f"model {FLAGS.model!r} has no tokenizer to encode --prompts")
    texts = distill.read_prompt_texts(FLAGS.prompts, FLAGS.num_prompts, FLAGS.prompt_offset)
    ids = distill.encode_prompts(loaded.tokenizer, texts)
    _say(f"creating self-distillation data in {data_dir}: {len(ids)} prompts x "
         f"{FLAGS.max_new_tokens} tokens")
    t = time.time()
    manifest = distill.distill(
        loaded.model, loaded.params, ids, data_dir, max_new_tokens=FLAGS.max_new_tokens,
        batch_size=FLAGS.gen_batch_size, eos_ids=loaded.tokenizer.eos_ids,
        dtype=FLAGS.data_dtype, max_prompt_len=FLAGS.max_prompt_len, model_name=loaded.name,
        source=f"{FLAGS.prompts} offset={FLAGS.prompt_offset} n={FLAGS.num_prompts}",
        progress=FLAGS.progress)
    _say(f"  {manifest['num_records']} sequences ({manifest['skipped_long_prompts']} long "
         f"prompts skipped) in {time.time() - t:.0f} s")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with common.user_errors():
        if not FLAGS.data_dir:
            raise common.UserError("--data_dir is required")
        if not 0.0 < FLAGS.eval_fraction < 1.0:
            raise common.UserError("--eval_fraction must be in (0, 1)")
        import jax
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

        from drafters import distill, heads
        from models import registry
        from specjax import train

        loaded = registry.load(FLAGS.model)
        if not os.path.exists(os.path.join(FLAGS.data_dir, distill.MANIFEST)):
            _make_data(loaded, FLAGS.data_dir)
        records = distill.load_records(FLAGS.data_dir, loaded.model)
        train_rec, eval_rec = distill.split_records(records, FLAGS.eval_fraction, FLAGS.seed)
        num_heads = FLAGS.num_heads or DEFAULT_HEADS[FLAGS.drafter]
        drafter = heads.drafter_class(FLAGS.drafter).create(
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
                "steps": FLAGS.steps, "data_dir": os.path.abspath(FLAGS.data_dir)}
        ckpt = train.Checkpointer(FLAGS.ckpt_dir, FLAGS.ckpt_every, meta) if FLAGS.ckpt_dir \
            else None
        t = time.time()
        try:
            if ckpt is not None:
                state = ckpt.restore_or(state)
                if int(state.step):
                    _say(f"resumed from {FLAGS.ckpt_dir} at step {int(state.step)}")
            state = train.train_loop(state, step_fn, get_batch, loaded.params, FLAGS.steps,
                                     checkpointer=ckpt, eval_fn=eval_fn,
                                     eval_every=FLAGS.eval_every or FLAGS.steps, log_fn=log_fn,
                                     progress=FLAGS.progress)
        except train.TrainCheckpointError as e:
            raise common.UserError(str(e)) from None
        finally:
            if ckpt is not None:
                ckpt.close()
        wall = time.time() - t
        acc = heads.head_accuracy(drafter, state.params, loaded.params, eval_data)
        _say(f"done: {int(state.step)} steps in {wall:.0f} s; held-out top-1 per head: "
             + " ".join(f"{a:.3f}" for a in acc))
        summary = {"drafter": FLAGS.drafter, "steps": int(state.step), "train_wall_s": wall,
                   "held_out_top1": [float(a) for a in acc], "history": history,
                   "train_positions": int(n), "held_out_positions":
                   int(eval_data["hidden"].shape[0]), "data": records.manifest.get("source")}
        if FLAGS.output:
            heads.save_weights(FLAGS.output, drafter, state.params, target_name=loaded.name,
                               extra={k: summary[k] for k in ("steps", "held_out_top1",
                                                              "data")})
            _say(f"wrote {FLAGS.output} ({os.path.getsize(FLAGS.output) / 1e6:.1f} MB)")
        if FLAGS.metrics_json:
            common.write_json_atomic(FLAGS.metrics_json, summary)
        print(json.dumps({k: summary[k] for k in ("drafter", "steps", "held_out_top1")}))


if __name__ == "__main__":
    app.run(main)
