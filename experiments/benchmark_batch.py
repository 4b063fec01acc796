"""Batched serving: throughput and latency versus batch size, plain vs speculative decoding.

  python -m experiments.benchmark_batch                     # batch 1..32, 64 new tokens
  python -m experiments.benchmark_batch --batch_sizes=1,8 --max_new_tokens=16 \\
      --methods=ar,prompt_lookup,prompt_lookup+adaptive --output_json=/tmp/batch.json

Protocol: Spec-Bench dev prompts (first turn, chat template) of at most ``--max_prompt_len``
tokens, taken round-robin over the task groups, so every batch mixes tasks; batch ``B`` holds
the first ``B`` of them. Greedy, float32, one static batch per (method, B): every row decodes
up to ``--max_new_tokens`` tokens (or EOS) and the batch returns when its last row is done.
Each (method, B) is compiled ahead of time, warmed up with one untimed run (``--warmup``),
then timed once from the call to the ready result (prefill included).

Methods: any registered method (``drafters.registry``) with its options (the option flags of
``experiments.method_flags`` apply to every listed method that has them), and
``NAME+adaptive``: the batch-size cap of ``specjax.adaptive.max_draft_len_for_batch``
(``B * (k + 1) <= --token_budget`` tokens per verification; a cap of 0 runs plain decoding,
which is what a server should do there) plus the per-row acceptance policy of
``AdaptiveDraftLength``. A chain method drafts ``k`` tokens; a tree method (no ``draft_len``:
token_recycling, rest, the compositions) keeps its nodes of depth ``<= k`` (all of its width
there, so ``B * (k + 1)`` undercounts a tree's verified tokens). Every method's tokens are
compared with ``ar``'s at the same batch size (a difference is a losslessness bug: reported,
and exit status 1).

Metrics per (method, B):
  * ``tokens_per_s``: generated tokens of all rows / wall seconds (throughput);
  * ``decode_tokens_per_s``: the same without the prefill: (tokens - B) / (wall - prefill_s),
    with ``prefill_s`` timed once per B as plain decoding of one token (so the same for every
    method; a draft model's own prefill stays in the decode part);
  * ``latency_s``: mean per-sequence latency = the batch's wall time (static batching returns
    every row together); ``ms_per_step``: wall / longest row (time per emitted position);
  * ``tau`` (tokens per target forward per row, prefill counted), ``draft_len_mean`` (draft
    tokens offered per row and round: what the adaptive length chose), ``speedup`` (tokens/s
    over ``ar``'s at the same B).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time

from absl import app, flags

from experiments import bench_report, common, method_flags, methods
from experiments.bench_runner import environment
from experiments.spec_bench import encode_prompt, read_prompts

FLAGS = flags.FLAGS
ADAPTIVE_SUFFIX = "+adaptive"
# Methods without a draft length (trees): +adaptive caps the drafted depth (at most the tree's
# own); the tree's width at the depths kept is not capped.
TREE_DEPTH_BOUND = 64
DEFAULT_METHODS = ["ar", "prompt_lookup", "prompt_lookup+adaptive", "draft_model",
                   "draft_model+adaptive"]


def define_flags() -> None:
    from experiments.benchmark import DEFAULT_PROMPTS
    flags.DEFINE_string("prompts", DEFAULT_PROMPTS, "Spec-Bench question file (jsonl).")
    flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16", "32"], "Batch sizes to run.")
    flags.DEFINE_list("methods", DEFAULT_METHODS, "Methods (ar always runs first); NAME"
                      f"{ADAPTIVE_SUFFIX} = NAME with the batch-size cap and per-row adaptive "
                      "draft length.")
    flags.DEFINE_integer("max_new_tokens", 64, "Most new tokens per row.", lower_bound=2)
    flags.DEFINE_integer("max_prompt_len", 128, "Skip prompts longer than this many tokens "
                         "(keeps the prefill from dominating the batch).", lower_bound=1)
    flags.DEFINE_integer("token_budget", None, "+adaptive: verified tokens per forward B*(k+1) "
                         "the batch-size cap allows (default: 8 on CPU, 16 on GPU / TPU; "
                         "specjax/adaptive.py).", lower_bound=1)
    flags.DEFINE_string("model", "smollm2-135m", "Registry name, HF directory or .gguf file.")
    flags.DEFINE_bool("warmup", True, "One untimed run per (method, batch size) before timing.")
    flags.DEFINE_string("output_json", None, "Write all results here (atomically).")
    flags.DEFINE_string("output_md", None, "Write the Markdown table here (atomically).")
    flags.DEFINE_bool("fail_on_mismatch", True, "Exit 1 when a method's tokens differ from ar's.")
    method_flags.define_flags(selector=False)
    flags.adopt_module_key_flags(method_flags)


def _validate() -> tuple[list[int], list[str]]:
    from drafters import registry
    try:
        sizes = sorted({int(b) for b in FLAGS.batch_sizes})
    except ValueError:
        raise common.UserError(f"--batch_sizes must be integers, got {FLAGS.batch_sizes}") from None
    if not sizes or sizes[0] < 1:
        raise common.UserError(f"--batch_sizes must be positive, got {FLAGS.batch_sizes}")
    names, chosen = [], []
    for m in FLAGS.methods:
        base = m[:-len(ADAPTIVE_SUFFIX)] if m.endswith(ADAPTIVE_SUFFIX) else m
        try:
            chosen.append(registry.get(registry.split_name(base)[0]))
        except ValueError as e:
            raise common.UserError(f"--methods entry {m!r}: {e}, optionally with "
                                   f"{ADAPTIVE_SUFFIX} (not ar)") from None
        if m == "ar" + ADAPTIVE_SUFFIX:
            raise common.UserError(f"--methods entry {m!r}: ar has no draft to adapt")
        names.append(m)
    method_flags.check_applicable(chosen + [registry.get("ar")], FLAGS)
    return sizes, ["ar"] + [m for m in dict.fromkeys(names) if m != "ar"]


def select_prompts(loaded, count: int) -> list:
    """``count`` prompts of at most ``--max_prompt_len`` tokens, round-robin over task groups."""
    pool = read_prompts(FLAGS.prompts, per_category=10_000)
    by_group = collections.OrderedDict()
    for p in pool:
        p.ids = encode_prompt(loaded.tokenizer, p.text, loaded.model.vocab_size)
        if len(p.ids) <= FLAGS.max_prompt_len:
            by_group.setdefault(p.group, collections.deque()).append(p)
    chosen = []
    while len(chosen) < count and any(by_group.values()):
        for q in by_group.values():
            if q and len(chosen) < count:
                chosen.append(q.popleft())
    if len(chosen) < count:
        raise common.UserError(f"only {len(chosen)} prompts of at most {FLAGS.max_prompt_len} "
                               f"tokens in {FLAGS.prompts}; the largest batch needs {count}: "
                               "raise --max_prompt_len or lower --batch_sizes")
    return chosen


def _run_for(method: str, batch_size: int) -> tuple[methods.Run, int]:
    """The :class:`methods.Run` of a method at a batch size (built as ``generate`` builds it),
    and its draft-length cap (-1: no cap; 0: the adaptive variant runs plain decoding)."""
    from specjax import adaptive
    adaptive_variant = method.endswith(ADAPTIVE_SUFFIX)
    base = method[:-len(ADAPTIVE_SUFFIX)] if adaptive_variant else method
    run = methods.build_run(FLAGS, base, check=False)
    if not adaptive_variant:
        return run, -1
    if base == "ar":
        raise common.UserError(f"{method}: ar drafts nothing to adapt")
    default = run.options.draft_len if "draft_len" in run.options.fields() else 0
    cap = adaptive.max_draft_len_for_batch(batch_size, default or TREE_DEPTH_BOUND,
                                           FLAGS.token_budget)
    if cap == 0:
        return dataclasses.replace(run, method="ar", options=None, adaptive_draft="off"), 0
    if not default:  # a tree without a draft length: the wrapper caps its depth
        return dataclasses.replace(run, adaptive_draft="acceptance", max_draft_len=cap), cap
    # The inner drafter is built with the cap as its length (a draft model then drafts only k
    # tokens), and the wrapper adapts each row's length below it.
    options = dataclasses.replace(run.options, draft_len=cap)
    return dataclasses.replace(run, options=options, adaptive_draft="acceptance"), cap


def time_one(run: methods.Run, loaded, prompts, warmup: bool) -> dict:
    """Compiles, warms up and times one static batch; returns its record."""
    import jax
    drafter, dparams = run.drafter(loaded)
    compiled = run.engine(loaded, drafter).compile(loaded.params, dparams,
                                                   [p.ids for p in prompts], jax.random.key(0))
    if warmup:
        compiled.run()
    gen = compiled.run()
    s = gen.stats
    rec = {"wall_s": gen.wall_s, "compile_s": compiled.compile_s, "new_tokens": gen.new_tokens,
           "longest": max(len(t) for t in gen.tokens), "generated_ids": gen.tokens,
           "row_calls": s.row_calls}
    if drafter is not None:
        rec |= {"rounds": s.row_rounds, "drafted": s.drafted, "accepted": s.accepted}
    return rec


def prefill_seconds(loaded, prompts, warmup: bool) -> float:
    """Wall time of the prefill alone: plain decoding of one token for this batch."""
    run = methods.build_run(FLAGS, "ar", check=False)
    run = dataclasses.replace(run, config=dataclasses.replace(run.config, max_new_tokens=1))
    return time_one(run, loaded, prompts, warmup)["wall_s"]


def metrics(rec: dict, batch_size: int, prefill_s: float) -> dict:
    new, wall = rec["new_tokens"], rec["wall_s"]
    decode_s = wall - prefill_s
    out = {"batch_size": batch_size, "new_tokens": new, "wall_s": wall,
           "compile_s": rec["compile_s"], "tokens_per_s": new / wall,
           "decode_tokens_per_s": (new - batch_size) / decode_s if decode_s > 0 else None,
           "latency_s": wall, "ms_per_step": 1000 * wall / max(1, rec["longest"]),
           "tau": new / max(1, rec["row_calls"]), "prefill_s": prefill_s}
    if "rounds" in rec:
        out |= {"draft_len_mean": rec["drafted"] / max(1, rec["rounds"]),
                "acceptance_rate": rec["accepted"] / max(1, rec["drafted"])}
    return out


def _f(x, digits=2, suffix=""):
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    out = [f"# specjax batched serving: {cfg['model']}", "",
           f"Static batches of Spec-Bench dev prompts (<= {cfg['max_prompt_len']} tokens, task "
           f"groups round-robin), greedy, float32, max_new_tokens={cfg['max_new_tokens']}, "
           f"{env['cpu_cores']} CPU cores, load average {env['load_average'][0]:.1f} at the start"
           f", {env['load_average_end'][0]:.1f} at the end. tok/s = generated tokens of the whole "
           "batch / wall (prefill included); decode tok/s excludes the prefill; latency = the "
           "batch's wall time (every row returns with it); speedup = tok/s over ar's at the same "
           "batch size; k = draft tokens offered per row and round.", ""]
    if result["mismatches"]:
        out += [f"**LOSSLESSNESS FAILURES: {len(result['mismatches'])}:** "
                + ", ".join(f"{m['method']} B={m['batch_size']} row {m['row']}"
                            for m in result["mismatches"]), ""]
    rows = []
    for name, per_b in result["methods"].items():
        for b, m in per_b.items():
            rows.append([name + ("" if m.get("cap", -1) != 0 else " (cap 0: plain)"), b,
                         _f(m["tokens_per_s"], 1), _f(m["decode_tokens_per_s"], 1),
                         _f(m.get("speedup"), 2, "x"), _f(m["latency_s"], 1),
                         _f(m["ms_per_step"], 0), _f(m["tau"]), _f(m.get("draft_len_mean")),
                         m.get("matches_ar", "-")])
    out += [bench_report.md_table(["method", "B", "tok/s", "decode tok/s", "speedup", "latency s",
                            "ms/step", "tau", "k", "same as ar"], rows), "",
            f"Command: `{result['command']}`", ""]
    return "\n".join(out)


def main(argv):
    common.start(argv)
    t_start = time.perf_counter()
    with common.user_errors():
        env = environment()
        sizes, names = _validate()
        common.check_outputs(FLAGS, "output_json", "output_md")
        method_flags.model_config(FLAGS)  # --max_new_tokens against the context, no weights
        for m in names:  # flag errors (unknown adaptive bases) before the model load
            _run_for(m, sizes[0])
        loaded = methods.build_run(FLAGS, "ar", check=False).load()
        prompts = select_prompts(loaded, max(sizes))
        print(f"benchmark_batch: {len(prompts)} prompts ({min(len(p.ids) for p in prompts)}.."
              f"{max(len(p.ids) for p in prompts)} tokens), batch sizes {sizes}, methods "
              f"{', '.join(names)}, {FLAGS.max_new_tokens} new tokens", file=sys.stderr)
        results = {m: {} for m in names}
        mismatches = []
        for b in sizes:
            batch_prompts = prompts[:b]
            pre = prefill_seconds(loaded, batch_prompts, FLAGS.warmup)
            ar_rec = ref = ar_tps = None
            for m in names:
                run, cap = _run_for(m, b)
                if cap == 0:  # the adaptive variant is plain decoding here: ar's own run
                    rec = ar_rec
                else:
                    rec = time_one(run, loaded, batch_prompts, FLAGS.warmup)
                res = metrics(rec, b, pre)
                if m == "ar":
                    ar_rec, ref, ar_tps = rec, rec["generated_ids"], res["tokens_per_s"]
                else:
                    bad = [i for i, (x, y) in enumerate(zip(ref, rec["generated_ids"])) if x != y]
                    res["matches_ar"] = f"{b - len(bad)}/{b}"
                    res["speedup"] = res["tokens_per_s"] / ar_tps
                    mismatches += [{"method": m, "batch_size": b, "row": i} for i in bad]
                    for i in bad:
                        print(f"LOSSLESSNESS BUG: {m} at batch {b} row {i} differs from ar",
                              file=sys.stderr)
                if cap >= 0:
                    res["cap"] = cap
                results[m][b] = res
                print(f"  B={b:>2} {m:<24} {res['tokens_per_s']:7.1f} tok/s  "
                      f"tau {res['tau']:.2f}  wall {res['wall_s']:6.1f}s  compile "
                      f"{res['compile_s']:5.1f}s", file=sys.stderr)
        from specjax import adaptive
        result = {
            "config": {"model": FLAGS.model, "prompts": FLAGS.prompts, "batch_sizes": sizes,
                       "methods": names, "max_new_tokens": FLAGS.max_new_tokens,
                       "max_prompt_len": FLAGS.max_prompt_len,
                       "token_budget": FLAGS.token_budget or adaptive.default_token_budget(),
                       "warmup": FLAGS.warmup},
            "command": " ".join(["python -m experiments.benchmark_batch"] + sys.argv[1:]),
            "environment": env | {"load_average_end": [round(x, 2) for x in os.getloadavg()]},
            "prompts": [{"question_id": p.question_id, "group": p.group,
                         "prompt_len": len(p.ids)} for p in prompts],
            "methods": results, "mismatches": mismatches,
            "total_s": time.perf_counter() - t_start}
        md = markdown(result)
        print(md)
        common.write_outputs(FLAGS, result, lambda: md)
        if mismatches and FLAGS.fail_on_mismatch:
            print(f"error: {len(mismatches)} row(s) differ from ar: a bug", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_flags)
