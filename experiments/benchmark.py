"""Spec-Bench style benchmark: every decoding method against plain decoding, on the same prompts,
in one run, plus the Hugging Face transformers peer on the same checkpoint.

  python -m experiments.benchmark                       # 6 task groups x 5 prompts, 128 tokens
  python -m experiments.benchmark --per_category=1 --max_new_tokens=32 --nopeer
  python -m experiments.benchmark --methods=prompt_lookup --categories=summarization,rag \\
      --output_json=/tmp/bench.json --output_md=/tmp/bench.md

Protocol (Spec-Bench's, scaled down): batch 1, greedy, float32, the model's chat template on the
FIRST user turn of each question, at most ``--max_new_tokens`` new tokens (a row stops at the
tokenizer's EOS ids, EOS included). The prompts file is Spec-Bench's ``question.jsonl`` format
(``question_id``, ``category``, ``turns``); the eight MT-bench categories form one group,
``mt_bench``, so the groups are mt_bench, translation, summarization, qa, math_reasoning and rag.
``--per_category=N`` takes N questions per group, round-robin over a group's original categories
(so mt_bench's 5 are writing, roleplay, reasoning, math, coding), in file order.

Timing: every method is compiled ahead of time once per prompt-length bucket (prompts are padded
to power-of-two lengths, so each (method, bucket) is one executable, cached) and warmed up with
one untimed run; then each prompt is generated once, timed from the call to the ready result
(prefill included, compilation excluded). The methods run one after the other over all prompts,
``ar`` first.

Metrics, per task group and overall:
  * ``tau``: mean tokens per target forward pass = new tokens / target calls (prefill counted as
    a call that yields one token; bonus tokens included), pooled over the prompts.
  * ``tokens_per_s``: mean over prompts of new tokens / wall seconds.
  * ``speedup``: Spec-Bench's definition: a method's mean per-prompt tokens/s divided by ``ar``'s
    mean per-prompt tokens/s, both measured in this run. ``speedup_wall`` (JSON) is the other
    common one: ``ar``'s total wall time over the method's, on the same prompts.
  * ``accept_rate_by_depth[d]``: fraction of (row, round) pairs in which the draft token at depth
    d+1 was accepted.
  * Round-cost breakdown (``--round_cost_calls``, :mod:`experiments.bench_round_cost`): on the
    median-length prompt, rounds of each draft-then-verify method, the same rounds with a
    drafter that drafts the same tree shape at no cost, and plain steps, timed interleaved
    (4 rounds fused in one ``lax.fori_loop`` per timed call, as the decoding loop runs them):
    ``verify_steps`` (verification, acceptance, commit) and ``drafting_steps`` (the drafter's
    own work) per round, in plain decoding steps. Drafters whose verification width follows
    their drafts (``verify_widths``: prompt lookup, the adaptive wrapper) are left out.
  * Losslessness: every lossless method's tokens are compared with ``ar``'s token for token; a
    difference is a bug, reported on stderr, in both outputs, and by exit status 1.
  * Peer (``--peer``): transformers ``generate`` on the same GGUF (float32, batch 1, greedy, the
    same EOS ids and max_new_tokens, torch threads = cores), each mode warmed up once: plain,
    prompt lookup (``prompt_lookup_num_tokens`` = our prompt_lookup draft length) and, with
    ``--peer_draft_model``, assisted generation. Its speedups are HF mode vs HF plain (same
    definition as ours); ``vs_specjax_ar`` is HF tokens/s over specjax ``ar`` tokens/s.

Methods and their options come from the registry (``drafters.registry``): ``--methods`` takes
``METHOD`` or ``METHOD:TREE`` names, each method reads the option flags it has (``--draft_len``
sets every listed method that has a draft length), and a flag that none of them has is an error.
Every run is built by :func:`experiments.methods.build_run`, exactly as ``generate`` builds it,
and timed by :class:`experiments.bench_runner.MethodRunner`. ``--plots=DIR`` also writes the
PNGs of :mod:`experiments.bench_plots`.

Code completion (``--raw_prompts``): each prompt's text is encoded as it is, without the chat
template, so the model continues it (``experiments/prompts/code_completion.jsonl``: function
signatures with docstrings, whose continuation is the body; same file format).

One method's option apart from the shared flag (``--method_option=cross_vocab.draft_model=
smollm2-135m``: SmolLM2 drafts for cross_vocab while staged keeps the target's first layers).
With ``--peer_draft_model`` the peer's assisted generation mirrors the listed method whose
``draft_model`` is that model (cross_vocab across tokenizers: transformers' universal assisted
generation), else ``draft_model``: its draft length is that method's.

Models without a tokenizer (the random ``tiny-*`` test models): each prompt becomes its first
48 UTF-8 bytes (mod vocab size), no EOS.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Optional

from absl import app, flags

from experiments import bench_peer, bench_report, common, method_flags, methods
from experiments.bench_metrics import aggregate, first_mismatch, summarize
from experiments.bench_runner import MethodRunner, environment
from experiments.spec_bench import GROUPS, encode_prompt, read_prompts

FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PROMPTS = os.path.normpath(os.path.join(_REPO, "..", "shared", "data", "spec_bench",
                                                "dev.jsonl"))
# Rough costs on the 2-core development CPU (SmolLM2-135M, float32, scan_layers) for the
# up-front estimate; the estimate is redone from measured numbers after the ar baseline.
ASSUMED_AR_TOKENS_PER_S = 30.0  # decode steps
ASSUMED_PREFILL_S_PER_TOKEN = 0.006  # per padded prompt token (a 1024 bucket: ~6 s)
ASSUMED_COMPILE_S = 5.0  # per (method, bucket)
ASSUMED_METHOD_SLOWDOWN = 1.0  # a speculative method's time / ar's
ASSUMED_PEER_SLOWDOWN = 1.5  # HF time / specjax ar time, idle machine


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The benchmark's flags, in ``fv`` (defined by ``__main__`` only, so that other binaries and
    tests can import this module)."""
    d = dict(flag_values=fv)
    flags.DEFINE_string("prompts", DEFAULT_PROMPTS,
                        "Spec-Bench question file (jsonl with question_id, category, turns).", **d)
    flags.DEFINE_integer("per_category", 5, "Questions per task group.", lower_bound=1, **d)
    flags.DEFINE_list("categories", None,
                      f"Task groups to run ({', '.join(GROUPS)}) or original categories (e.g. "
                      "coding); default: all.", **d)
    flags.DEFINE_bool("raw_prompts", False, "Encode each prompt's text as is, without the chat "
                      "template: completion prompts (experiments/prompts/code_completion.jsonl).",
                      **d)
    flags.DEFINE_multi_string("method_option", [], "METHOD.OPTION=VALUE: one method's option, "
                              "overriding the shared option flag for that method only (e.g. "
                              "cross_vocab.draft_model=smollm2-135m beside staged's default "
                              "draft). Repeatable.", **d)
    flags.DEFINE_integer("max_new_tokens", 128, "Most new tokens per prompt.", lower_bound=1, **d)
    flags.DEFINE_string("model", "smollm2-135m", "Registry name, HF directory or .gguf file.", **d)
    flags.DEFINE_bool("scan_layers", True, "Run the layer stack as a lax.scan (compiles ~10x "
                      "faster than the unrolled stack on CPU).", **d)
    flags.DEFINE_bool("peer", True, "Also run transformers generate (plain and prompt lookup; "
                      "assisted generation with --peer_draft_model).", **d)
    flags.DEFINE_string("peer_draft_model", None,
                        "Peer assisted generation's draft model: a registry name, .gguf file, "
                        "HF directory, or first_layers:N (the target's first N layers, like "
                        "specjax's default draft_model). Another vocabulary than the target's "
                        "(smollm2-135m for qwen2.5-coder-0.5b): universal assisted generation, "
                        "the twin of cross_vocab with that --draft_model.", **d)
    flags.DEFINE_integer("peer_threads", 0, "torch threads of the peer (0 = the core count). "
                         "On a CPU shared with other jobs torch's OpenMP threads degrade much "
                         "worse than XLA's (seen: 3 tok/s with 2 threads vs 14 with 1).",
                         lower_bound=0, **d)
    flags.DEFINE_string("output_json", None, "Write all results here (atomically).", **d)
    flags.DEFINE_string("output_md", None, "Write the Markdown tables here (atomically).", **d)
    flags.DEFINE_string("plots", None, "Write the benchmark's PNG plots into this directory "
                        "(experiments/bench_plots.py).", **d)
    flags.DEFINE_integer("round_cost_calls", 16, "Timed calls per loop in the round-cost "
                         "breakdown of each draft-then-verify method (0 = no breakdown).",
                         lower_bound=0, **d)
    flags.DEFINE_bool("fail_on_mismatch", True, "Exit with status 1 when a lossless method's "
                      "output differs from ar's (after writing the outputs).", **d)
    method_flags.define_flags(multi=True, fv=fv)
    flags.adopt_module_key_flags(method_flags, flag_values=fv)
    common.define_mesh_flags(fv)


