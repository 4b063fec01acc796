"""Builds Token Recycling's warm starting table from text the target wrote (a corpus).

  python -m experiments.build_recycling_table --corpus_dir=/work/corpus/extra-regen-0

The target reads every record of ``--corpus_dir`` (``build_corpus``'s output; a REGENERATED
corpus is the text the target itself writes), and each position's top-k goes into the row of
its token (:func:`drafters.token_recycling.table_from_text`); the table is written as
safetensors (``--output``, default the shipped ``drafters/weights/<model>/token_recycling.
safetensors``, ~0.8 MB for SmolLM2 at k = 8), which ``--method=token_recycling`` starts every
request from (``--table=warm``, the default).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags

from experiments import common, method_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("corpus_dir", None, "Distillation corpus (comma-separated directories), as "
                    "built by build_corpus.")
flags.DEFINE_string("model", "smollm2-135m", "Target: registry name, HF directory or .gguf.")
flags.DEFINE_integer("table_width", 8, "Successors kept per token (k, the table's width).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Records per forward.", lower_bound=1)
flags.DEFINE_string("output", None, "Table file; default: the shipped path for the model.")
method_flags.define_model_flags()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv):
    common.start(argv)
    with common.user_errors():
        def check_width(config):
            if FLAGS.table_width > config.vocab_size:
                raise common.UserError(f"--table_width {FLAGS.table_width} is over the "
                                       f"vocabulary ({config.vocab_size})")

        _, dirs, _ = common.corpus_build_start(FLAGS, check_width)
        from drafters import corpus as corpus_lib
        from drafters import head_weights, token_recycling
        from specjax.files import check_writable
        loaded = method_flags.load_model(FLAGS)
        output = FLAGS.output or head_weights.shipped_path(token_recycling.NAME, loaded.name)
        check_writable(output, "the table file")
        try:
            data = corpus_lib.load(dirs, loaded.model)
        except corpus_lib.CorpusError as e:
            raise common.UserError(str(e)) from None
        texts = [data.tokens[r, :data.lengths[r]].tolist() for r in range(len(data))]
        t = time.time()
        table = token_recycling.table_from_text(loaded.model, loaded.params, texts,
                                                FLAGS.table_width, batch_size=FLAGS.batch_size)
        learned = int((table != np.arange(FLAGS.table_width)).any(axis=1).sum())
        command = "python -m experiments.build_recycling_table " + " ".join(sys.argv[1:])
        path = token_recycling.save_table(output, table, source=FLAGS.corpus_dir,
                                          command=command)
        _say(f"wrote {path}: {sum(map(len, texts))} positions of {len(texts)} records in "
             f"{time.time() - t:.0f} s; {learned} of {table.shape[0]} rows learned")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
