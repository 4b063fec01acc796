"""The prepared accelerator check: one command that, on a GPU (or TPU), offline and within a time
budget, checks the kernels and times decoding at realistic shapes, and writes one JSON and one
Markdown summary.

Sections (each item is skipped, and says so, once ``--budget_s`` is spent):

1. ``tree_attention``: the Pallas tree-attention kernel (Triton on GPU, Mosaic on TPU, the
   interpreter on CPU) against its jnp reference on random inputs: max abs difference, pass or
   fail within the dtype's tolerance.
2. ``verify_forward``: one target forward of ``T`` new tokens (T = 1..64) over a cache of
   ``--cache_len`` slots, for random-weight models of Llama shapes (1B, 8B) in bfloat16 and int8
   (per-channel, :mod:`models.packing`; on accelerators XLA fuses the int8 convert into the dot).
   Weights are created on the device (no files: the inputs stay far under 64 MiB).
3. ``decode``: plain greedy decoding tokens/s (batch 1, ``--new_tokens``) for the same models.
4. ``attention_vs_xla``: the tree-attention kernel against XLA's dense-mask attention at 4k-32k
   cached slots (``experiments.benchmark_kernel``'s timing), with the memory floor.

Needs only jax, flax, numpy and absl (no tokenizer, no checkpoint, no network). ``--smoke``
runs every section with tiny shapes (the CPU test, ``tests/test_device_check.py``, which also
checks that nothing else is imported). Exit status 1 when a kernel check fails.

  python -m experiments.device_check --out=$OUT               # on the GPU machine
  python -m experiments.device_check --smoke --out=/tmp/dc    # CPU, tiny shapes, ~1 min
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output folder (default: $OUT, else ./device_check_out).")
flags.DEFINE_bool("smoke", False, "Tiny shapes everywhere (a CPU smoke test).")
flags.DEFINE_float("budget_s", 420.0, "Skip the remaining items after this many seconds.",
                   lower_bound=1.0)
flags.DEFINE_list("widths", ["1", "2", "4", "8", "16", "32", "64"], "Verify widths T.")
flags.DEFINE_integer("cache_len", 1024, "Cache slots in the verify timing.", lower_bound=64)
flags.DEFINE_integer("new_tokens", 64, "Tokens per plain-decoding timing.", lower_bound=1)
flags.DEFINE_integer("calls", 10, "Timed calls per item (median).", lower_bound=1)

# Llama shapes (Llama 3.2 1B, Llama 3.1 8B): random weights of these shapes.
MODEL_SHAPES = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                     num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                     tie_embeddings=True, max_position_embeddings=8192),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                     rope_theta=500000.0, max_position_embeddings=8192),
}
SMOKE_SHAPES = {"tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, max_position_embeddings=512)}
ATTENTION_CHECKS = ["1:5:8:2:64:300", "2:16:32:8:128:1000", "1:64:32:8:128:4096"]
SMOKE_ATTENTION_CHECKS = ["1:5:4:2:16:40", "2:3:4:1:8:24"]
ATTENTION_TIMINGS = ["1:64:32:8:128:4096", "1:64:32:8:128:16384", "1:64:32:8:128:32768",
                     "8:64:32:8:128:16384"]
SMOKE_ATTENTION_TIMINGS = ["1:8:4:2:16:64"]
TOLERANCE = {"float32": 2e-4, "bfloat16": 3e-2}


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> bool:
        return time.perf_counter() - self.start < self.seconds


def _median_ms(fn, args, iters):
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _attention_check(spec: str, dtype: str):
    import jax
    import jax.numpy as jnp
    from experiments.benchmark_kernel import _parse, _tree_visible
    from specjax.kernels import tree_attention as ta
    s = _parse(spec)
    b, t, h, k, d, slots = (s[x] for x in "BTHKDS")
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
    kc = jnp.asarray(rng.standard_normal((b, k, slots, d)), dtype)
    vc = jnp.asarray(rng.standard_normal((b, k, slots, d)), dtype)
    lengths = jnp.asarray(rng.integers(0, slots - t + 1, size=b), jnp.int32)
    visible = jnp.asarray(np.broadcast_to(_tree_visible(t), (b, t, t)))
    want = np.asarray(jax.jit(ta.tree_attention_reference)(q, kc, vc, lengths, visible),
                      np.float32)
    got = np.asarray(jax.jit(lambda *a: ta.tree_attention(*a, impl="pallas"))(
        q, kc, vc, lengths, visible), np.float32)
    diff = float(np.max(np.abs(got - want)))
    return {"shape": spec, "dtype": dtype, "max_abs_diff": diff,
            "passed": bool(diff <= TOLERANCE[dtype])}


def _random_model(name: str, shape: dict, weights: str, dtype: str, seed: int = 0):
    """``(model, params)``: a random-weight model built on the device."""
    import jax
    import jax.numpy as jnp
    from models.llama import LlamaConfig, LlamaModel
    from models.packing import PACKED_LAYER_NAMES, packed_shapes
    config = LlamaConfig(**shape, dtype=dtype, param_dtype=dtype)
    if weights == "int8":
        names = PACKED_LAYER_NAMES + ("embedding",) + (() if config.tie_embeddings
                                                        else ("lm_head",))
        config = dataclasses.replace(config, weight_formats=tuple(sorted(
            (n, "i8") for n in names if n in packed_shapes(config))))
    model = LlamaModel(config)

    @jax.jit
    def make(key):
        shapes = jax.eval_shape(model.init, jax.random.key(0))
        leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
        keys = jax.random.split(key, len(leaves))
        out = []
        for (path, leaf), k in zip(leaves, keys):
            if leaf.dtype == jnp.uint8:  # int8 codes (a PackedWeight's bytes)
                out.append(jax.random.bits(k, leaf.shape, jnp.uint8))
            elif getattr(path[-1], "name", None) == "scale":  # its per-row scales
                out.append(jnp.full(leaf.shape, 0.02 / 127, jnp.float32))
            else:
                out.append((0.02 * jax.random.normal(k, leaf.shape, jnp.float32)).astype(
                    leaf.dtype))
        return jax.tree.unflatten(tree, out)

    return model, make(jax.random.key(seed))


def _verify_row(model, params, t: int, cache_len: int, iters: int) -> float:
    import jax
    import jax.numpy as jnp
    from specjax import masks
    slots = cache_len
    cache = model.init_cache(1, slots).replace(lengths=jnp.full((1,), slots - t, jnp.int32))
    tokens = jnp.ones((1, t), jnp.int32)
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    mask = masks.block_mask(cache.lengths, jnp.tril(jnp.ones((t, t), bool)), slots)
    fn = jax.jit(lambda p, x, pos, c, m: model.forward(p, x, pos, c, m).logits)
    return _median_ms(fn, (params, tokens, positions, cache, mask), iters)


def _decode_row(model, params, new_tokens: int) -> dict:
    import jax
    from specjax import decode
    config = decode.DecodeConfig(max_new_tokens=new_tokens)
    prompt = [[1 + (i * 7) % 200 for i in range(32)]]
    decode.generate(model, params, prompt, config)  # compile + warm-up
    t0 = time.perf_counter()
    out = decode.generate(model, params, prompt, config)
    jax.block_until_ready(out.tokens)
    wall = time.perf_counter() - t0
    n = int(out.lengths[0])
    return {"new_tokens": n, "wall_s": wall, "tokens_per_s": n / wall}


def _markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Device check ({env['device']}, {env['backend']}, jax {env['jax']}, "
             f"{result['date']})", "", "## Tree-attention kernel vs reference", "",
             "| shape B:T:H:K:D:S | dtype | max abs diff | passed |", "|---|---|---:|---|"]
    for r in result["tree_attention"]:
        lines.append(f"| {r['shape']} | {r['dtype']} | " + (
            f"{r['max_abs_diff']:.2e} | {r['passed']} |" if "passed" in r else
            f"- | {r.get('skipped', r.get('error'))} |"))
    lines += ["", f"## Verify forward (T new tokens over {result['cache_len']} slots, median "
              "ms) and plain decoding", ""]
    widths = result["widths"]
    lines.append("| model | weights | " + " | ".join(f"T={t}" for t in widths)
                 + " | decode tok/s |")
    lines.append("|---|---|" + "---:|" * (len(widths) + 1))
    for r in result["models"]:
        cells = [f"{r['verify_ms'][str(t)]:.2f}" if str(t) in r["verify_ms"] else "-"
                 for t in widths]
        dec = r.get("decode", {}).get("tokens_per_s")
        last = f"{dec:.1f}" if dec else r.get("skipped", r.get("error", "-"))
        lines.append(f"| {r['model']} | {r['weights']} | " + " | ".join(cells) + f" | {last} |")
    lines += ["", "## Tree attention: kernel vs XLA dense mask (ms)", "",
              "| shape B:T:H:K:D:S | xla_dense | pallas | floor |", "|---|---:|---:|---:|"]
    for r in result["attention_vs_xla"]:
        if "ms" in r:
            floor = f"{r['floor_ms']:.3f}" if "floor_ms" in r else "-"
            lines.append(f"| {r['shape']} | {r['ms']['xla_dense']:.3f} | "
                         f"{r['ms']['pallas']:.3f} | {floor} |")
        else:
            lines.append(f"| {r['shape']} | - | - | {r.get('skipped', r.get('error'))} |")
    lines += ["", f"Total {result['total_s']:.0f} s. Command: `{result['command']}`", ""]
    return "\n".join(lines)


def _guard(budget: Budget, item: dict, fn):
    """Runs ``fn() -> dict`` into ``item`` unless the budget is spent; records errors."""
    if not budget.left():
        item["skipped"] = "budget spent"
        return item
    try:
        item.update(fn())
    except Exception as e:  # a device failure is a finding, not a crash of the whole check
        item["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return item


def main(argv):
    common.start(argv, quiet=True)
    with common.user_errors():
        out_dir = FLAGS.out or os.environ.get("OUT") or "device_check_out"
        try:
            widths = sorted({int(t) for t in FLAGS.widths})
        except ValueError:
            raise common.UserError(f"--widths: give positive integers, got "
                                   f"{','.join(FLAGS.widths)}") from None
        if not widths or widths[0] < 1 or widths[-1] >= FLAGS.cache_len:
            raise common.UserError(f"--widths must be >= 1 and below --cache_len "
                                   f"({FLAGS.cache_len})")
        os.makedirs(out_dir, exist_ok=True)
        import jax
        from experiments import benchmark_kernel
        budget = Budget(FLAGS.budget_s)
        backend = jax.default_backend()
        accel = backend in ("gpu", "cuda", "tpu")
        smoke = FLAGS.smoke
        dtype = "bfloat16" if accel else "float32"
        env = {"jax": jax.__version__, "backend": backend,
               "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(),
               "cpu_cores": os.cpu_count()}
        result = {"environment": env, "date": time.strftime("%Y-%m-%d %H:%M"),
                  "smoke": smoke, "cache_len": FLAGS.cache_len, "widths": widths,
                  "tree_attention": [], "models": [], "attention_vs_xla": []}
        print(f"device_check on {env['device']} ({backend}), budget {FLAGS.budget_s:.0f} s",
              flush=True)
        for spec in (SMOKE_ATTENTION_CHECKS if smoke else ATTENTION_CHECKS):
            for dt in ([dtype] if smoke else ["float32", "bfloat16"]):
                item = _guard(budget, {"shape": spec, "dtype": dt},
                              lambda: _attention_check(spec, dt))
                result["tree_attention"].append(item)
                print(f"  tree attention {spec} {dt}: {item}", flush=True)
        shapes = SMOKE_SHAPES if smoke else MODEL_SHAPES
        for name, shape in shapes.items():
            for weights in (dtype, "int8"):
                item = {"model": name, "weights": weights, "verify_ms": {}}
                result["models"].append(item)
                if not budget.left():
                    item["skipped"] = "budget spent"
                    continue
                try:
                    model, params = _random_model(name, shape, weights, dtype)
                except Exception as e:
                    item["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    continue
                for t in widths:
                    got = _guard(budget, {}, lambda: {"ms": _verify_row(
                        model, params, t, FLAGS.cache_len, FLAGS.calls)})
                    if "ms" in got:
                        item["verify_ms"][str(t)] = got["ms"]
                    else:
                        item.setdefault("verify_skipped", {})[str(t)] = got
                item["decode"] = _guard(budget, {}, lambda: _decode_row(
                    model, params, FLAGS.new_tokens))
                print(f"  {name} {weights}: verify {item['verify_ms']} decode "
                      f"{item['decode']}", flush=True)
                del params
        bandwidth = benchmark_kernel._bandwidth() if accel else None
        if bandwidth:
            env["measured_bandwidth_gb_s"] = bandwidth / 1e9
        for spec in (SMOKE_ATTENTION_TIMINGS if smoke else ATTENTION_TIMINGS):
            item = _guard(budget, {"shape": spec}, lambda: benchmark_kernel._attention_row(
                benchmark_kernel._parse(spec), dtype, ["xla_dense", "pallas"], FLAGS.calls,
                bandwidth))
            item["shape"] = spec
            result["attention_vs_xla"].append(item)
            print(f"  attention {spec}: {item.get('ms', item)}", flush=True)
        result["total_s"] = time.perf_counter() - budget.start
        result["command"] = " ".join(["python -m experiments.device_check"] + sys.argv[1:])
        common.write_json_atomic(os.path.join(out_dir, "device_check.json"), result)
        from specjax.files import write_atomic

        def write_md(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(_markdown(result))

        write_atomic(os.path.join(out_dir, "device_check.md"), write_md)
        failed = [r for r in result["tree_attention"] if r.get("passed") is False]
        print(f"device_check: wrote {out_dir}/device_check.json and .md in "
              f"{result['total_s']:.0f} s" + (f"; {len(failed)} kernel check(s) FAILED"
                                                if failed else ""), flush=True)
        return 1 if failed else 0


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
