"""Builds SAM-Decoding's static suffix automaton from a corpus (``--method=sam``).

  python -m experiments.build_sam_automaton --corpus_dir=/work/corpus/extra-regen-0

The RESPONSE part of every record of ``--corpus_dir`` (``build_corpus``'s output: the tokens
after each record's prompt; a regenerated corpus holds the target's own answers, a
teacher-forced one the data set's) goes into one generalized suffix automaton
(:func:`drafters.suffix_automaton.build_static`), records in order until ``--max_tokens``
tokens (the record that crosses the cap is cut). Responses, not prompts: drafts continue text
the target writes. No model runs: the model only names the vocabulary (read from its config,
without its weights) and the default output, ``drafters/weights/<model>/sam.safetensors``,
which ``--method=sam`` loads (``--static=shipped``, the default). Size: about 16 bytes per
state and 6 per transition; on ShareGPT text ~1.3 states and ~2.1 transitions per token, ~35
bytes per corpus token (200k tokens: 6.7 MiB, 3 s).
"""

from __future__ import annotations

import os
import sys
import time
import types

from absl import app, flags

from experiments import common, method_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("corpus_dir", None, "Distillation corpus (comma-separated directories), as "
                    "built by build_corpus.")
flags.DEFINE_string("model", "smollm2-135m", "Target: registry name, HF directory or .gguf.")
flags.DEFINE_integer("max_tokens", 1_000_000, "Most response tokens put into the automaton.",
                     lower_bound=1)
flags.DEFINE_string("output", None, "Automaton file; default: the shipped path for the model.")
method_flags.define_model_flags()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv):
    common.start(argv)
    with common.user_errors():
        config, dirs, name = common.corpus_build_start(FLAGS)
        from drafters import corpus as corpus_lib
        from drafters import head_weights
        from drafters import suffix_automaton as sa
        from specjax.files import check_writable
        output = FLAGS.output or head_weights.shipped_path(sa.NAME, name)
        check_writable(output, "the automaton file")
        sizes = types.SimpleNamespace(hidden_size=config.hidden_size,
                                      vocab_size=config.vocab_size)
        t = time.time()
        try:
            data = corpus_lib.load(dirs, sizes)
        except corpus_lib.CorpusError as e:
            raise common.UserError(str(e)) from None
        texts, total = [], 0
        for r in range(len(data)):
            if total >= FLAGS.max_tokens:
                break
            resp = data.tokens[r, data.prompt_lengths[r]:data.lengths[r]]
            resp = resp[:FLAGS.max_tokens - total].tolist()
            if resp:
                texts.append(resp)
                total += len(resp)
        if not texts:
            raise common.UserError(f"{FLAGS.corpus_dir} holds no response tokens: build the "
                                   "corpus from prompts with responses (or regenerated)")
        _say(f"read {total} response tokens of {len(texts)} records in {time.time() - t:.0f} s; "
             "building the automaton")
        t = time.time()
        arrays = sa.build_static(texts, config.vocab_size)
        command = "python -m experiments.build_sam_automaton " + " ".join(sys.argv[1:])
        path = sa.save_static(output, arrays, config.vocab_size, source=FLAGS.corpus_dir,
                              command=command)
        _say(f"wrote {path}: {arrays['length'].size} states, {arrays['edge_token'].size} "
             f"transitions over {total} tokens in {time.time() - t:.0f} s, "
             f"{os.path.getsize(path) / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
