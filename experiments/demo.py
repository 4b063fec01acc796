"""`make demo`: SmolLM2 answers a prompt with plain decoding, then with speculative decoding.

Both runs are greedy, so the texts must be identical; the demo checks that and prints the
speed of each (compilation excluded) and tau, the tokens produced per target forward pass.

  python -m experiments.demo [--model=smollm2-135m] [--method=prompt_lookup] [--prompt=...]
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import common, methods
from specjax import decode

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Registry name or checkpoint path.")
flags.DEFINE_string("method", "prompt_lookup", "Speculative method shown beside plain decoding.")
flags.DEFINE_integer("max_new_tokens", 96, "New tokens per run.", lower_bound=1)
flags.DEFINE_string(
    "prompt",
    "Rewrite this sentence in plain words, keeping every name: \"The Paris Agreement, adopted "
    "in December 2015 by 196 parties at COP21 in Paris, aims to hold the increase in the global "
    "average temperature to well below 2 degrees Celsius above pre-industrial levels.\"",
    "The user message.")


def main(argv):
    del argv
    with common.user_errors():
        if FLAGS.method not in methods.METHODS or FLAGS.method == "ar":
            raise common.UserError(f"--method must be a speculative method, one of "
                                   f"{[m for m in methods.METHODS if m != 'ar']}")
        config = decode.DecodeConfig(max_new_tokens=FLAGS.max_new_tokens)
        plain = methods.Run("ar", FLAGS.model, config)
        print(f"Loading {FLAGS.model} ...", file=sys.stderr)
        loaded = plain.load()
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": FLAGS.prompt}],
                                                    add_generation_prompt=True)
        ids = [loaded.tokenizer.encode(text, add_special_tokens=False)]
        print(f"\nUser: {FLAGS.prompt}\n")
        results = {}
        for run in (plain, methods.Run(FLAGS.method, FLAGS.model, config)):
            print(f"--- {run.method} (compiling, then generating) ---", file=sys.stderr)
            result = run.generate(loaded, ids)
            results[run.method] = result
            s = result.summary()
            print(f"[{run.method}] Assistant: {loaded.tokenizer.decode(result.generated[0])}")
            print(f"[{run.method}] {s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s, "
                  f"tau {s['tau']:.2f} tokens per target call\n")
        base, spec = results["ar"], results[FLAGS.method]
        same = base.generated == spec.generated
        speedup = base.wall_s / spec.wall_s if spec.wall_s else float("nan")
        print(f"{FLAGS.method} vs plain decoding: {speedup:.2f}x faster, output "
              f"{'IDENTICAL' if same else 'DIFFERENT (a bug: please report it)'}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    app.run(main)
