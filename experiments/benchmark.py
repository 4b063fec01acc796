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
  * Losslessness: every lossless method's tokens are compared with ``ar``'s token for token; a
    difference is a bug, reported on stderr, in both outputs, and by exit status 1.
  * Peer (``--peer``): transformers ``generate`` on the same GGUF (float32, batch 1, greedy, the
    same EOS ids and max_new_tokens, torch threads = cores), each mode warmed up once: plain,
    prompt lookup (``prompt_lookup_num_tokens`` = our prompt_lookup draft length) and, with
    ``--peer_draft_model``, assisted generation. Its speedups are HF mode vs HF plain (same
    definition as ours); ``vs_specjax_ar`` is HF tokens/s over specjax ``ar`` tokens/s.

Models without a tokenizer (the random ``tiny-*`` test models): each prompt becomes its first
48 UTF-8 bytes (mod vocab size), no EOS.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from typing import Optional, Sequence

import numpy as np
from absl import app, flags, logging

from experiments import common, methods
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


def define_flags() -> None:
    """The benchmark's flags (defined by ``main`` only, so that other binaries can import the
    helpers of this module)."""
    flags.DEFINE_string("prompts", DEFAULT_PROMPTS,
                        "Spec-Bench question file (jsonl with question_id, category, turns).")
    flags.DEFINE_integer("per_category", 5, "Questions per task group.", lower_bound=1)
    flags.DEFINE_list("categories", None,
                      f"Task groups to run ({', '.join(GROUPS)}) or original categories (e.g. "
                      "coding); default: all.")
    flags.DEFINE_list("methods", None, "Methods to compare with ar (which always runs first), "
                      "each METHOD or METHOD:TREE (e.g. eagle:dynamic, prompt_lookup:tree); "
                      f"default: all of {', '.join(methods.METHODS)} (plus eagle:dynamic).")
    flags.DEFINE_integer("max_new_tokens", 128, "Most new tokens per prompt.", lower_bound=1)
    flags.DEFINE_string("model", "smollm2-135m", "Registry name, HF directory or .gguf file.")
    flags.DEFINE_bool("scan_layers", True, "Run the layer stack as a lax.scan (compiles ~10x "
                      "faster than the unrolled stack on CPU).")
    flags.DEFINE_bool("peer", True, "Also run transformers generate (plain and prompt lookup; "
                      "assisted generation with --peer_draft_model).")
    flags.DEFINE_string("peer_draft_model", None,
                        "Peer assisted generation's draft model: a registry name, .gguf file, "
                        "HF directory, or first_layers:N (the target's first N layers, like "
                        "specjax's default draft_model).")
    flags.DEFINE_integer("peer_threads", 0, "torch threads of the peer (0 = the core count). "
                         "On a CPU shared with other jobs torch's OpenMP threads degrade much "
                         "worse than XLA's (seen: 3 tok/s with 2 threads vs 14 with 1).",
                         lower_bound=0)
    flags.DEFINE_string("output_json", None, "Write all results here (atomically).")
    flags.DEFINE_string("output_md", None, "Write the Markdown tables here (atomically).")
    flags.DEFINE_bool("fail_on_mismatch", True, "Exit with status 1 when a lossless method's "
                      "output differs from ar's (after writing the outputs).")
    methods.define_flags()
    common.define_mesh_flags()


# ----------------------------------------------------------------------------------- running


def load_model(name: str, scan_layers: bool):
    from models import registry
    return registry.load(name, scan_layers=scan_layers)


