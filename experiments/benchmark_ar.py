"""Plain autoregressive decoding on the same model and prompts in one run, several ways and
weight formats:

* ``generate``: specjax's on-device loop (prefill + ``lax.while_loop`` in one executable,
  compiled ahead of time per prompt bucket, warmed up once), for each weight format of
  ``--weights_list`` (default: ``--weights`` only): e.g. ``float32,gguf,int8``;
* ``stream``: the same jitted step driven from a Python loop (``specjax.decode.stream``: one
  dispatch and one host sync per token; warmed up per bucket), first format only;
* ``hf``: transformers ``model.generate`` on the same checkpoint (GGUF dequantized to float32,
  torch threads = cores, warmed up once);
* ``llama_cpp``: llama.cpp (the ``llama-cpp-python`` package, optional) on the same GGUF file,
  greedy, threads = cores; skipped with a message when the package is not installed or the
  model is not a GGUF file.

Batch 1, greedy. Each prompt is timed once per way, prefill included; tokens/s is the mean over
prompts of new tokens / seconds, and the ratios are between those means. Each way is also timed
once with one new token (the prefill and the first token: "first token ms"), and "decode tok/s"
is the rest, ``(new tokens - 1) / (seconds - first token seconds)``: the rate of the steps after
the prefill, which llama.cpp reports as its "eval" rate. Long prompts make the end-to-end rate
mostly prefill; the decode rate is the per-step speed the weight formats change. Token sequences are
compared with the first format's ``generate`` (``stream`` must equal it exactly; ``gguf`` holds
the same numbers as ``float32`` and differs only where float summation order flips a near-tie;
``int8`` is another model; ``hf`` and ``llama_cpp`` may differ in near-ties).

Then the verify forward: one target forward of ``T`` new tokens over a cache of
``--verify_cache_len`` filled slots, for each ``T`` of ``--verify_widths`` and each format
(median of ``--verify_calls`` calls, in ms and relative to that format's ``T = 1``): what a
speculative round's verification costs. For a packed format also the packed products alone
(every layer's four and the LM head on ``T`` rows, in one program) with the multiply-adds/s
and weight bytes/s they reach: the kernel's share of that cost (``--product_isas=avx2,avx512``
times them once per instruction set).

  python -m experiments.benchmark_ar                                # 3 prompts, 128 tokens
  python -m experiments.benchmark_ar --weights_list=float32,gguf,int8 --max_new_tokens=64
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
flags.DEFINE_list("weights_list", [], "Weight formats to time, in order (default: --weights); "
                  "tokens are compared with the first.")
flags.DEFINE_bool("llama_cpp", True, "Also time llama.cpp (llama-cpp-python) on the GGUF file "
                  "when it is installed.")
flags.DEFINE_list("verify_widths", ["1", "2", "3", "4", "8", "16"], "Verify-forward widths T "
                  "(empty: skip the verify timing).")
flags.DEFINE_integer("verify_cache_len", 256, "Filled cache slots in the verify timing.",
                     lower_bound=0)
flags.DEFINE_list("product_isas", ["auto"], "Kernel instruction sets the packed products are "
                  "timed with (auto = the CPU's best; e.g. avx2,avx512 to compare them).")
flags.DEFINE_integer("verify_calls", 20, "Calls per verify timing (median).", lower_bound=1)
flags.DEFINE_string("output_json", None, "Write the results here (atomically).")
flags.DEFINE_string("output_md", None, "Write a Markdown table here (atomically).")
method_flags.define_model_flags()
flags.adopt_module_key_flags(method_flags)


def _time_generate(model, params, batch, config, key, cache):
    from specjax.engine import Engine
    slot = (int(batch.tokens.shape[1]), config.max_new_tokens)
    if slot not in cache:
        cache[slot] = Engine(model, config).compile(params, None, batch, key)
        cache[slot].run()  # warm-up
    gen = cache[slot].run(batch)
    return gen.tokens[0], gen.wall_s, gen.stats.target_calls


def _timing(generated, wall_s, first_s, **more):
    """One way's record for one prompt: end-to-end and after-the-first-token rates."""
    n = len(generated)
    decode_s = wall_s - first_s
    return {"new_tokens": n, "wall_s": wall_s, "tokens_per_s": n / wall_s,
            "first_token_s": first_s,
            "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            **more}


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
    slot = (int(batch.tokens.shape[1]), config.max_new_tokens)
    if slot not in warmed:  # compiles the start and the step for this bucket
        _stream_once(model, params, batch, config, key, limit=3)
        warmed.add(slot)
    t0 = time.perf_counter()
    gen, calls = _stream_once(model, params, batch, config, key)
    return gen, time.perf_counter() - t0, calls


def _time_verify(model, params, widths, cache_len, calls):
    """``{T: median ms}`` of one jitted forward of ``T`` new tokens over ``cache_len`` filled
    cache slots (a speculative round's verification, chain mask)."""
    import jax
    import jax.numpy as jnp
    from specjax import masks
    out = {}
    forward = jax.jit(model.forward)
    for t in widths:
        slots = cache_len + t
        cache = model.init_cache(1, slots)
        cache = cache.replace(lengths=jnp.full((1,), cache_len, jnp.int32))
        tokens = jnp.ones((1, t), jnp.int32)
        positions = cache_len + jnp.arange(t, dtype=jnp.int32)[None]
        mask = masks.block_mask(cache.lengths, jnp.tril(jnp.ones((1, t, t), bool)), slots)
        jax.block_until_ready(forward(params, tokens, positions, cache, mask))
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(params, tokens, positions, cache, mask).logits)
            times.append(time.perf_counter() - t0)
        out[t] = 1e3 * float(np.median(times))
    return out


