"""How much memory a decoding run needs, and how many prompts one batch may hold, on this machine.

  python -m experiments.memory_limits                      # SmolLM2, ar and hydra, 128..8064
  python -m experiments.memory_limits --methods=ar --prompt_lens=512 --batch_sizes=1,64 \\
      --output_md=/tmp/limits.md

For every (method, prompt length P, batch size B) the run's program is compiled ahead of time
for B prompts of P tokens and ``--max_new_tokens`` new tokens, and XLA's estimate of the buffers
it allocates (:func:`specjax.memory.required_bytes`: the KV cache, logits and loop buffers; the
weights are already on the device and are listed once) is reported, next to the free memory of
the device and the largest batch of such prompts that fits the budget
(:func:`specjax.memory.rows_that_fit`: ``BUDGET_FRACTION`` of the free memory). Nothing runs:
only compilation, so this is quick and safe at sizes that would not fit. ``generate`` and the
benchmarks use the same numbers to refuse a run or to split a prompts file into batches.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from absl import app, flags

from experiments import common, method_flags, methods
from specjax import memory

FLAGS = flags.FLAGS
GB = memory.GB


def define_flags() -> None:
    flags.DEFINE_string("model", "smollm2-135m", "Registry name, HF directory or .gguf file.")
    flags.DEFINE_list("methods", ["ar", "hydra"], "Methods to size (registry names).")
    flags.DEFINE_list("prompt_lens", ["128", "1024", "4096", "8064"], "Prompt lengths in tokens.")
    flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to compile.")
    flags.DEFINE_integer("max_new_tokens", 128, "New tokens per prompt.", lower_bound=1)
    flags.DEFINE_string("output_json", None, "Write all results here (atomically).")
    flags.DEFINE_string("output_md", None, "Write the Markdown table here (atomically).")
    method_flags.define_flags(selector=False)
    flags.adopt_module_key_flags(method_flags)


def _ints(name: str) -> list[int]:
    try:
        values = sorted({int(v) for v in FLAGS[name].value})
    except ValueError:
        raise common.UserError(f"--{name} must be integers, got {FLAGS[name].value}") from None
    if not values or values[0] < 1:
        raise common.UserError(f"--{name} must be positive integers, got {values}")
    return values


def _param_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def measure(run: methods.Run, loaded, drafter, prompt_len: int, batch: int) -> dict:
    """One (method, P, B): the compiled program's buffer estimate and the rows that fit."""
    eng = run.engine(loaded, drafter[0])
    rng = np.random.default_rng(0)
    ids = lambda b: [rng.integers(1, loaded.model.vocab_size, size=prompt_len).tolist()  # noqa: E731
                     for _ in range(b)]
    t0 = time.perf_counter()
    need = {b: eng.required_bytes(loaded.params, drafter[1], ids(b)) for b in sorted({1, batch})}
    free = memory.available_bytes()
    cost = lambda b: need[1] + (need[batch] - need[1]) * (b - 1) // max(1, batch - 1)  # noqa: E731
    fit = memory.rows_that_fit(cost, 4096, free) if need[batch] is not None else None
    return {"prompt_len": prompt_len, "batch_size": batch, "required_bytes": need[batch],
            "required_gb": None if need[batch] is None else round(need[batch] / GB, 3),
            "rows_that_fit": fit, "compile_s": round(time.perf_counter() - t0, 1)}


def markdown(res: dict) -> str:
    lines = [f"free memory {res['free_gb']} GB, budget {memory.BUDGET_FRACTION:.0%}; weights "
             f"{res['weights_gb']} GB (target, on the device before the run); "
             f"max_new_tokens={res['max_new_tokens']}", "",
             "| method | prompt tokens | batch | buffers (GB) | prompts of this length per "
             "batch that fit |", "|---|---:|---:|---:|---:|"]
    for name, rows in res["methods"].items():
        for r in rows:
            lines.append(f"| {name} | {r['prompt_len']} | {r['batch_size']} | {r['required_gb']} "
                         f"| {r['rows_that_fit']} |")
    return "\n".join(lines) + "\n"


def main(argv):
    common.start(argv)
    with common.user_errors():
        lens, sizes = _ints("prompt_lens"), _ints("batch_sizes")
        common.check_outputs(FLAGS, "output_json", "output_md")
        config = method_flags.model_config(FLAGS)
        limit = config.max_position_embeddings
        if lens[-1] + FLAGS.max_new_tokens > limit:
            raise common.UserError(
                f"--prompt_lens {lens[-1]} plus --max_new_tokens={FLAGS.max_new_tokens} is over "
                f"the model's context of {limit}: use prompt lengths up to "
                f"{limit - FLAGS.max_new_tokens}")
        runs = {name: methods.build_run(FLAGS, name, check=False) for name in FLAGS.methods}
        loaded = runs[FLAGS.methods[0]].load()
        free = memory.available_bytes()
        res = {"model": loaded.name, "max_new_tokens": FLAGS.max_new_tokens,
               "free_gb": None if free is None else round(free / GB, 2),
               "weights_bytes": _param_bytes(loaded.params),
               "weights_gb": round(_param_bytes(loaded.params) / GB, 3),
               "device": str(jax.devices()[0]), "methods": {}}
        for name, run in runs.items():
            drafter = run.drafter(loaded)
            rows = res["methods"][name] = []
            for p in lens:
                for b in sizes:
                    rows.append(measure(run, loaded, drafter, p, b))
                    r = rows[-1]
                    print(f"{name} P={p} B={b}: {r['required_gb']} GB, {r['rows_that_fit']} "
                          f"rows fit ({r['compile_s']} s)", file=sys.stderr)
        text = markdown(res)
        print(text)
        common.write_outputs(FLAGS, res, lambda: text)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_flags)
