"""Times one tree-verification attention: the Pallas kernel against the XLA paths.

For each shape ``B:T:H:K:D:S`` (rows, tree nodes, query heads, kv heads, head dim, cache slots;
every row has ``lengths = S - T`` committed tokens, so the nodes fill the cache) three ways:

* ``xla_dense``: what the model runs today, ``block_mask`` ``bool[B, T, S]`` + ``models.llama
  .attention`` (softmax over all S slots);
* ``xla_einsum``: the same under the model's previous score layout, a ``[B, K, G, T, S]`` einsum
  (kept to compare layouts; see WORKSPACE.md);
* ``reference``: ``specjax.kernels.tree_attention_reference`` (float32 math, XLA);
* ``pallas``: ``tree_attention(impl="pallas")``: Triton on GPU, Mosaic on TPU, the Pallas
  interpreter on CPU (an emulation: expect it to be far slower than XLA there).

Each is jitted, warmed up, then timed ``--iters`` times (median). On GPU / TPU the memory floor is
also reported: the bytes of K/V a tree verification must read (``2 * B * K * (lengths + T) * D``
elements) over the bandwidth measured by a large on-device copy. ``--model_forward`` also times a
whole tree-verify forward of a random-weight model with SmolLM2-135M's shapes, dense mask vs
``TreeMask`` + ``attention_impl="pallas"``.

  python -m experiments.benchmark_kernel                                  # CPU: small shapes
  python -m experiments.benchmark_kernel --shapes=1:64:32:8:128:4096,1:64:32:8:128:32768 \\
      --dtype=bfloat16 --output_json=kernel_gpu.json                      # GPU: realistic shapes
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
CPU_SHAPES = ["1:8:9:3:64:512", "1:16:9:3:64:1024", "1:16:9:3:64:2048"]
ACCEL_SHAPES = [f"{b}:64:{h}:8:128:{s}" for b in (1, 8) for h in (8, 32)
                for s in (4096, 16384, 32768)]
flags.DEFINE_list("shapes", None, "B:T:H:K:D:S shapes (default: SmolLM2-like shapes up to 2k "
                  "slots on CPU; 4k-32k slots, 64 nodes, 8-32 heads on GPU / TPU).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Activations and cache (default "
                  "float32 on CPU, bfloat16 on GPU / TPU).")
flags.DEFINE_integer("iters", 10, "Timed calls per way (median reported).", lower_bound=1)
flags.DEFINE_list("ways", ["xla_dense", "reference", "pallas"], "Ways to time.")
flags.DEFINE_bool("model_forward", False, "Also time a whole tree-verify forward (random "
                  "SmolLM2-135M-shaped model, T nodes of the first shape).")
flags.DEFINE_string("output_json", None, "Write the results here (atomically).")

SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, rope_theta=100000.0, tie_embeddings=True)


def _parse(shape: str) -> dict:
    try:
        b, t, h, k, d, s = (int(x) for x in shape.split(":"))
    except ValueError:
        raise ValueError(f"--shapes entries are B:T:H:K:D:S integers, got {shape!r}") from None
    if min(b, t, h, k, d) < 1 or h % k or s < t:
        raise ValueError(f"bad shape {shape!r}: need H a multiple of K and S >= T >= 1")
    return dict(B=b, T=t, H=h, K=k, D=d, S=s)


def _tree_visible(t: int) -> np.ndarray:
    """``bool[T, T]`` of a 4-ary tree in BFS order (node n's parent is (n - 1) // 4)."""
    vis = np.eye(t, dtype=bool)
    for n in range(1, t):
        vis[n] |= vis[(n - 1) // 4]
    return vis


def _time(fn, args, iters: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bandwidth() -> float:
    """Bytes/s of a 1 GiB read + write on the default device."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((1 << 28,), jnp.float32)
    step = jax.jit(lambda x: x * 1.0001)
    return 2 * x.nbytes / _time(step, (x,), 5)


def _einsum_attention(q, k, v, mask):
    """The model's previous attention layout: scores as a ``[B, K, G, T, S]`` einsum."""
    import math

    import jax
    import jax.numpy as jnp
    b, t, h, d = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores / math.sqrt(d), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, d)


def _attention_row(shape: dict, dtype: str, ways, iters: int, bandwidth):
    import jax
    import jax.numpy as jnp
    from models.llama import attention
    from specjax import masks
    from specjax.kernels import tree_attention as ta

    b, t, h, k, d, s = (shape[x] for x in "BTHKDS")
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
    kc = jnp.asarray(rng.standard_normal((b, k, s, d)), dtype)
    vc = jnp.asarray(rng.standard_normal((b, k, s, d)), dtype)
    lengths = jnp.full((b,), s - t, jnp.int32)
    visible = jnp.asarray(_tree_visible(t))
    fns = {
        "xla_dense": jax.jit(lambda q, kc, vc, n, vis: attention(
            q, kc, vc, masks.block_mask(n, vis, s))),
        "xla_einsum": jax.jit(lambda q, kc, vc, n, vis: _einsum_attention(
            q, kc, vc, masks.block_mask(n, vis, s))),
        "reference": jax.jit(ta.tree_attention_reference),
        "pallas": jax.jit(lambda q, kc, vc, n, vis: ta.tree_attention(
            q, kc, vc, n, vis, impl="pallas")),
    }
    args = (q, kc, vc, lengths, visible)
    row = dict(shape, dtype=dtype, ms={})
    want = np.asarray(fns["reference"](*args), np.float32)
    for way in ways:
        row["ms"][way] = 1e3 * _time(fns[way], args, iters)
        got = np.asarray(fns[way](*args), np.float32)
        row.setdefault("max_abs_diff_vs_reference", {})[way] = float(np.max(np.abs(got - want)))
    if bandwidth:
        kv_bytes = 2 * b * k * s * d * jnp.dtype(dtype).itemsize  # lengths + T == S
        row["kv_bytes"] = kv_bytes
        row["floor_ms"] = 1e3 * kv_bytes / bandwidth
    return row


def _model_row(t: int, s: int, dtype: str, iters: int):
    import jax
    import jax.numpy as jnp
    from models.llama import LlamaConfig, LlamaModel
    from specjax import masks

    rows = {}
    config = LlamaConfig(**SMOLLM2_SHAPES, dtype=dtype)
    params = LlamaModel(config).init(jax.random.key(0))
    tokens = jnp.zeros((1, t), jnp.int32)
    cache = LlamaModel(config).init_cache(1, s).replace(lengths=jnp.full((1,), s - t, jnp.int32))
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    tree = masks.TreeMask.create(cache.lengths, _tree_visible(t), s)
    for impl, mask in (("xla_dense", tree.dense()), ("pallas", tree)):
        model = LlamaModel(dataclasses.replace(config, attention_impl=impl if impl == "pallas"
                                               else "xla"))
        fn = jax.jit(lambda p, x, pos, c, m, model=model: model.forward(p, x, pos, c, m).logits)
        rows[impl] = 1e3 * _time(fn, (params, tokens, positions, cache, mask), iters)
    return dict(T=t, S=s, dtype=dtype, model="random weights, SmolLM2-135M shapes", ms=rows)


def main(argv):
    common.start(argv, quiet=True)
    with common.user_errors():
        import jax
        backend = jax.default_backend()
        accel = backend in ("gpu", "cuda", "tpu")
        shapes = [_parse(x) for x in (FLAGS.shapes or (ACCEL_SHAPES if accel else CPU_SHAPES))]
        dtype = FLAGS.dtype or ("bfloat16" if accel else "float32")
        unknown = set(FLAGS.ways) - {"xla_dense", "xla_einsum", "reference", "pallas"}
        if unknown:
            raise ValueError(f"--ways must name xla_dense, xla_einsum, reference, pallas; got "
                             f"{unknown}")
        bandwidth = _bandwidth() if accel else None
        env = {"jax": jax.__version__, "backend": backend,
               "device": str(jax.devices()[0].device_kind), "cpu_cores": os.cpu_count(),
               "load_average": list(os.getloadavg()),
               "pallas_mode": "compiled" if accel else "interpret",
               "date": time.strftime("%Y-%m-%d")}
        if bandwidth:
            env["measured_bandwidth_gb_s"] = bandwidth / 1e9
            print(f"measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
        rows = []
        head = f"{'shape B:T:H:K:D:S':<22}" + "".join(f"{w + ' ms':>14}" for w in FLAGS.ways)
        head += f"{'floor ms':>10}" if bandwidth else ""
        print(head)
        for shape in shapes:
            row = _attention_row(shape, dtype, FLAGS.ways, FLAGS.iters, bandwidth)
            rows.append(row)
            name = ":".join(str(shape[x]) for x in "BTHKDS")
            line = f"{name:<22}" + "".join(f"{row['ms'][w]:14.3f}" for w in FLAGS.ways)
            print(line + (f"{row['floor_ms']:10.3f}" if bandwidth else ""), flush=True)
        result = {"environment": env, "dtype": dtype, "attention": rows,
                  "command": " ".join(["python -m experiments.benchmark_kernel"] + sys.argv[1:])}
        if FLAGS.model_forward:
            m = _model_row(shapes[0]["T"], shapes[0]["S"], dtype, FLAGS.iters)
            result["model_forward"] = m
            print(f"tree-verify forward (T={m['T']}, S={m['S']}): " +
                  ", ".join(f"{k} {v:.1f} ms" for k, v in m["ms"].items()))
        if FLAGS.output_json:
            common.write_json_atomic(FLAGS.output_json, result)


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
