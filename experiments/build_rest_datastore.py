"""Builds REST's datastore (a corpus's tokens and their suffix array) for a model.

  python -m experiments.build_rest_datastore --corpus_dir=/work/corpus/sharegpt-tf-0

Reads the token ids of every record of ``--corpus_dir`` (``build_corpus``'s output; whole
records, prompt and response: a row's query ends in text it is writing, and the chat template
and the questions match as well as the answers), never the features, and no model weights: the
vocabulary comes from ``--model``'s configuration. Writes the datastore as safetensors
(``--output``, default the shipped ``drafters/weights/<model>/rest.safetensors``), which
``--method=rest`` loads (``--datastore=shipped``, the default; or ``--datastore=PATH``).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS

flags.DEFINE_string("corpus_dir", None, "Distillation corpus (comma-separated directories), as "
                    "built by build_corpus.")
flags.DEFINE_string("model", "smollm2-135m", "Target: registry name, HF directory or .gguf "
                    "(its vocabulary; no weights are loaded).")
flags.DEFINE_integer("max_tokens", None, "Keep whole records, in corpus order, until this many "
                     "tokens (default: every record).", lower_bound=1)
flags.DEFINE_integer("sort_depth", 24, "Tokens each suffix is sorted by: at least --max_ngram "
                     "+ --draft_depth of the runs that use the datastore.", lower_bound=2)
flags.DEFINE_string("output", None, "Datastore file; default: the shipped path for the model.")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_records(dirs, vocab_size: int, max_tokens=None) -> list:
    """Every record's tokens (lists of ids) of the corpora ``dirs``, whole, in order, until
    ``max_tokens``; reads only the ``tokens`` and ``lengths`` of each shard (UserError for a
    corpus of another vocabulary or a damaged shard)."""
    from drafters import corpus as corpus_lib
    from drafters import shards
    texts, total = [], 0
    for d in dirs:
        manifest = corpus_lib.read_manifest(d)
        if manifest["vocab_size"] != vocab_size:
            raise common.UserError(f"{d} was made with a vocabulary of {manifest['vocab_size']}, "
                                   f"--model has {vocab_size}: use that model's corpus")
        for s in manifest["shards"]:
            try:
                part = shards.read_shard(os.path.join(d, s["file"]), ("tokens", "lengths"),
                                         corpus_lib.CorpusError, "rebuild the corpus")
            except corpus_lib.CorpusError as e:
                raise common.UserError(str(e)) from None
            for row, n in zip(part["tokens"], part["lengths"]):
                if max_tokens is not None and total + int(n) > max_tokens:
                    return texts
                texts.append(row[:n].tolist())
                total += int(n)
    return texts


def main(argv):
    common.start(argv)
    with common.user_errors():
        config, dirs, name = common.corpus_build_start(FLAGS)
        from drafters import head_weights, rest_datastore
        from specjax.files import check_writable
        output = FLAGS.output or head_weights.shipped_path(rest_datastore.NAME, name)
        check_writable(output, "the datastore file")
        t = time.time()
        texts = read_records(dirs, config.vocab_size, FLAGS.max_tokens)
        if not any(texts):
            raise common.UserError("no record fits: raise --max_tokens or give a larger corpus")
        store = rest_datastore.build_datastore(texts, config.vocab_size, FLAGS.sort_depth)
        command = "python -m experiments.build_rest_datastore " + " ".join(sys.argv[1:])
        path = rest_datastore.save_datastore(output, store, source=FLAGS.corpus_dir,
                                             command=command)
        _say(f"wrote {path}: {store.suffix_array.size} tokens of {len(texts)} records in "
             f"{time.time() - t:.0f} s ({os.path.getsize(path) / 2 ** 20:.1f} MiB; "
             f"{np.unique(store.tokens).size - 1} distinct ids)")


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