def default_methods(model: str) -> list[str]:
    """Every registered method that runs on ``model`` as shipped (trained drafters only where
    their weights ship), ``ar`` first, eagle's dynamic tree beside its static one; sjd only on
    request (it is jacobi under greedy decoding)."""
    from drafters import registry
    names = [m.name for m in registry.methods()
             if m.in_default_benchmark and m.has_weights(model)]
    if "eagle" in names:
        names.insert(names.index("eagle") + 1, "eagle:dynamic")
    return names


def build_runs(FLAGS) -> dict[str, methods.Run]:
    """The runs of ``--methods`` (``ar`` first), each built as ``generate`` builds it; every
    flag error before any model is loaded."""
    from drafters import registry
    names = list(FLAGS.methods) if FLAGS.methods else default_methods(FLAGS.model)
    names = ["ar"] + [m for m in dict.fromkeys(names) if m != "ar"]
    try:
        chosen = [registry.get(registry.split_name(n)[0]) for n in names]
    except ValueError as e:
        raise common.UserError(f"--methods: {e} (optionally METHOD:TREE)") from None
    method_flags.check_applicable(chosen, FLAGS)
    # Each method reads the option flags it has; each given flag was checked to apply to one.
    runs = {name: methods.build_run(FLAGS, name, check=False) for name in names}
    runs = with_method_options(runs, FLAGS.method_option)
    if FLAGS.peer_draft_model and not FLAGS.peer:
        raise common.UserError("--peer_draft_model needs --peer")
    return runs