def _time_products(model, params, widths, calls, isa="auto"):
    """For a packed model: ``{T: (median ms, G multiply-adds/s, GB/s)}`` of every packed product
    of one forward (each layer's ``wqkv``, ``wo``, ``w_gate_up``, ``w_down`` and the LM head) on
    ``T`` rows of random activations, in one jitted program (a scan over the layers, as the
    model runs them), without the rest of the forward: the kernel's share of a verify."""
    import jax
    import jax.numpy as jnp
    from models.packing import PACKED_LAYER_NAMES
    from specjax import packed
    config = model.config
    act8 = getattr(config, "act8", False)
    layers = {name: params["layers"][name] for name in PACKED_LAYER_NAMES}
    head = params["embedder"]["embedding"] if config.tie_embeddings else params["lm_head"]
    macs = sum(w.data.shape[0] * w.out_features * w.in_features for w in layers.values())
    macs += head.out_features * head.in_features
    nbytes = sum(int(w.data.size) for w in layers.values()) + int(head.data.size)

    def products(xs, layer_weights, head):
        def body(carry, i):  # each layer read in place, as the model does (PackedWeight.at)
            total = carry
            for name in PACKED_LAYER_NAMES:  # a dependency, so nothing is skipped
                y = packed.linear(xs[name] + total, layer_weights[name].at(i), act8=act8,
                                  isa=isa)
                total = total + y[0, 0] * 1e-9
            return total, None
        total, _ = jax.lax.scan(body, jnp.float32(0), jnp.arange(config.num_layers))
        return packed.linear(xs["head"] + total, head, act8=act8, isa=isa)[0, 0]

    run = jax.jit(products)
    rng = np.random.default_rng(0)
    out = {}
    for t in widths:
        xs = {name: jnp.asarray(rng.normal(size=(t, w.in_features)), jnp.float32)
              for name, w in list(layers.items()) + [("head", head)]}
        jax.block_until_ready(run(xs, layers, head))
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(run(xs, layers, head))
            times.append(time.perf_counter() - t0)
        sec = float(np.median(times))
        out[t] = (1e3 * sec, t * macs / sec / 1e9, nbytes / sec / 1e9)
    return out


def _llama_cpp(model_name, num_threads):
    """A llama.cpp ``Llama`` on the model's GGUF file, or ``(None, why)``."""
    from models import registry as models
    try:
        import llama_cpp
    except ImportError:
        return None, ("llama-cpp-python is not installed (optional: `pip install "
                      "llama-cpp-python`, which builds llama.cpp with cmake)")
    path = models.gguf_path(model_name) if model_name in models.known_models() else model_name
    if not path or not str(path).endswith(".gguf"):
        return None, f"{model_name} is not a GGUF file"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=num_threads,
                          n_threads_batch=num_threads, verbose=False)
    return llm, None


