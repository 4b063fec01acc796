"""Plain autoregressive decoding, three ways, on the same model and prompts in one run:

* ``generate``: specjax's on-device loop (prefill + ``lax.while_loop`` in one executable,
  compiled ahead of time per prompt bucket, warmed up once);
* ``stream``: the same jitted step driven from a Python loop (``specjax.decode.stream``: one
  dispatch and one host sync per token; warmed up per bucket);
* ``hf``: transformers ``model.generate`` on the same checkpoint (GGUF dequantized to float32,
  torch threads = cores, warmed up once).

Batch 1, greedy, float32. Each prompt is timed once per way, prefill included; tokens/s is the
mean over prompts of new tokens / seconds, and the ratios are between those means. The three
token sequences are compared (``stream`` must equal ``generate`` exactly; ``hf`` may differ in
rare near-ties of float32 arithmetic).

  python -m experiments.benchmark_ar                                # 3 prompts, 128 tokens
  python -m experiments.benchmark_ar --num_prompts=1 --max_new_tokens=16 --nohf
"""

from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags

from experiments import common, method_flags, spec_bench
from experiments.bench_metrics import first_mismatch
from experiments.bench_report import md_table
from experiments.benchmark import DEFAULT_PROMPTS
from experiments.bench_runner import environment

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Registry name, HF directory or .gguf file.")
flags.DEFINE_string("prompts", DEFAULT_PROMPTS, "Spec-Bench question file (jsonl).")
flags.DEFINE_integer("num_prompts", 3, "Prompts: the first question of the first "
                     "num_prompts task groups of --categories.", lower_bound=1)
flags.DEFINE_list("categories", ["mt_bench", "translation", "qa", "math_reasoning",
                                 "summarization", "rag"], "Task groups to draw prompts from.")
flags.DEFINE_integer("max_new_tokens", 128, "Most new tokens per prompt.", lower_bound=1)
flags.DEFINE_bool("scan_layers", True, "Run the layer stack as a lax.scan.")
flags.DEFINE_bool("hf", True, "Also time transformers generate on the same checkpoint.")
flags.DEFINE_integer("hf_threads", 0, "torch threads (0 = the core count).", lower_bound=0)
flags.DEFINE_string("output_json", None, "Write the results here (atomically).")
flags.DEFINE_string("output_md", None, "Write a Markdown table here (atomically).")
method_flags.define_model_flags()
flags.adopt_module_key_flags(method_flags)


def _time_generate(model, params, batch, config, key, cache):
    from specjax.engine import Engine
    bucket = int(batch.tokens.shape[1])
    if bucket not in cache:
        cache[bucket] = Engine(model, config).compile(params, None, batch, key)
        cache[bucket].run()  # warm-up
    gen = cache[bucket].run(batch)
    return gen.tokens[0], gen.wall_s, gen.stats.target_calls


def _stream_once(model, params, batch, config, key, limit=None):
    from specjax import decode
    gen, calls = [], 0
    for tokens, emitted in decode.stream(model, params, batch, config, key):
        calls += 1
        if emitted[0]:
            gen.append(int(tokens[0]))
        if limit and calls >= limit:
            break
    return gen, calls


def _time_stream(model, params, batch, config, key, warmed):
    bucket = int(batch.tokens.shape[1])
    if bucket not in warmed:  # compiles the start and the step for this bucket
        _stream_once(model, params, batch, config, key, limit=3)
        warmed.add(bucket)
    t0 = time.perf_counter()
    gen, calls = _stream_once(model, params, batch, config, key)
    return gen, time.perf_counter() - t0, calls