def _option_value(info, text: str):
    if info.parse is not None:
        return info.parse(text)
    kind = info.kind
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() in ("true", "1")
    return {"int": int, "float": float}.get(kind, str)(text)


def with_method_options(runs: dict[str, methods.Run], given) -> dict[str, methods.Run]:
    """``runs`` with each ``METHOD.OPTION=VALUE`` of ``--method_option`` set in every run of
    METHOD (only there: the shared option flag still sets the others); UserError for a method
    not listed, an option it does not have or a bad value."""
    from drafters import registry
    out = dict(runs)
    for entry in given:
        target, eq, text = entry.partition("=")
        method, dot, option = target.partition(".")
        if not (eq and dot and method and option):
            raise common.UserError(f"--method_option={entry!r}: use METHOD.OPTION=VALUE")
        names = [n for n, r in runs.items() if r.method == method]
        if not names:
            raise common.UserError(f"--method_option={entry!r}: {method} is not among the "
                                   f"methods run ({', '.join(runs)})")
        info = registry.get(method).options.fields().get(option)
        if info is None:
            raise common.UserError(
                f"--method_option={entry!r}: {method} has no option {option!r}; its options: "
                f"{', '.join(registry.get(method).options.fields()) or 'none'}")
        for name in names:
            try:
                options = dataclasses.replace(out[name].options,
                                              **{option: _option_value(info, text)})
            except ValueError as e:
                raise common.UserError(f"--method_option={entry!r}: {e}") from None
            out[name] = dataclasses.replace(out[name], options=options)
    return out


