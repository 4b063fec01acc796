"""`make demo`: SmolLM2 answers a prompt with plain decoding, then with speculative decoding.

Both runs are greedy, so the texts must be identical; the demo checks that and prints the
speed of each (compilation excluded) and tau, the tokens produced per target forward pass.
The target runs with ``--weights=gguf`` by default: the GGUF file's own 4/8-bit blocks through
specjax's CPU kernel, about 3x faster than float32 weights on CPU (the same numbers: the same
text). ``--weights=float32`` shows the float path.

  python -m experiments.demo [--model=smollm2-135m] [--method=prompt_lookup] [--prompt=...]

Every method and its option flags are available (``--method=hydra``, ``--draft_len=4`` ...), as
in ``experiments.generate``.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags

from experiments import common, method_flags, methods

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Registry name or checkpoint path.")
flags.DEFINE_integer("max_new_tokens", 96, "New tokens per run.", lower_bound=1)
flags.DEFINE_string(
    "prompt",
    "Rewrite this sentence in plain words, keeping every name: \"The Paris Agreement, adopted "
    "in December 2015 by 196 parties at COP21 in Paris, aims to hold the increase in the global "
    "average temperature to well below 2 degrees Celsius above pre-industrial levels.\"",
    "The user message.")
method_flags.define_flags(default_method="prompt_lookup")
flags.adopt_module_key_flags(method_flags)
FLAGS.set_default("weights", "gguf")  # the fastest format on CPU


def main(argv):
    common.start(argv, quiet=False)
    with common.user_errors():
        if FLAGS.method.partition(":")[0] == "ar":
            raise common.UserError("--method must be a speculative method (the demo compares it "
                                   "with ar)")
        spec_run = methods.build_run(FLAGS)  # flag errors before the model load
        plain = dataclasses.replace(spec_run, method="ar", options=None, adaptive_draft="off")
        print(f"Loading {FLAGS.model} ...", file=sys.stderr)
        loaded = plain.load()
        if loaded.tokenizer is None:
            raise common.UserError(f"model {FLAGS.model!r} has no tokenizer: use a real model")
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": FLAGS.prompt}],
                                                    add_generation_prompt=True)
        ids = [loaded.tokenizer.encode(text, add_special_tokens=False)]
        print(f"\nUser: {FLAGS.prompt}\n(weights: {FLAGS.weights})\n")
        results = {}
        for run in (plain, spec_run):
            print(f"--- {run.method} (compiling, then generating) ---", file=sys.stderr)
            result = run.generate(loaded, ids)
            results[run.method] = result
            s = result.summary()
            print(f"[{run.method}] Assistant: {loaded.tokenizer.decode(result.generated[0])}")
            print(f"[{run.method}] {s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s, "
                  f"tau {s['tau']:.2f} tokens per target call\n")
        base, spec = results["ar"], results[spec_run.method]
        same = base.generated == spec.generated
        speedup = base.wall_s / spec.wall_s if spec.wall_s else float("nan")
        lossy = "" if spec_run.spec.lossless else " (a LOSSY --acceptance rule: may differ)"
        print(f"{spec_run.method} vs plain decoding: {speedup:.2f}x faster, output "
              f"{'IDENTICAL' if same else 'DIFFERENT' + (lossy or ' (a bug: please report it)')}")
        if not same and spec_run.spec.lossless:
            sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
