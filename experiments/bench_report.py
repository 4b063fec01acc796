"""Benchmark reports: the Markdown tables and the console summary of a result dict (the
``--output_json`` of :mod:`experiments.benchmark`); plots are :mod:`experiments.bench_plots`."""

from __future__ import annotations

from typing import Sequence


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def _f(x, digits=2, suffix=""):
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def round_cost(metrics: dict):
    """``tau / speedup``: what one round costs in plain decoding steps (None for ar)."""
    tau, speedup = metrics.get("tau"), metrics.get("speedup")
    return tau / speedup if tau and speedup else None


def markdown(result: dict) -> str:
    cfg = result["config"]
    groups = result["groups"]
    out = [f"# specjax benchmark: {cfg['model']}",
           "",
           f"{result['num_prompts']} prompts ({cfg['per_category']} per task group, first turn, "
           f"{'raw, no chat template' if cfg.get('raw_prompts') else 'chat template'}), "
           f"batch 1, greedy, {cfg.get('dtype', 'float32')} activations, "
           f"weights {cfg.get('weights', 'float32')}, "
           f"max_new_tokens={cfg['max_new_tokens']}, "
           f"{result['environment']['cpu_cores']} CPU cores, jax {result['environment']['jax']}"
           f" ({result['environment']['jax_backend']}), load average "
           f"{result['environment']['load_average'][0]:.1f} at the start, "
           f"{result['environment']['load_average_end'][0]:.1f} at the end (timings are only "
           "comparable on an otherwise idle machine). Speedup = mean per-prompt tokens/s over "
           "ar's in the same run (Spec-Bench); tau = new tokens / target forward passes; "
           "round cost = tau / speedup, one round's cost in plain decoding steps.", ""]
    if result["mismatches"]:
        out += [f"**LOSSLESSNESS FAILURES: {len(result['mismatches'])} prompt(s) differ from ar "
                "(a bug):** " + ", ".join(f"{m['method']} q{m['question_id']}@{m['index']}"
                                          for m in result["mismatches"]), ""]
    rows = []
    for name, m in result["methods"].items():
        o = m["overall"]
        rows.append([name, _f(o.get("tau")), _f(o["tokens_per_s"], 1), _f(o.get("speedup"),
                     2, "x"), _f(o.get("speedup_wall"), 2, "x"), _f(round_cost(o)),
                     _f(o.get("acceptance_rate"), 3),
                     " ".join(f"{a:.2f}" for a in o.get("accept_rate_by_depth", [])) or "-",
                     o.get("mismatches", 0) if m["lossless"] else "lossy",
                     _f(m["compile_s"], 1)])
    out += ["## Overall", "", md_table(["method", "tau", "tok/s", "speedup", "speedup (wall)",
                                        "round cost", "accept rate", "accept rate by depth",
                                        "mismatches",
                                        "compile s"], rows), ""]
    parts = {n: m["round_breakdown"] for n, m in result["methods"].items()
             if "round_breakdown" in m}
    if parts:
        probe = next(iter(parts.values()))
        rows = [[name, _f(b["round_steps"]), _f(b["verify_steps"]), _f(b["drafting_steps"]),
                 _f(1e3 * b["step_s"], 1)] for name, b in parts.items()]
        out += ["## Round cost breakdown (plain decoding steps per round)", "",
                f"One prompt (question {probe.get('question_id')}), medians of "
                f"{probe['calls']} interleaved calls per loop: a round of the method, the same "
                "round with a drafter that drafts the same tree shape at no cost (verify), and "
                "a plain step; drafting = round - verify. Drafters whose verify width follows "
                "their drafts (prompt lookup, the adaptive wrapper) are left out.", "",
                md_table(["method", "round", "verify", "drafting", "plain step ms"], rows), ""]
    rows = []
    for name, m in result["methods"].items():
        cells = []
        for g in groups + ["overall"]:
            a = m["overall"] if g == "overall" else m["by_category"][g]
            cells.append(f"{_f(a.get('speedup'), 2, 'x')} / {_f(a.get('tau'))}")
        rows.append([name] + cells)
    out += ["## Speedup / tau by task group", "", md_table(["method"] + groups + ["overall"], rows),
            ""]
    rows = [[name] + [_f(round_cost(m["overall"] if g == "overall" else m["by_category"][g]))
                      for g in groups + ["overall"]]
            for name, m in result["methods"].items() if name != "ar"]
    out += ["## Round cost (tau / speedup, in plain decoding steps) by task group", "",
            md_table(["method"] + groups + ["overall"], rows), ""]
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
        ours = peer.get("twins") or {"plain": "ar", "prompt_lookup": "prompt_lookup",
                                     "assisted": "draft_model"}
        for name, m in peer["modes"].items():
            o = m["overall"]
            mine = result["methods"].get(ours[name], {}).get("overall", {})
            rows.append([name, _f(o["tokens_per_s"], 1), _f(o.get("tau")),
                         _f(o.get("speedup"), 2, "x"), _f(o.get("vs_specjax_ar"), 2, "x"),
                         ours[name], _f(mine.get("tokens_per_s"), 1),
                         _f(mine.get("speedup"), 2, "x"),
                         f"{o['matches_specjax_ar']}/{o['prompts']}"])
        out += [f"## Hugging Face transformers {peer['transformers']} peer (torch "
                f"{peer['torch']}, torch threads {peer['threads']}; load "
                f"{peer['load_s']:.0f}s)", "",
                md_table(["HF mode", "tok/s", "tau", "speedup vs HF plain",
                          "HF tok/s / specjax ar tok/s", "specjax twin", "specjax tok/s",
                          "specjax speedup", "same tokens as specjax ar"], rows), ""]
    out += [f"Command: `{result['command']}`", ""]
    return "\n".join(out)




def print_summary(result: dict) -> None:
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


