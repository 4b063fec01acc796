"""Writes Spec-Bench-style task prompts built from ShareGPT text (``experiments/task_prompts``).

  python -m experiments.build_task_prompts --output=/work/prompts/sg-tasks.jsonl \
      --offset=4720 --per_group=120

The prompts come from ShareGPT first turns ``[offset:offset + num_conversations]`` (keep the
range away from the conversations an evaluation set was built from: WORKSPACE lists them),
never from Spec-Bench. The file is Spec-Bench jsonl: the target answers it with
``build_corpus --source=FILE --spec_bench_split=all --path=regenerated``. Prints the count per
group.
"""

from __future__ import annotations

import collections
import json
import sys

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS

flags.DEFINE_string("output", None, "The prompt file to write (.jsonl).")
flags.DEFINE_integer("offset", 4720, "First ShareGPT conversation (of those with a first turn) "
                     "to use.", lower_bound=0)
flags.DEFINE_integer("num_conversations", None, "How many conversations from --offset "
                     "(default: all the rest).", lower_bound=1)
flags.DEFINE_integer("per_group", 120, "Prompts per task group at most.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Shuffling seed.")


def main(argv):
    common.start(argv)
    with common.user_errors():
        if not FLAGS.output or not FLAGS.output.endswith(".jsonl"):
            raise common.UserError("--output: give the prompt file to write, ending in .jsonl")
        from specjax.files import check_writable, write_text_atomic
        check_writable(FLAGS.output, "the prompt file")
        from experiments import sharegpt, task_prompts
        end = None if FLAGS.num_conversations is None else FLAGS.offset + FLAGS.num_conversations
        pairs = sharegpt.first_turn_pairs(FLAGS.offset, end)
        if not pairs:
            raise common.UserError(f"--offset={FLAGS.offset} is past the conversations "
                                   "ShareGPT holds: give a smaller one")
        rows = task_prompts.build_rows(pairs, FLAGS.per_group, FLAGS.seed)
        write_text_atomic(FLAGS.output, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                for r in rows))
        counts = collections.Counter(r["category"] for r in rows)
        print(json.dumps({"output": FLAGS.output, "conversations": len(pairs),
                          "prompts": len(rows), "per_group": dict(counts)}))
        print(f"wrote {len(rows)} prompts to {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