class MethodRunner:
    """One method on one loaded model: compiled once per prompt bucket, then timed per prompt."""

    def __init__(self, run: methods.Run, loaded, drafter=None):
        """``drafter``: ``(drafter, params)`` to use instead of ``run.drafter(loaded)``."""
        import jax
        self.run, self.loaded = run, loaded
        self.config = run.config_for(loaded)
        self.drafter, self.dparams = drafter if drafter is not None else run.drafter(loaded)
        self.key = jax.random.key(run.seed)
        self._compiled: dict[int, object] = {}
        self.compile_s = 0.0
        self.warmed = False

    @property
    def buckets(self) -> list[int]:
        return sorted(self._compiled)

    def _fn(self, batch):
        from specjax import decode, speculative
        bucket = int(batch.tokens.shape[1])
        if bucket not in self._compiled:
            m, p = self.loaded.model, self.loaded.params
            t0 = time.perf_counter()
            if self.drafter is None:
                fn = decode.compile_generate(m, p, batch, self.config, self.key,
                                             plan=self.run.plan)
                call = lambda b: fn(p, b, self.key)  # noqa: E731
            else:
                fn, _ = speculative.compile_speculative_generate(
                    m, p, self.drafter, self.dparams, batch, self.config, self.run.spec, self.key,
                    plan=self.run.plan)
                call = lambda b: fn(p, self.dparams, b, self.key)  # noqa: E731
            self.compile_s += time.perf_counter() - t0
            self._compiled[bucket] = call
        return self._compiled[bucket]

    def __call__(self, ids: Sequence[int]) -> dict:
        """Generates for one prompt; returns its record (tokens, timing, statistics)."""
        import jax
        from specjax import decode
        batch = decode.prepare_batch([ids], self.loaded.model.vocab_size, self.run.plan)
        fn = self._fn(batch)
        if not self.warmed:
            jax.block_until_ready(fn(batch))
            self.warmed = True
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(batch))
        wall = time.perf_counter() - t0
        n = int(np.asarray(out.lengths)[0])
        gen = np.asarray(out.tokens)[0, :n].tolist()
        stats = out.stats
        rec = {"bucket": int(batch.tokens.shape[1]), "generated_ids": gen, "new_tokens": n,
               "wall_s": wall, "tokens_per_s": n / wall if wall > 0 else 0.0}
        if self.drafter is None:
            rec["target_calls"] = int(stats.target_calls)
        else:
            rec |= {"target_calls": int(stats.row_calls), "rounds": int(stats.row_rounds),
                    "drafted": int(stats.drafted), "accepted": int(stats.accepted),
                    "accepted_at_depth": [int(a) for a in np.asarray(stats.accepted_at_depth)]}
        rec["tau"] = n / max(1, rec["target_calls"])
        return rec


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first differing token (a length difference counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def aggregate(records: Sequence[dict], baseline: Optional[Sequence[dict]] = None) -> dict:
    """Pooled metrics of some prompts' records (see the module docstring)."""
    new = sum(r["new_tokens"] for r in records)
    wall = sum(r["wall_s"] for r in records)
    tps = float(np.mean([r["tokens_per_s"] for r in records])) if records else 0.0
    out = {"prompts": len(records), "new_tokens": new, "wall_s": wall, "tokens_per_s": tps,
           "tokens_per_s_total": new / wall if wall > 0 else 0.0}
    if records and "target_calls" in records[0]:
        out["target_calls"] = sum(r["target_calls"] for r in records)
        out["tau"] = new / max(1, out["target_calls"])
    if records and "rounds" in records[0]:
        rounds = sum(r["rounds"] for r in records)
        drafted = sum(r["drafted"] for r in records)
        accepted = sum(r["accepted"] for r in records)
        depth = np.sum([r["accepted_at_depth"] for r in records], axis=0)
        out |= {"rounds": rounds, "acceptance_rate": accepted / max(1, drafted),
                "accept_rate_by_depth": [round(float(a) / max(1, rounds), 4) for a in depth]}
    if baseline:
        base = aggregate(baseline)
        out["speedup"] = tps / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
        out["speedup_wall"] = base["wall_s"] / wall if wall > 0 else 0.0
    if records and "matches_ar" in records[0]:
        out["mismatches"] = sum(not r["matches_ar"] for r in records)
    return out


def summarize(records: Sequence[dict], baseline: Optional[Sequence[dict]], groups: Sequence[str]
              ) -> dict:
    """``{"by_category": {group: metrics}, "overall": metrics}``; records and baseline are in
    prompt order and carry ``group``."""
    by = {}
    for g in groups:
        idx = [i for i, r in enumerate(records) if r["group"] == g]
        by[g] = aggregate([records[i] for i in idx],
                          [baseline[i] for i in idx] if baseline else None)
    return {"by_category": by, "overall": aggregate(records, baseline)}


# ----------------------------------------------------------------------------------- output


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` atomically (no partial file on failure)."""
    from specjax.files import write_text_atomic as write
    write(path, text)


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _f(x, digits=2, suffix=""):
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def markdown(result: dict) -> str:
    cfg = result["config"]
    groups = result["groups"]
    out = [f"# specjax benchmark: {cfg['model']}",
           "",
           f"{result['num_prompts']} prompts ({cfg['per_category']} per task group, first turn, "
           f"chat template), batch 1, greedy, float32, max_new_tokens={cfg['max_new_tokens']}, "
           f"{result['environment']['cpu_cores']} CPU cores, jax {result['environment']['jax']}"
           f" ({result['environment']['jax_backend']}), load average "
           f"{result['environment']['load_average'][0]:.1f} at the start, "
           f"{result['environment']['load_average_end'][0]:.1f} at the end (timings are only "
           "comparable on an otherwise idle machine). Speedup = mean per-prompt tokens/s over "
           "ar's in the same run (Spec-Bench); tau = new tokens / target forward passes.", ""]
    if result["mismatches"]:
        out += [f"**LOSSLESSNESS FAILURES: {len(result['mismatches'])} prompt(s) differ from ar "
                "(a bug):** " + ", ".join(f"{m['method']} q{m['question_id']}@{m['index']}"
                                          for m in result["mismatches"]), ""]
    rows = []
    for name, m in result["methods"].items():
        o = m["overall"]
        rows.append([name, _f(o.get("tau")), _f(o["tokens_per_s"], 1), _f(o.get("speedup"),
                     2, "x"), _f(o.get("speedup_wall"), 2, "x"),
                     _f(o.get("acceptance_rate"), 3),
                     " ".join(f"{a:.2f}" for a in o.get("accept_rate_by_depth", [])) or "-",
                     o.get("mismatches", 0) if m["lossless"] else "lossy",
                     _f(m["compile_s"], 1)])
    out += ["## Overall", "", md_table(["method", "tau", "tok/s", "speedup", "speedup (wall)",
                                        "accept rate", "accept rate by depth", "mismatches",
                                        "compile s"], rows), ""]
    rows = []
    for name, m in result["methods"].items():
        cells = []
        for g in groups + ["overall"]:
            a = m["overall"] if g == "overall" else m["by_category"][g]
            cells.append(f"{_f(a.get('speedup'), 2, 'x')} / {_f(a.get('tau'))}")
        rows.append([name] + cells)
    out += ["## Speedup / tau by task group", "", md_table(["method"] + groups + ["overall"], rows),
            ""]
    rows = []
    for name, m in result["methods"].items():
        rows.append([name] + [_f(m["by_category"][g]["tokens_per_s"], 1) for g in groups]
                    + [_f(m["overall"]["tokens_per_s"], 1)])
    peer = result.get("peer")
    if peer and "error" in peer:
        out += [f"**The transformers peer failed:** {peer['error']}", ""]
        peer = None
    if peer:
        for name, m in peer["modes"].items():
            rows.append([f"HF {name}"] + [_f(m["by_category"][g]["tokens_per_s"], 1)
                                          for g in groups] + [_f(m["overall"]["tokens_per_s"], 1)])
    out += ["## Tokens/s by task group", "", md_table(["method"] + groups + ["overall"], rows), ""]
    if peer:
        rows = []
        ours = {"plain": "ar", "prompt_lookup": "prompt_lookup", "assisted": "draft_model"}
        for name, m in peer["modes"].items():
            o = m["overall"]
            mine = result["methods"].get(ours[name], {}).get("overall", {})
            rows.append([name, _f(o["tokens_per_s"], 1), _f(o.get("tau")),
                         _f(o.get("speedup"), 2, "x"), _f(o.get("vs_specjax_ar"), 2, "x"),
                         ours[name], _f(mine.get("tokens_per_s"), 1),
                         _f(mine.get("speedup"), 2, "x"),
                         f"{o['matches_specjax_ar']}/{o['prompts']}"])
        out += [f"## Hugging Face transformers {peer['transformers']} peer (torch "
                f"{peer['torch']}, torch threads {peer['threads']}; load {peer['load_s']:.0f}s)", "",
                md_table(["HF mode", "tok/s", "tau", "speedup vs HF plain",
                          "HF tok/s / specjax ar tok/s", "specjax twin", "specjax tok/s",
                          "specjax speedup", "same tokens as specjax ar"], rows), ""]
    out += [f"Command: `{result['command']}`", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- main


def _validate(FLAGS) -> tuple[list[str], bool]:
    """Flag checks that need no model; returns (methods to run, ar first; lossless?)."""
    if FLAGS["method"].present:
        raise common.UserError("--method is generate.py's flag; the benchmark takes --methods")
    # sjd is jacobi under greedy decoding, so the greedy benchmark runs it only when asked; the
    # head drafters run by default only where trained weights ship for the model.
    names = list(FLAGS.methods) if FLAGS.methods else [
        m for m in methods.METHODS if m != "sjd" and methods.has_weights(m, FLAGS.model)]
    if not FLAGS.methods and "eagle" in names:
        names.insert(names.index("eagle") + 1, "eagle:dynamic")
    unknown = [m for m in names if _split(m)[0] not in methods.METHODS]
    if unknown:
        raise common.UserError(f"unknown --methods {unknown}; choose from "
                               f"{', '.join(methods.METHODS)} (optionally METHOD:TREE)")
    for name in names:  # trees valid per method
        method, tree = _split(name)
        methods.tree_for(method, tree or FLAGS.tree, bool(tree) or FLAGS["tree"].present)
    names = ["ar"] + [m for m in dict.fromkeys(names) if m != "ar"]
    if FLAGS.peer_draft_model and not FLAGS.peer:
        raise common.UserError("--peer_draft_model needs --peer")
    return names, FLAGS.acceptance == "auto"


def _split(name: str) -> tuple[str, str]:
    """``"eagle:dynamic"`` -> ``("eagle", "dynamic")``; ``"medusa"`` -> ``("medusa", "")``."""
    method, _, tree = name.partition(":")
    return method, tree


def _make_run(name: str, FLAGS) -> methods.Run:
    from specjax import decode
    method, tree = _split(name)
    tree = methods.tree_for(method, tree or FLAGS.tree, bool(tree) or FLAGS["tree"].present)
    try:
        config = decode.DecodeConfig(max_new_tokens=FLAGS.max_new_tokens)
        spec = methods.spec_config(FLAGS)
        skip = methods.parse_layers(FLAGS.skip_layers)
    except ValueError as e:
        raise common.UserError(str(e)) from e
    return methods.Run(method=method, model_name=FLAGS.model, config=config, spec=spec,
                       draft_len=FLAGS.draft_len, draft_model=FLAGS.draft_model,
                       draft_layers=FLAGS.draft_layers, skip_layers=skip,
                       num_branches=FLAGS.num_branches if tree == "tree" else 1,
                       window=FLAGS.window, ngram=FLAGS.ngram, guess_set=FLAGS.guess_set,
                       jacobi_init=FLAGS.jacobi_init,
                       eagle_tree=tree if method == "eagle" else "static",
                       head_tree=tree if method in ("medusa", "hydra") else "tuned",
                       adaptive_draft=FLAGS.adaptive_draft)


def _draft_len(name: str) -> int:
    return FLAGS.draft_len or methods.METHODS[_split(name)[0]].get("draft_len", 0)


def _environment() -> dict:
    import jax
    from experiments import hf_peer
    return {"jax": jax.__version__, "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_cores": hf_peer.num_cores(),
            "python": platform.python_version(), "machine": platform.machine(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _say(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    t_start = time.perf_counter()
    with common.user_errors():
        env_start = _environment()
        names, lossless = _validate(FLAGS)
        runs = {m: _make_run(m, FLAGS) for m in names}
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
        loaded = load_model(FLAGS.model, FLAGS.scan_layers)
        for p in prompts:
            p.ids = encode_prompt(loaded.tokenizer, p.text, loaded.model.vocab_size)
        plan = common.mesh_plan(FLAGS.mesh, loaded.model.config, 1)  # one prompt at a time
        loaded = common.place_on_mesh(loaded, plan)
        runs = {m: dataclasses.replace(r, plan=plan) for m, r in runs.items()}
        runners = {m: MethodRunner(runs[m], loaded) for m in names}  # drafter errors: now
        from specjax.prompts import bucket_length
        buckets = sorted({bucket_length(len(p.ids)) for p in prompts})
        ar_s = sum(FLAGS.max_new_tokens / ASSUMED_AR_TOKENS_PER_S
                   + bucket_length(len(p.ids)) * ASSUMED_PREFILL_S_PER_TOKEN for p in prompts)
        est = (ar_s * (1 + (len(names) - 1) * ASSUMED_METHOD_SLOWDOWN
                       + len(peer_modes) * ASSUMED_PEER_SLOWDOWN)
               + len(names) * len(buckets) * ASSUMED_COMPILE_S)
        _say(f"benchmark: {len(prompts)} prompts ({', '.join(groups)}; "
             f"{min(len(p.ids) for p in prompts)}..{max(len(p.ids) for p in prompts)} tokens, "
             f"buckets {buckets}) x {len(names)} methods ({', '.join(names)}) x "
             f"{FLAGS.max_new_tokens} tokens" + (f" + peer ({', '.join(peer_modes)})"
                                                 if peer_modes else "")
             + f"; rough estimate {est / 60:.0f} min on the idle 2-core dev CPU (refined after "
             "ar; a busy CPU takes several times longer)")
        peer = _load_peer(loaded, peer_modes) if peer_modes else None  # fail before the long part
        from tqdm import tqdm
        bar = tqdm(total=len(prompts) * (len(names) + len(peer_modes)), unit="gen",
                   file=sys.stderr, dynamic_ncols=True)
        results: dict[str, dict] = {}
        mismatches = []
        for method in names:
            bar.set_description(method)
            runner = runners[method]
            recs = []
            for p in prompts:
                rec = runner(p.ids)
                rec |= {"question_id": p.question_id, "group": p.group, "category": p.category,
                        "prompt_len": len(p.ids)}
                if method != "ar":
                    ref = results["ar"]["per_prompt"][len(recs)]["generated_ids"]
                    idx = first_mismatch(ref, rec["generated_ids"])
                    rec["matches_ar"] = idx is None
                    if idx is not None:
                        mm = {"method": method, "question_id": p.question_id, "group": p.group,
                              "index": idx, "ar": ref[idx:idx + 5],
                              "got": rec["generated_ids"][idx:idx + 5], "lossless": lossless}
                        if lossless:
                            mismatches.append(mm)
                        _say(("LOSSLESSNESS BUG: " if lossless else "(lossy method) ")
                             + f"{method} differs from ar on question {p.question_id} at token "
                             f"{idx}: ar {mm['ar']} vs {mm['got']}")
                recs.append(rec)
                bar.update(1)
            results[method] = {"per_prompt": recs, "compile_s": runner.compile_s,
                               "buckets": runner.buckets, "lossless": lossless or method == "ar",
                               "draft_len": _draft_len(method) if method != "ar" else 0}
            if method == "ar":
                gen_s = sum(r["wall_s"] for r in recs)
                per_compile = runner.compile_s / max(1, len(runner.buckets))
                remaining = ((len(names) - 1) * (ASSUMED_METHOD_SLOWDOWN * gen_s
                                                 + len(runner.buckets) * per_compile * 2)
                             + len(peer_modes) * ASSUMED_PEER_SLOWDOWN * gen_s)
                _say(f"ar: {aggregate(recs)['tokens_per_s']:.1f} tok/s, {gen_s:.0f}s generating, "
                     f"{runner.compile_s:.0f}s compiling {len(runner.buckets)} bucket(s); "
                     f"estimated remaining ~{remaining / 60:.1f} min")
        ar_recs = results["ar"]["per_prompt"]
        for method, res in results.items():
            res |= summarize(res["per_prompt"], None if method == "ar" else ar_recs, groups)
        peer_result = None
        if peer is not None:
            try:
                peer_result = _run_peer(peer, prompts, peer_modes, ar_recs, groups, bar)
            except Exception as e:  # keep the specjax half of the results
                peer_result = {"error": f"{type(e).__name__}: {e}"}
                _say(f"error: the transformers peer failed: {peer_result['error']}")
        bar.close()
        result = {
            "config": {"model": FLAGS.model, "prompts": FLAGS.prompts,
                       "per_category": FLAGS.per_category, "categories": FLAGS.categories,
                       "methods": names, "max_new_tokens": FLAGS.max_new_tokens,
                       "acceptance": FLAGS.acceptance, "scan_layers": FLAGS.scan_layers,
                       "draft_len": FLAGS.draft_len, "draft_layers": FLAGS.draft_layers,
                       "draft_model": FLAGS.draft_model, "skip_layers": FLAGS.skip_layers,
                       "tree": FLAGS.tree, "num_branches": FLAGS.num_branches,
                       "mesh": FLAGS.mesh, "adaptive_draft": FLAGS.adaptive_draft,
                       "peer": FLAGS.peer, "peer_draft_model": FLAGS.peer_draft_model,
                       "peer_threads": FLAGS.peer_threads},
            "command": " ".join(["python -m experiments.benchmark"] + sys.argv[1:]),
            "environment": env_start | {"load_average_end": _environment()["load_average"]},
            "definitions": {
                "tau": "new tokens / target forward passes (prefill included), pooled",
                "tokens_per_s": "mean over prompts of new tokens / wall seconds",
                "speedup": "tokens_per_s / ar tokens_per_s (same run; Spec-Bench)",
                "speedup_wall": "ar total wall seconds / method total wall seconds",
                "accept_rate_by_depth": "accepted drafts at depth d+1 / (row, round) pairs"},
            "groups": groups, "num_prompts": len(prompts),
            "prompts": [{"question_id": p.question_id, "group": p.group,
                         "category": p.category, "prompt_len": len(p.ids)} for p in prompts],
            "methods": results, "peer": peer_result, "mismatches": mismatches,
            "total_s": time.perf_counter() - t_start}
        _print_summary(result)
        if FLAGS.output_json:
            common.write_json_atomic(FLAGS.output_json, result)
        if FLAGS.output_md:
            write_text_atomic(FLAGS.output_md, markdown(result))
        if peer_result and "error" in peer_result:
            sys.exit(1)
        if mismatches and FLAGS.fail_on_mismatch:
            print(f"error: {len(mismatches)} lossless run(s) differ from ar (see above): a bug",
                  file=sys.stderr)
            sys.exit(1)


def _load_peer(loaded, modes):
    from experiments import hf_peer
    tok = loaded.tokenizer
    if tok is None:
        raise common.UserError(f"the transformers peer needs a tokenizer's EOS ids; "
                               f"{FLAGS.model} has none (use --nopeer)")
    t0 = time.perf_counter()
    draft = FLAGS.peer_draft_model if "assisted" in modes else None
    try:
        peer = hf_peer.Peer.load(FLAGS.model, eos_ids=tok.eos_ids, pad_id=tok.pad_id, draft=draft,
                                 num_threads=FLAGS.peer_threads or None)
    except (ValueError, OSError) as e:
        raise common.UserError(f"the transformers peer failed to load: {e}") from e
    peer.load_s = time.perf_counter() - t0
    return peer


def _run_peer(peer, prompts, modes, ar_recs, groups, bar) -> dict:
    import torch
    import transformers
    out = {"transformers": transformers.__version__, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "load_s": peer.load_s, "modes": {}}
    plain = None
    for mode in modes:
        bar.set_description(f"HF {mode}")
        recs = []
        for p, ar in zip(prompts, ar_recs):
            if mode == "plain":
                r = peer.generate(p.ids, FLAGS.max_new_tokens)
            elif mode == "prompt_lookup":
                r = peer.generate(p.ids, FLAGS.max_new_tokens,
                                  prompt_lookup_num_tokens=_draft_len("prompt_lookup"))
            else:
                r = peer.generate(p.ids, FLAGS.max_new_tokens, assisted=True,
                                  draft_len=_draft_len("draft_model"))
            rec = {"question_id": p.question_id, "group": p.group, "generated_ids": r.generated,
                   "new_tokens": len(r.generated), "wall_s": r.wall_s,
                   "tokens_per_s": r.tokens_per_s, "target_calls": r.target_calls,
                   "draft_calls": r.draft_calls, "tau": r.tau,
                   "matches_specjax_ar": first_mismatch(ar["generated_ids"], r.generated) is None}
            if plain is not None:
                rec["matches_hf_plain"] = first_mismatch(
                    plain[len(recs)]["generated_ids"], r.generated) is None
            recs.append(rec)
            bar.update(1)
        summary = summarize(recs, plain, groups)
        for key, agg in [("overall", summary["overall"])] + list(summary["by_category"].items()):
            sel = recs if key == "overall" else [r for r in recs if r["group"] == key]
            mine = aggregate([a for a in ar_recs if key == "overall" or a["group"] == key])
            agg["vs_specjax_ar"] = (agg["tokens_per_s"] / mine["tokens_per_s"]
                                    if mine["tokens_per_s"] else 0.0)
            agg["matches_specjax_ar"] = sum(r["matches_specjax_ar"] for r in sel)
        out["modes"][mode] = {"per_prompt": recs, **summary}
        if mode == "plain":
            plain = recs
    return out


def _print_summary(result: dict) -> None:
    lines = [f"{'method':<16}{'tau':>7}{'tok/s':>9}{'speedup':>9}{'mismatch':>10}"]
    for name, m in result["methods"].items():
        o = m["overall"]
        lines.append(f"{name:<16}{_f(o.get('tau')):>7}{_f(o['tokens_per_s'], 1):>9}"
                     f"{_f(o.get('speedup'), 2, 'x'):>9}{o.get('mismatches', 0):>10}")
    if result.get("peer") and "modes" in result["peer"]:
        for name, m in result["peer"]["modes"].items():
            o = m["overall"]
            lines.append(f"{'HF ' + name:<16}{_f(o.get('tau')):>7}{_f(o['tokens_per_s'], 1):>9}"
                         f"{_f(o.get('speedup'), 2, 'x'):>9}{'':>10}")
    lines.append(f"total {result['total_s'] / 60:.1f} min")
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)