def _say(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


def _estimate(prompts, names, peer_modes) -> float:
    from specjax.prompts import bucket_length
    buckets = {bucket_length(len(p.ids)) for p in prompts}
    ar_s = sum(FLAGS.max_new_tokens / ASSUMED_AR_TOKENS_PER_S
               + bucket_length(len(p.ids)) * ASSUMED_PREFILL_S_PER_TOKEN for p in prompts)
    return (ar_s * (1 + (len(names) - 1) * ASSUMED_METHOD_SLOWDOWN
                    + len(peer_modes) * ASSUMED_PEER_SLOWDOWN)
            + len(names) * len(buckets) * ASSUMED_COMPILE_S)


def assisted_twin(runs: dict[str, methods.Run], peer_draft_model: Optional[str]) -> str:
    """The specjax run the peer's assisted generation mirrors: the first listed run whose
    ``draft_model`` option is ``peer_draft_model`` (cross_vocab with another tokenizer,
    draft_model with the same), else ``draft_model``."""
    for name, run in runs.items():
        if peer_draft_model and getattr(run.options, "draft_model", None) == peer_draft_model:
            return name
    return "draft_model"


def _peer_settings(runs, modes) -> bench_peer.PeerSettings:
    lookup = runs.get("prompt_lookup", methods.Run("prompt_lookup")).options.draft_len
    twin = assisted_twin(runs, FLAGS.peer_draft_model)
    options = runs[twin].options if twin in runs else methods.Run("draft_model").options
    # cross_vocab drafts draft_steps tokens of the draft vocabulary a round (0: draft_len), as
    # transformers' num_assistant_tokens counts the assistant's tokens
    assisted = getattr(options, "draft_steps", 0) or options.draft_len
    return bench_peer.PeerSettings(FLAGS.model, tuple(modes), FLAGS.max_new_tokens, lookup,
                                   assisted, FLAGS.peer_draft_model, FLAGS.peer_threads,
                                   assisted_twin=twin)


def _run_method(name, runner, prompts, results, mismatches, bar) -> list[dict]:
    lossless = runner.run.spec.lossless
    recs = []
    for p in prompts:
        rec = runner(p.ids)
        rec |= {"question_id": p.question_id, "group": p.group, "category": p.category,
                "prompt_len": len(p.ids)}
        if name != "ar":
            ref = results["ar"]["per_prompt"][len(recs)]["generated_ids"]
            idx = first_mismatch(ref, rec["generated_ids"])
            rec["matches_ar"] = idx is None
            if idx is not None:
                mm = {"method": name, "question_id": p.question_id, "group": p.group,
                      "index": idx, "ar": ref[idx:idx + 5],
                      "got": rec["generated_ids"][idx:idx + 5], "lossless": lossless}
                if lossless:
                    mismatches.append(mm)
                _say(("LOSSLESSNESS BUG: " if lossless else "(lossy method) ")
                     + f"{name} differs from ar on question {p.question_id} at token "
                     f"{idx}: ar {mm['ar']} vs {mm['got']}")
        recs.append(rec)
        if bar is not None:
            bar.update(1)
    return recs


def measure(runs: dict[str, methods.Run], loaded, prompts, groups, bar=None,
            after_ar: Optional[Callable[[dict], None]] = None,
            round_cost_calls: int = 0) -> tuple[dict, list]:
    """Every run over every prompt, one method after the other, ``ar`` (which must be the first
    run) first; each output compared with ar's token for token.

    Args:
      runs: ``{name: Run}`` (from :func:`build_runs`), params of ``loaded`` on their plan.
      prompts: Spec-Bench prompts (``experiments.spec_bench``) with ``ids`` set.
      groups: the task groups to summarise, in report order.
      bar: a tqdm bar to advance, or None; after_ar: called with ar's result when it is done.
      round_cost_calls: timed calls per loop of the round-cost breakdown (0: none).
    Returns:
      ``(results, mismatches)``: per method its records, summaries (``overall``,
      ``by_category``), compile time, options, ``round_breakdown`` (draft-then-verify methods,
      with ``round_cost_calls``); and the lossless runs' differences from ar.
    """
    import jax
    if next(iter(runs)) != "ar":
        raise ValueError("the first run must be ar (the reference)")
    runners = {name: MethodRunner(run, loaded) for name, run in runs.items()}  # errors: now
    results: dict[str, dict] = {}
    mismatches: list = []
    for name, runner in runners.items():
        if bar is not None:
            bar.set_description(name)
        recs = _run_method(name, runner, prompts, results, mismatches, bar)
        runner.release()  # its programs are done: free their code (see MethodRunner.release)
        jax.clear_caches()
        options = dataclasses.asdict(runs[name].options)
        results[name] = {"per_prompt": recs, "compile_s": runner.compile_s,
                         "buckets": runner.buckets,
                         "lossless": runs[name].spec.lossless or name == "ar",
                         "options": options, "draft_len": options.get("draft_len", 0)}
        if name == "ar" and after_ar is not None:
            after_ar(results["ar"])
    if round_cost_calls:
        from experiments import bench_round_cost
        from specjax.speculative import SpecLoop
        probe = sorted(prompts, key=lambda p: len(p.ids))[len(prompts) // 2]
        plain = runners["ar"].engine.loop
        for name, runner in runners.items():
            loop = runner.engine.loop
            # A drafter whose verify width follows its drafts is left out: the shape-only
            # drafter fills the whole tree, so it would verify wider than the method does.
            if isinstance(loop, SpecLoop) and loop.drafter.verify_widths is None:
                if bar is not None:
                    bar.set_description(f"{name} round cost")
                results[name]["round_breakdown"] = bench_round_cost.breakdown(
                    loop, plain, loaded.params, runner.dparams, probe.ids, round_cost_calls) \
                    | {"question_id": probe.question_id}
                jax.clear_caches()
    ar_recs = results["ar"]["per_prompt"]
    for name, res in results.items():
        res |= summarize(res["per_prompt"], None if name == "ar" else ar_recs, groups)
    return results, mismatches


def main(argv):
    common.start(argv)
    t_start = time.perf_counter()
    with common.user_errors():
        env_start = environment()
        runs = build_runs(FLAGS)
        names = list(runs)
        common.check_outputs(FLAGS, "output_json", "output_md", dirs=("plots",))
        config = method_flags.model_config(FLAGS)  # the architecture only, not the weights
        plan = common.mesh_plan(FLAGS.mesh, config, 1)  # one prompt at a time
        prompts = read_prompts(FLAGS.prompts, FLAGS.per_category, FLAGS.categories)
        if FLAGS.peer:
            from experiments import hf_peer
            hf_peer.resolve(FLAGS.model)  # fails now, not after the specjax half
        peer_modes = (["plain", "prompt_lookup"] + (["assisted"] if FLAGS.peer_draft_model
                                                    else [])) if FLAGS.peer else []
        groups = list(dict.fromkeys(p.group for p in prompts))
        load = os.getloadavg()[0]
        if peer_modes and load > env_start["cpu_cores"] and FLAGS.peer_threads != 1:
            _say(f"warning: load average {load:.1f} > {env_start['cpu_cores']} cores: torch "
                 "with one thread per core slows down several-fold on a busy CPU; consider "
                 "--peer_threads=1 (recorded in the output either way)")
        loaded = runs["ar"].load()  # --dtype, --attention, --scan_layers reach the model here
        for p in prompts:
            p.ids = encode_prompt(loaded.tokenizer, p.text, loaded.model.vocab_size,
                                  chat=not FLAGS.raw_prompts)
        loaded = common.place_on_mesh(loaded, plan)
        runs = {m: dataclasses.replace(r, plan=plan) for m, r in runs.items()}
        _say(f"benchmark: {len(prompts)} prompts ({', '.join(groups)}; "
             f"{min(len(p.ids) for p in prompts)}..{max(len(p.ids) for p in prompts)} tokens) x "
             f"{len(names)} methods ({', '.join(names)}) x {FLAGS.max_new_tokens} tokens"
             + (f" + peer ({', '.join(peer_modes)})" if peer_modes else "")
             + f"; rough estimate {_estimate(prompts, names, peer_modes) / 60:.0f} min on the "
             "idle 2-core dev CPU (refined after ar; a busy CPU takes several times longer)")
        settings = _peer_settings(runs, peer_modes)
        peer = bench_peer.load(loaded, settings) if peer_modes else None  # fail before the run
        from tqdm import tqdm
        bar = tqdm(total=len(prompts) * (len(names) + len(peer_modes)), unit="gen",
                   file=sys.stderr, dynamic_ncols=True)

        def after_ar(ar):
            gen_s = sum(r["wall_s"] for r in ar["per_prompt"])
            buckets = len(ar["buckets"])
            remaining = ((len(names) - 1) * (ASSUMED_METHOD_SLOWDOWN * gen_s
                                             + 2 * ar["compile_s"])
                         + len(peer_modes) * ASSUMED_PEER_SLOWDOWN * gen_s)
            _say(f"ar: {aggregate(ar['per_prompt'])['tokens_per_s']:.1f} tok/s, {gen_s:.0f}s "
                 f"generating, {ar['compile_s']:.0f}s compiling {buckets} bucket(s); "
                 f"estimated remaining ~{remaining / 60:.1f} min")

        try:  # the bar ends its line however the run ends (an interrupt prints one line)
            results, mismatches = measure(runs, loaded, prompts, groups, bar, after_ar,
                                          FLAGS.round_cost_calls)
            ar_recs = results["ar"]["per_prompt"]
            peer_result = None
            if peer is not None:
                try:
                    peer_result = bench_peer.run(peer, settings, prompts, ar_recs, groups, bar)
                except Exception as e:  # keep the specjax half of the results
                    peer_result = {"error": f"{type(e).__name__}: {e}"}
                    _say(f"error: the transformers peer failed: {peer_result['error']}")
        finally:
            bar.close()
        result = {
            "config": {"model": FLAGS.model, "prompts": FLAGS.prompts,
                       "per_category": FLAGS.per_category, "categories": FLAGS.categories,
                       "raw_prompts": FLAGS.raw_prompts, "method_option": FLAGS.method_option,
                       "methods": names, "max_new_tokens": FLAGS.max_new_tokens,
                       "acceptance": FLAGS.acceptance, "scan_layers": FLAGS.scan_layers,
                       "dtype": FLAGS.dtype, "attention": FLAGS.attention,
                       "weights": FLAGS.weights, "mesh": FLAGS.mesh,
                       "adaptive_draft": FLAGS.adaptive_draft,
                       "options": {n: results[n]["options"] for n in names},
                       "peer": FLAGS.peer, "peer_draft_model": FLAGS.peer_draft_model,
                       "peer_threads": FLAGS.peer_threads,
                       "round_cost_calls": FLAGS.round_cost_calls},
            "command": " ".join(["python -m experiments.benchmark"] + sys.argv[1:]),
            "environment": env_start | {"load_average_end": environment()["load_average"]},
            "definitions": {
                "tau": "new tokens / target forward passes (prefill included), pooled",
                "tokens_per_s": "mean over prompts of new tokens / wall seconds",
                "speedup": "tokens_per_s / ar tokens_per_s (same run; Spec-Bench)",
                "speedup_wall": "ar total wall seconds / method total wall seconds",
                "round_cost": "tau / speedup: one round's cost in plain decoding steps",
                "accept_rate_by_depth": "accepted drafts at depth d+1 / (row, round) pairs",
                "round_breakdown": "one prompt, medians of interleaved calls: round_steps = "
                                   "a round / a plain step; verify_steps = a round drafting "
                                   "the same tree shape at no cost / a plain step; "
                                   "drafting_steps = their difference"},
            "groups": groups, "num_prompts": len(prompts),
            "prompts": [{"question_id": p.question_id, "group": p.group,
                         "category": p.category, "prompt_len": len(p.ids)} for p in prompts],
            "methods": results, "peer": peer_result, "mismatches": mismatches,
            "total_s": time.perf_counter() - t_start}
        bench_report.print_summary(result)
        common.write_outputs(FLAGS, result, lambda: bench_report.markdown(result))
        if FLAGS.plots:
            from experiments import bench_plots
            for path in bench_plots.write_plots(result, FLAGS.plots):
                _say(f"wrote {path}")
        if peer_result and "error" in peer_result:
            sys.exit(1)
        if mismatches and FLAGS.fail_on_mismatch:
            print(f"error: {len(mismatches)} lossless run(s) differ from ar (see above): a bug",
                  file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_flags)