def _time_llama_cpp(llm, ids, max_new_tokens, eos):
    llm.reset()
    gen, t0 = [], time.perf_counter()
    for tok in llm.generate(list(map(int, ids)), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                            repeat_penalty=1.0, reset=True):
        if tok in eos:
            gen.append(int(tok))
            break
        gen.append(int(tok))
        if len(gen) >= max_new_tokens:
            break
    return gen, time.perf_counter() - t0


def main(argv):
    common.start(argv)
    t_start = time.perf_counter()
    with common.user_errors():
        env_start = environment()
        common.check_outputs(FLAGS, "output_json", "output_md")
        formats = list(FLAGS.weights_list) or [FLAGS.weights]
        from models.packing import WEIGHTS
        bad = [w for w in formats if w not in WEIGHTS]
        if bad or len(set(formats)) != len(formats):
            raise common.UserError(f"--weights_list: give distinct formats among "
                                   f"{', '.join(WEIGHTS)}, got {','.join(formats)}")
        try:
            widths = sorted({int(t) for t in FLAGS.verify_widths})
        except ValueError:
            raise common.UserError(f"--verify_widths: give positive integers, got "
                                   f"{','.join(FLAGS.verify_widths)}") from None
        if any(t < 1 for t in widths):
            raise common.UserError("--verify_widths: widths must be >= 1")
        from specjax.kernels.cpu_matmul import ISAS
        bad = [i for i in FLAGS.product_isas if i != "auto" and i not in ISAS]
        if bad or len(set(FLAGS.product_isas)) != len(FLAGS.product_isas):
            raise common.UserError(f"--product_isas: give distinct values among auto, "
                                   f"{', '.join(ISAS)}, got {','.join(FLAGS.product_isas)}")
        for w in formats:  # --max_new_tokens against the context, the kernel's build; no weights
            FLAGS.weights = w
            method_flags.model_config(FLAGS)
        import jax
        from specjax import decode
        from specjax.prompts import make_prompt_batch
        prompts = spec_bench.read_prompts(FLAGS.prompts, 1, FLAGS.categories)[:FLAGS.num_prompts]
        if FLAGS.hf:
            from experiments import hf_peer
            hf_peer.resolve(FLAGS.model)
        print(f"benchmark_ar: {len(prompts)} prompts x {FLAGS.max_new_tokens} tokens, weights "
              f"{', '.join(formats)}: generate / stream{' / hf' if FLAGS.hf else ''}",
              file=sys.stderr)
        key = jax.random.key(0)
        rows = [{"question_id": p.question_id, "group": p.group} for p in prompts]
        verify, products, loaded, first = {}, {}, None, formats[0]
        for w in formats:
            FLAGS.weights = w
            loaded = method_flags.load_model(FLAGS)
            eos = loaded.tokenizer.eos_ids if loaded.tokenizer is not None else ()
            config = decode.DecodeConfig(max_new_tokens=FLAGS.max_new_tokens, eos_ids=tuple(eos))
            one = decode.DecodeConfig(max_new_tokens=1, eos_ids=tuple(eos))
            compiled, warmed = {}, set()
            for p, row in zip(prompts, rows):
                ids = spec_bench.encode_prompt(loaded.tokenizer, p.text, loaded.model.vocab_size)
                batch = make_prompt_batch([ids], vocab_size=loaded.model.vocab_size)
                row |= {"prompt_len": len(ids), "bucket": int(batch.tokens.shape[1])}
                g, wall, calls = _time_generate(loaded.model, loaded.params, batch, config, key,
                                                compiled)
                _, first_s, _ = _time_generate(loaded.model, loaded.params, batch, one, key,
                                               compiled)
                name = "generate" if w == first else f"generate_{w}"
                row[name] = _timing(g, wall, first_s, target_calls=calls,
                                    tokens=[int(t) for t in g])
                if w != first:
                    ref = row["generate"]["tokens"]
                    row[name] |= {"same_tokens_as_generate": g == ref,
                                  "first_difference": first_mismatch(ref, g)}
                else:
                    s, wall, calls = _time_stream(loaded.model, loaded.params, batch, config, key,
                                                  warmed)
                    _, first_s, _ = _time_stream(loaded.model, loaded.params, batch, one, key,
                                                 warmed)
                    row["stream"] = _timing(s, wall, first_s, target_calls=calls,
                                            same_tokens_as_generate=s == g)
                    if s != g:
                        print(f"BUG: stream and generate differ on question {p.question_id} at "
                              f"token {first_mismatch(g, s)}", file=sys.stderr)
                print(f"  q{p.question_id} ({p.group}, {len(ids)} tokens) {w}: "
                      f"{row[name]['tokens_per_s']:.1f} tok/s", file=sys.stderr)
            if widths:
                verify[w] = _time_verify(loaded.model, loaded.params, widths,
                                         FLAGS.verify_cache_len, FLAGS.verify_calls)
                print(f"  verify {w}: " + ", ".join(
                    f"T={t} {ms:.1f} ms" for t, ms in verify[w].items()), file=sys.stderr)
                for isa in (FLAGS.product_isas if loaded.model.config.weight_formats else []):
                    row_name = w if isa == "auto" else f"{w} ({isa})"
                    products[row_name] = _time_products(loaded.model, loaded.params, widths,
                                                        FLAGS.verify_calls, isa)
                    print(f"  packed products {row_name}: " + ", ".join(
                        f"T={t} {ms:.1f} ms ({gmac:.0f} G mult-adds/s, {gbs:.1f} GB/s)"
                        for t, (ms, gmac, gbs) in products[row_name].items()), file=sys.stderr)
            del compiled
        peer = None
        if FLAGS.hf:
            from experiments import hf_peer
            peer = hf_peer.Peer.load(FLAGS.model, eos_ids=eos, pad_id=loaded.tokenizer.pad_id,
                                     num_threads=FLAGS.hf_threads or None)
        llm, llama_cpp_note = (None, "not asked (--nollama_cpp)")
        if FLAGS.llama_cpp:
            from experiments import hf_peer
            llm, llama_cpp_note = _llama_cpp(FLAGS.model, hf_peer.num_cores())
            if llm is None:
                print(f"  llama.cpp skipped: {llama_cpp_note}", file=sys.stderr)
        for p, row in zip(prompts, rows):
            ids = spec_bench.encode_prompt(loaded.tokenizer, p.text, loaded.model.vocab_size)
            g = row["generate"]["tokens"]
            if peer is not None:
                r = peer.generate(ids, FLAGS.max_new_tokens)
                r1 = peer.generate(ids, 1)
                row["hf"] = _timing(r.generated, r.wall_s, r1.wall_s,
                                    target_calls=r.target_calls,
                                    same_tokens_as_generate=r.generated == g,
                                    first_difference=first_mismatch(g, r.generated))
            if llm is not None:
                if p is prompts[0]:
                    _time_llama_cpp(llm, ids, 4, set(eos))  # warm-up
                lg, wall = _time_llama_cpp(llm, ids, FLAGS.max_new_tokens, set(eos))
                _, first_s = _time_llama_cpp(llm, ids, 1, set(eos))
                row["llama_cpp"] = _timing(lg, wall, first_s,
                                           same_tokens_as_generate=lg == g,
                                           first_difference=first_mismatch(g, lg))
        ways = ["generate", "stream"] + [f"generate_{w}" for w in formats[1:]] + (
            ["hf"] if peer is not None else []) + (["llama_cpp"] if llm is not None else [])
        mean = {k: float(np.mean([r[k]["tokens_per_s"] for r in rows])) for k in ways}
        decode_rates = {k: [r[k]["decode_tokens_per_s"] for r in rows] for k in ways}
        mean_decode = {k: float(np.mean(v)) if None not in v else None
                       for k, v in decode_rates.items()}
        mean_first = {k: float(np.mean([r[k]["first_token_s"] for r in rows])) for k in ways}

        def ratio(table, a, b):
            return table[a] / table[b] if table[a] and table[b] else None

        ratios = {f"{k}/generate": ratio(mean, k, "generate") for k in ways if k != "generate"}
        decode_ratios = {f"{k}/generate": ratio(mean_decode, k, "generate") for k in ways
                         if k != "generate"}
        if llm is not None:
            ratios |= {f"{k}/llama_cpp": ratio(mean, k, "llama_cpp") for k in ways
                       if k.startswith("generate")}
            decode_ratios |= {f"{k}/llama_cpp": ratio(mean_decode, k, "llama_cpp")
                              for k in ways if k.startswith("generate")}
        env = env_start
        result = {"config": {"model": FLAGS.model, "max_new_tokens": FLAGS.max_new_tokens,
                             "num_prompts": len(rows), "scan_layers": FLAGS.scan_layers,
                             "dtype": FLAGS.dtype, "weights": formats, "batch": 1,
                             "greedy": True, "verify_cache_len": FLAGS.verify_cache_len},
                  "environment": env, "tokens_per_s": mean, "ratios": ratios,
                  "first_token_s": mean_first, "decode_tokens_per_s": mean_decode,
                  "decode_ratios": decode_ratios,
                  "verify_ms": {w: {str(t): ms for t, ms in v.items()}
                                for w, v in verify.items()},
                  "packed_products": {w: {str(t): {"ms": ms, "g_multiply_adds_per_s": gmac,
                                                   "gb_per_s": gbs}
                                          for t, (ms, gmac, gbs) in v.items()}
                                      for w, v in products.items()},
                  "llama_cpp": llama_cpp_note or "ran", "per_prompt": rows,
                  "total_s": time.perf_counter() - t_start,
                  "command": " ".join(["python -m experiments.benchmark_ar"] + sys.argv[1:])}
        if peer is not None:
            import torch
            import transformers
            result["environment"] |= {"torch": torch.__version__, "torch_threads":
                                      torch.get_num_threads(),
                                      "transformers": transformers.__version__}
        if llm is not None:
            import llama_cpp
            result["environment"]["llama_cpp_python"] = llama_cpp.__version__

        def label(k):
            return f"generate ({first})" if k == "generate" else (
                f"generate ({k[9:]})" if k.startswith("generate_") else k)

        def rate(v):
            return "-" if v is None else f"{v:.1f}"

        for k in ways:
            print(f"{label(k):<20} {mean[k]:8.1f} tok/s  first token {1e3 * mean_first[k]:.0f} "
                  f"ms  decode {rate(mean_decode[k])} tok/s")
        for w, v in verify.items():
            print(f"verify {w:<8} " + "  ".join(f"T={t}: {ms:.1f} ms ({ms / v[widths[0]]:.2f}x)"
                                                for t, ms in v.items()))

        def markdown() -> str:
            def times(v):
                return "-" if v is None else f"{v:.2f}x"

            table = md_table(
                ["way", "tok/s", "vs generate", "first token ms", "decode tok/s",
                 "decode vs generate", "same tokens as generate"],
                [[label(k), f"{mean[k]:.1f}", times(ratio(mean, k, "generate")),
                  f"{1e3 * mean_first[k]:.0f}", rate(mean_decode[k]),
                  times(ratio(mean_decode, k, "generate")),
                  "-" if k == "generate" else
                  f"{sum(r[k]['same_tokens_as_generate'] for r in rows)}/{len(rows)}"]
                 for k in ways])
            vtable = md_table(
                ["weights"] + [f"T={t}" for t in widths],
                [[w] + [f"{v[t]:.1f} ms ({v[t] / v[widths[0]]:.2f}x)" for t in widths]
                 for w, v in verify.items()]) if verify else "(not timed)"
            ptable = md_table(
                ["weights"] + [f"T={t}" for t in widths],
                [[w] + [f"{v[t][0]:.1f} ms ({v[t][1]:.0f} G/s, {v[t][2]:.1f} GB/s)"
                        for t in widths] for w, v in products.items()]) if products else ""
            text = (f"# Plain decoding: specjax generate (weights {', '.join(formats)}) vs "
                    f"Python-driven stream vs peers"
                    f"\n\n{FLAGS.model}, {len(rows)} prompts, batch 1, greedy, activations "
                    f"{FLAGS.dtype}, max_new_tokens={FLAGS.max_new_tokens}, {env['cpu_cores']} "
                    f"CPU cores, jax {env['jax']} ({env['jax_backend']})"
                    + (f", torch {env['torch']} with {env['torch_threads']} threads"
                       if peer is not None else "")
                    + f", load average {env['load_average'][0]:.1f} at the start. llama.cpp: "
                    f"{llama_cpp_note or 'ran'}."
                    f"\n\n{table}\n\n## Verify forward (T new tokens over "
                    f"{FLAGS.verify_cache_len} cached slots, median ms, and relative to T = "
                    f"{widths[0] if widths else 1})\n\n{vtable}\n\n"
                    + (f"## Packed products of one forward (every layer's four and the LM "
                       f"head, T rows, no attention or norms: median ms, multiply-adds/s, "
                       f"weight bytes/s)\n\n{ptable}\n\n" if products else "")
                    + f"Command: `{result['command']}`\n")
            return text

        common.write_outputs(FLAGS, result, markdown)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