def main(argv):
    common.start(argv)
    t_start = time.perf_counter()
    with common.user_errors():
        env_start = environment()
        common.check_outputs(FLAGS, "output_json", "output_md")
        method_flags.model_config(FLAGS)  # --max_new_tokens against the context, no weights
        import jax
        from specjax import decode
        from specjax.prompts import make_prompt_batch
        prompts = spec_bench.read_prompts(FLAGS.prompts, 1, FLAGS.categories)[:FLAGS.num_prompts]
        if FLAGS.hf:
            from experiments import hf_peer
            hf_peer.resolve(FLAGS.model)
        print(f"benchmark_ar: {len(prompts)} prompts x {FLAGS.max_new_tokens} tokens, "
              f"generate / stream{' / hf' if FLAGS.hf else ''}", file=sys.stderr)
        loaded = method_flags.load_model(FLAGS)
        eos = loaded.tokenizer.eos_ids if loaded.tokenizer is not None else ()
        config = decode.DecodeConfig(max_new_tokens=FLAGS.max_new_tokens, eos_ids=tuple(eos))
        key = jax.random.key(0)
        peer = None
        if FLAGS.hf:
            from experiments import hf_peer
            peer = hf_peer.Peer.load(FLAGS.model, eos_ids=eos, pad_id=loaded.tokenizer.pad_id,
                                     num_threads=FLAGS.hf_threads or None)
        compiled, warmed, rows = {}, set(), []
        for p in prompts:
            ids = spec_bench.encode_prompt(loaded.tokenizer, p.text, loaded.model.vocab_size)
            batch = make_prompt_batch([ids], vocab_size=loaded.model.vocab_size)
            row = {"question_id": p.question_id, "group": p.group, "prompt_len": len(ids),
                   "bucket": int(batch.tokens.shape[1])}
            g, wall, calls = _time_generate(loaded.model, loaded.params, batch, config, key,
                                            compiled)
            row["generate"] = {"new_tokens": len(g), "wall_s": wall, "target_calls": calls,
                               "tokens_per_s": len(g) / wall}
            s, wall, calls = _time_stream(loaded.model, loaded.params, batch, config, key, warmed)
            row["stream"] = {"new_tokens": len(s), "wall_s": wall, "target_calls": calls,
                             "tokens_per_s": len(s) / wall, "same_tokens_as_generate": s == g}
            if s != g:
                print(f"BUG: stream and generate differ on question {p.question_id} at token "
                      f"{first_mismatch(g, s)}", file=sys.stderr)
            if peer is not None:
                r = peer.generate(ids, FLAGS.max_new_tokens)
                row["hf"] = {"new_tokens": len(r.generated), "wall_s": r.wall_s,
                             "target_calls": r.target_calls, "tokens_per_s": r.tokens_per_s,
                             "same_tokens_as_generate": r.generated == g,
                             "first_difference": first_mismatch(g, r.generated)}
            rows.append(row)
            print(f"  q{p.question_id} ({p.group}, {len(ids)} tokens): " + ", ".join(
                f"{k} {row[k]['tokens_per_s']:.1f} tok/s" for k in ("generate", "stream", "hf")
                if k in row), file=sys.stderr)
        ways = ["generate", "stream"] + (["hf"] if peer is not None else [])
        mean = {k: float(np.mean([r[k]["tokens_per_s"] for r in rows])) for k in ways}
        ratios = {"generate/stream": mean["generate"] / mean["stream"]}
        if peer is not None:
            ratios |= {"generate/hf": mean["generate"] / mean["hf"],
                       "stream/hf": mean["stream"] / mean["hf"]}
        env = env_start
        result = {"config": {"model": FLAGS.model, "max_new_tokens": FLAGS.max_new_tokens,
                             "num_prompts": len(rows), "scan_layers": FLAGS.scan_layers,
                             "dtype": "float32", "batch": 1, "greedy": True},
                  "environment": env, "tokens_per_s": mean, "ratios": ratios,
                  "per_prompt": rows, "total_s": time.perf_counter() - t_start,
                  "command": " ".join(["python -m experiments.benchmark_ar"] + sys.argv[1:])}
        if peer is not None:
            import torch
            import transformers
            result["environment"] |= {"torch": torch.__version__, "torch_threads":
                                      torch.get_num_threads(),
                                      "transformers": transformers.__version__}
        for k in ways:
            print(f"{k:<9} {mean[k]:8.1f} tok/s")
        for k, v in ratios.items():
            print(f"{k:<16} {v:6.2f}x")

        def markdown() -> str:
            table = md_table(
                ["way", "tok/s", "vs generate", "same tokens as generate"],
                [[k, f"{mean[k]:.1f}", f"{mean[k] / mean['generate']:.2f}x",
                  "-" if k == "generate" else
                  f"{sum(r[k]['same_tokens_as_generate'] for r in rows)}/{len(rows)}"]
                 for k in ways])
            text = (f"# Plain decoding: specjax generate vs Python-driven stream vs transformers"
                    f"\n\n{FLAGS.model}, {len(rows)} prompts, batch 1, greedy, float32, "
                    f"max_new_tokens={FLAGS.max_new_tokens}, {env['cpu_cores']} CPU cores, "
                    f"jax {env['jax']} ({env['jax_backend']})"
                    + (f", torch {env['torch']} with {env['torch_threads']} threads"
                       if peer is not None else "")
                    + f", load average {env['load_average'][0]:.1f} at the start."
                    f"\n\n{table}\n\n"
                    f"Command: `{result['command']}`\n")
            return text

        common.write_outputs(FLAGS, result, markdown)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
