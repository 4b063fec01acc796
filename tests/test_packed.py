"""Packed weights (``specjax.packed``) and the C++ CPU kernel (``specjax.kernels.cpu_matmul``):

* the pure-JAX dequantisers reproduce ``gguf``'s numpy dequantiser value for value, on random
  blocks of every format;
* kernel == reference (float64 products of the same dequantised values) within the float32
  accumulation bound ``gamma_K * sum |x_k w_k|`` (``gamma_K = K u / (1 - K u)``, u = 2^-24): the
  kernel's weights are the same numbers, only the summation order differs. Every format, odd
  row counts, every M from 1 to 17, every code path the CPU has (AVX-512, AVX2 + FMA,
  portable);
* the kernel under ``jit``, inside ``lax.while_loop`` and under ``vmap``; a batched weight and
  malformed shapes are refused;
* a packed tiny model (gguf / int8 formats, every tiny architecture) computes what the float
  model holding the dequantised weights computes (``models.packing.unpack``), logits and cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import packing
from models import registry as models
from models.llama import LlamaModel
from specjax import packed
from specjax.kernels import cpu_matmul

FORMATS = list(packed.FORMATS)
U = 2.0 ** -24


def _random_weight(rng, fmt, n, k):
    """A :class:`PackedWeight` of random blocks (numpy): random quant bytes, scales drawn as
    float16 of sane magnitude (random bytes would include NaN / inf scales)."""
    if fmt == "f32":
        return packed.pack_f32(rng.normal(size=(n, k)).astype(np.float32))
    if fmt == "i8":
        return packed.pack_int8(rng.normal(size=(n, k)).astype(np.float32))
    _, values, nbytes = packed.FORMATS[fmt]
    nb = k // values
    b = rng.integers(0, 256, size=(n, nb, nbytes), dtype=np.uint8)

    def put_half(offset, scale):
        h = (rng.normal(size=(n, nb)) * scale).astype(np.float16)
        b[..., offset:offset + 2] = h.view(np.uint8).reshape(n, nb, 2)

    offsets = {"q8_0": [(0, .05)], "q4_0": [(0, .05)], "q4_1": [(0, .05), (2, .5)],
               "q5_0": [(0, .05)],
               "q4_k": [(0, .01), (2, .01)], "q6_k": [(208, .01)]}[fmt]
    for offset, scale in offsets:
        put_half(offset, scale)
    return packed.PackedWeight(b.reshape(n, nb * nbytes), np.zeros((1,), np.float32), fmt, k)


def _numpy_values(w):
    """float32 [N, K] values by an independent route: gguf's dequantiser / numpy."""
    import gguf
    if w.fmt == "f32":
        return w.data.view(np.float32)
    if w.fmt == "i8":
        return w.scale[:, None] * w.data.view(np.int8).astype(np.float32)
    kind = getattr(gguf.GGMLQuantizationType, w.fmt.upper())
    return np.asarray(gguf.quants.dequantize(w.data, kind), np.float32)


def _k_of(fmt):
    return {"q4_k": 512, "q6_k": 256}.get(fmt, 96)


@pytest.mark.parametrize("fmt", FORMATS)
def test_jax_dequantizer_equals_gguf(fmt):
    rng = np.random.default_rng(0)
    w = _random_weight(rng, fmt, 13, _k_of(fmt))
    got = np.asarray(packed.dequantize(packed.as_jax(w, jnp.float32)))
    np.testing.assert_array_equal(got, _numpy_values(w))


def _check_within_accumulation_bound(y, x, values):
    x64, w64 = x.astype(np.float64), values.astype(np.float64)
    exact = x64 @ w64.T
    k = x.shape[-1]
    gamma = k * U / (1 - k * U)
    bound = gamma * (np.abs(x64) @ np.abs(w64).T)
    excess = np.abs(y.astype(np.float64) - exact) - bound
    assert excess.max() <= 0, f"error exceeds the float32 accumulation bound by {excess.max()}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_equals_reference_for_every_row_count_and_both_code_paths(fmt):
    rng = np.random.default_rng(1)
    n, k = 37, _k_of(fmt)
    w = _random_weight(rng, fmt, n, k)
    values = _numpy_values(w)
    wj = packed.as_jax(w, jnp.float32)
    for m in range(1, 18):
        x = rng.normal(size=(m, k)).astype(np.float32)
        for isa in cpu_matmul.available_isas():
            y = np.asarray(cpu_matmul.packed_matmul(jnp.asarray(x), wj.data, wj.scale, fmt,
                                                    isa=isa))
            _check_within_accumulation_bound(y, x, values)
    # the reference route (dequantise, then jnp.dot) obeys the same bound
    y = np.asarray(packed.linear(jnp.asarray(x), wj, use_kernel=False))
    _check_within_accumulation_bound(y, x, values)


def test_isa_choice():
    assert cpu_matmul.code_path() in cpu_matmul.ISAS
    assert cpu_matmul.available_isas()[0] == "portable"
    assert cpu_matmul.available_isas()[-1] == cpu_matmul.code_path()
    with pytest.raises(ValueError, match="isa must be"):
        cpu_matmul.packed_matmul(jnp.ones((1, 32)), jnp.zeros((1, 34), jnp.uint8),
                                 jnp.ones((1,)), "q8_0", isa="sse2")


def test_kernel_with_odd_k_and_one_thread():
    """f32 / i8 rows of a K that is no multiple of 8 or 32 (the tails), on one thread."""
    rng = np.random.default_rng(2)
    for fmt in ("f32", "i8"):
        w = _random_weight(rng, fmt, 9, 43)
        wj = packed.as_jax(w, jnp.float32)
        x = rng.normal(size=(5, 43)).astype(np.float32)
        for isa in cpu_matmul.available_isas():
            y = cpu_matmul.packed_matmul(jnp.asarray(x), wj.data, wj.scale, fmt, max_threads=1,
                                         isa=isa)
            _check_within_accumulation_bound(np.asarray(y), x, _numpy_values(w))


def test_kernel_under_jit_while_loop_and_vmap():
    rng = np.random.default_rng(3)
    k = 64
    w = packed.as_jax(packed.pack_gguf(rng.normal(size=(k, k)).astype(np.float32) / 8, "q4_1"),
                      jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, k)).astype(np.float32))
    ref = lambda v: packed.linear(v, w, use_kernel=False)  # noqa: E731

    @jax.jit
    def iterate(x0):  # x <- tanh(x W^T), four times, in a while_loop
        def body(carry):
            i, v = carry
            return i + 1, jnp.tanh(packed.linear(v, w))
        return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, x0))[1]

    want = x
    for _ in range(4):
        want = jnp.tanh(ref(want))
    np.testing.assert_allclose(np.asarray(iterate(x)), np.asarray(want), atol=1e-5)
    # more rows than KERNEL_MAX_ROWS (a prefill) take the dequantise-and-dot route
    many = jnp.asarray(rng.normal(size=(packed.KERNEL_MAX_ROWS + 3, k)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda v: packed.linear(v, w))(many)),
                               np.asarray(cpu_matmul.packed_matmul(many, w.data, w.scale,
                                                                   "q4_1")), atol=1e-5)
    xs = jnp.asarray(rng.normal(size=(3, 5, k)).astype(np.float32))  # vmap over a batch of x
    got = jax.jit(jax.vmap(lambda v: packed.linear(v, w)))(xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref(xs)), atol=1e-5)
    assert got.shape == (3, 5, k)


def test_bad_shapes_are_refused():
    rng = np.random.default_rng(4)
    w = packed.as_jax(packed.pack_gguf(rng.normal(size=(8, 64)).astype(np.float32), "q8_0"),
                      jnp.float32)
    with pytest.raises(ValueError, match="x has 32 features, the weight takes 64"):
        packed.linear(jnp.ones((1, 32)), w)
    with pytest.raises(ValueError, match="whole blocks of 32 values; K=48"):
        packed.row_bytes("q4_1", 48)
    with pytest.raises(ValueError, match="unknown weight format 'q5_1'"):
        packed.row_bytes("q5_1", 64)
    stacked = packed.PackedWeight(jnp.stack([w.data, w.data]), jnp.stack([w.scale, w.scale]),
                                  "q8_0", 64)
    with pytest.raises(ValueError, match="slice the stacked layers first"):
        packed.linear(jnp.ones((1, 64)), stacked)
    # a weight batched under vmap reaches the handler as [2, N, R] bytes: refused there
    with pytest.raises(Exception, match="batched W is not supported"):
        jax.vmap(lambda d: cpu_matmul.packed_matmul(jnp.ones((1, 64)), d, w.scale, "q8_0"))(
            stacked.data).block_until_ready()


def test_int8_packing_is_within_half_a_step():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(6, 40)).astype(np.float32)
    w[2] = 0.0  # a zero row keeps scale 1 and all-zero codes
    p = packed.pack_int8(w)
    values = _numpy_values(p)
    assert np.all(np.abs(values - w) <= p.scale[:, None] / 2 + 1e-7)
    assert p.scale[2] == 1.0 and not values[2].any()


@pytest.mark.parametrize("name,weights", [
    ("tiny-llama", "gguf"), ("tiny-gqa", "gguf"), ("tiny-qwen2", "gguf"),
    ("tiny-llama3-rope", "gguf"), ("tiny-gqa", "int8"), ("tiny-qwen2", "int8")])
def test_packed_model_computes_the_dequantized_float_model(name, weights):
    lm = models.load(name, weights=weights)
    formats = dict(lm.model.config.weight_formats)
    assert set(formats) >= set(packing.PACKED_LAYER_NAMES) | {"embedding"}
    if weights == "gguf":
        assert formats["wqkv"] == "q4_1" and formats["embedding"] == "q8_0"
    float_config, float_params = packing.unpack(lm.model.config, lm.params)
    t, slots = 7, 12
    tokens = jnp.asarray((np.arange(t) * 5 + 3)[None] % lm.model.vocab_size, jnp.int32)
    cache = lm.model.init_cache(1, slots)
    positions = jnp.arange(t)[None]
    mask = jnp.tril(jnp.ones((t, slots), bool))[None]
    got = jax.jit(lm.model.forward)(lm.params, tokens, positions, cache, mask)
    want = jax.jit(LlamaModel(float_config).forward)(float_params, tokens, positions, cache,
                                                     mask)
    scale = float(np.abs(np.asarray(want.logits)).max())
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits),
                               atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(got.cache.k), np.asarray(want.cache.k), atol=1e-5)
    # the sliced head (a drafter's frequent ids) and the embedding lookup
    np.testing.assert_allclose(
        np.asarray(lm.model.lm_head(lm.params, want.hidden, num_ids=17)),
        np.asarray(LlamaModel(float_config).lm_head(float_params, want.hidden, num_ids=17)),
        atol=1e-5 * scale)
    np.testing.assert_array_equal(np.asarray(lm.model.embed(lm.params, tokens)),
                                  np.asarray(LlamaModel(float_config).embed(float_params, tokens)))


# 8-bit activations (act8, --weights=gguf_a8) ----------------------------------------------


def _block_mins(w):
    """float64 [N, K]: each value's block min m (w = d q + m): Q4_1's, -8 d for Q4_0, 0 for Q8_0."""
    _, values, nbytes = packed.FORMATS[w.fmt]
    n, k = w.data.shape[0], w.in_features
    b = w.data.reshape(n, k // values, nbytes)
    half = lambda o: b[..., o:o + 2].copy().view(np.float16)[..., 0].astype(np.float64)  # noqa
    m = {"q4_1": lambda: half(2), "q4_0": lambda: -8 * half(0),
         "q8_0": lambda: np.zeros((n, k // values))}[w.fmt]()
    return np.repeat(m, values, axis=1)


def _quantized_x(x):
    q, d = packed.quantize_activations(jnp.asarray(x))
    q, d = np.asarray(q).astype(np.float64), np.asarray(d).astype(np.float64)
    m, k = x.shape
    return q, d, (q.reshape(m, k // 32, 32) * d[..., None]).reshape(m, k)


def test_quantize_activations():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 96)).astype(np.float32) * np.array([1e-3, 1.0, 50.0])[:, None]
    x[1, 32:64] = 0.0  # an all-zero block
    q, d, xhat = _quantized_x(x)
    assert np.abs(q).max() <= 127 and np.all(q == np.round(q))
    assert np.all(np.abs(xhat - x) <= d.repeat(32, axis=1) / 2 * (1 + 1e-6))
    assert np.all(np.abs(q).reshape(3, 3, 32).max(-1)[[0, 1, 1, 2], [0, 0, 2, 1]] == 127)
    assert not q[1, 32:64].any() and d[1, 1] == 0


@pytest.mark.parametrize("fmt", packed.A8_FORMATS)
def test_act8_kernel_equals_the_quantized_product(fmt):
    """Kernel (both paths, M = 1..17) == float64 W @ xhat (xhat: x rounded by the reference
    quantize_activations) within the float32 accumulation bound of its terms |d q| |xhat| and
    |m| |xhat|; far from W @ x (it does round the activations)."""
    rng = np.random.default_rng(5)
    n, k = 37, 96
    w = _random_weight(rng, fmt, n, k)
    values = _numpy_values(w).astype(np.float64)
    mins = _block_mins(w)
    terms = np.abs(values - mins) + np.abs(mins)
    wj = packed.as_jax(w, jnp.float32)
    gamma = k * U / (1 - k * U)
    for m in range(1, 18):
        x = rng.normal(size=(m, k)).astype(np.float32)
        _, _, xhat = _quantized_x(x)
        exact = xhat @ values.T
        bound = gamma * (np.abs(xhat) @ terms.T)
        for isa in cpu_matmul.available_isas():
            y = np.asarray(cpu_matmul.packed_matmul(jnp.asarray(x), wj.data, wj.scale, fmt,
                                                    isa=isa, act8=True))
            excess = np.abs(y - exact) - bound
            assert excess.max() <= 0, (m, isa, excess.max())
            # it does round the activations: far from the unrounded product
            unrounded = x.astype(np.float64) @ values.T
            assert np.abs(y - unrounded).max() > 10 * np.abs(y - exact).max()
    y = np.asarray(packed.linear(jnp.asarray(x), wj, use_kernel=False, act8=True))
    assert (np.abs(y - exact) - 2 * bound).max() <= 0  # the reference: xhat rounded to float32


def test_act8_kernel_quantizes_as_the_reference_and_sums_integers_exactly():
    """A Q8_0 weight whose row n holds a single 1 (scale 1.0) at column n reads back
    xhat[:, n] = d q exactly: the kernel's quantisation equals the JAX reference's. Then scale-1
    weights with integer x (dx ~ 1): the integer products and sums are exact."""
    rng = np.random.default_rng(6)
    k = 64
    blocks = np.zeros((k, k // 32, 34), np.uint8)
    blocks[..., :2] = np.array([1.0], np.float16).view(np.uint8)
    for col in range(k):
        blocks[col, col // 32, 2 + col % 32] = 1
    w = packed.PackedWeight(jnp.asarray(blocks.reshape(k, -1)), jnp.ones((1,), jnp.float32),
                            "q8_0", k)
    x = rng.normal(size=(5, k)).astype(np.float32) * 3
    q, d = packed.quantize_activations(jnp.asarray(x))
    want = np.asarray(packed.dequantize_activations(q, d))
    for isa in cpu_matmul.available_isas():
        got = np.asarray(cpu_matmul.packed_matmul(jnp.asarray(x), w.data, w.scale, "q8_0",
                                                  isa=isa, act8=True))
        np.testing.assert_array_equal(got, want)
    for fmt in packed.A8_FORMATS:
        wt = _random_weight(rng, fmt, 11, k)
        data = np.asarray(wt.data).reshape(11, k // 32, -1).copy()
        data[..., :2] = np.array([1.0], np.float16).view(np.uint8)
        if fmt == "q4_1":
            data[..., 2:4] = np.array([0.5], np.float16).view(np.uint8)
        wt = packed.PackedWeight(data.reshape(11, -1), np.zeros((1,), np.float32), fmt, k)
        values = _numpy_values(wt).astype(np.float64)
        xi = rng.integers(-127, 128, size=(3, k)).astype(np.float32)
        xi[:, ::32] = 127  # each block's max: dx = 127 * (1/127) in float32, q = x
        _, dx, xhat = _quantized_x(xi)
        assert np.array_equal(np.round(xhat / dx.repeat(32, axis=1)), xi)
        exact = xhat @ values.T
        wj = packed.as_jax(wt, jnp.float32)
        for isa in cpu_matmul.available_isas():
            got = np.asarray(cpu_matmul.packed_matmul(jnp.asarray(xi), wj.data, wj.scale, fmt,
                                                      isa=isa, act8=True))
            np.testing.assert_allclose(got, exact, rtol=2e-6, atol=0)


def test_act8_is_refused_for_other_formats():
    w = packed.as_jax(_random_weight(np.random.default_rng(7), "q6_k", 4, 256), jnp.float32)
    with pytest.raises(ValueError, match="8-bit activations take"):
        cpu_matmul.packed_matmul(jnp.ones((1, 256)), w.data, w.scale, "q6_k", act8=True)
    # linear() leaves a format without 8-bit products on float inputs
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 256)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(packed.linear(x, w, act8=True)),
                                  np.asarray(packed.linear(x, w)))


def test_gguf_a8_model_kernel_steps_match_its_prefill_and_differ_from_gguf():
    """The same gguf_a8 model through the kernel (incremental steps of <= 32 rows) and through
    the reference (a 40-token prefill: dequantised x-hat and W in XLA's GEMM); and it is another
    model than gguf (rounded activations move the logits far beyond float noise)."""
    lm = models.load("tiny-gqa", weights="gguf_a8")
    assert lm.model.config.act8
    with pytest.raises(ValueError, match="no float model"):
        packing.unpack(lm.model.config, lm.params)
    t, slots = 40, 48
    tokens = jnp.asarray((np.arange(t) * 7 + 3)[None] % lm.model.vocab_size, jnp.int32)
    pos = jnp.arange(t)[None]
    mask = jnp.tril(jnp.ones((t, slots), bool))[None]
    fwd = jax.jit(lm.model.forward)
    full = fwd(lm.params, tokens, pos, lm.model.init_cache(1, slots), mask)
    head = fwd(lm.params, tokens[:, :30], pos[:, :30], lm.model.init_cache(1, slots),
               mask[:, :30])
    cache = head.cache.replace(lengths=head.cache.lengths + 30)
    tail = fwd(lm.params, tokens[:, 30:], pos[:, 30:], cache, mask[:, 30:])
    want = np.asarray(full.logits[0, 30:])
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(tail.logits[0]), want, atol=1e-4 * scale)
    plain = models.load("tiny-gqa", weights="gguf")
    other = np.asarray(jax.jit(plain.model.forward)(plain.params, tokens, pos,
                                                    plain.model.init_cache(1, slots),
                                                    mask).logits[0, 30:])
    assert np.abs(other - want).max() > 1e-3 * scale


def test_weights_are_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="weights must be one of float32, gguf, gguf_a8, int8"):
        models.load("tiny-llama", weights="int4")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(ValueError, match="HF checkpoint directory: use --weights=int8"):
        models.check_weights("gguf", str(hf_dir))


@pytest.mark.parametrize("fmt", ["q4_0", "q5_0"])
def test_widen_to_q8_0_keeps_every_value(fmt):
    rng = np.random.default_rng(9)
    w = _random_weight(rng, fmt, 7, 96)
    wide = packed.widen_to_q8_0(w)
    assert wide.fmt == "q8_0" and wide.data.shape == (7, 3 * 34)
    np.testing.assert_array_equal(_numpy_values(wide), _numpy_values(w))
    stacked = packed.stack([w, _random_weight(rng, fmt, 7, 96)])  # [L, N, R] too
    np.testing.assert_array_equal(
        np.asarray(packed.dequantize(packed.as_jax(packed.widen_to_q8_0(stacked), jnp.float32))),
        np.asarray(packed.dequantize(packed.as_jax(stacked, jnp.float32))))
    with pytest.raises(ValueError, match="does not widen"):
        packed.widen_to_q8_0(_random_weight(rng, "q4_1", 2, 32))


def _write_quantized_gguf(path, config, params, widening=False):
    """A llama-architecture GGUF of float ``params`` (specjax layout), laid out as llama.cpp's
    converter writes it (q / k rows permuted), with MIXED block types: attn_v in Q8_0 (so the
    fused q/k/v group differs in type), ffn_down Q8_0 in layer 0 only (so the stack differs
    across layers), the other projections Q4_1, the embedding Q8_0, the untied head Q4_1.
    ``widening``: q / k in Q5_0 and ffn_down Q4_0 after layer 0 instead (types that widen to
    Q8_0 exactly, as Gemma 3's and Qwen2.5's files mix them)."""
    import gguf
    from models.gguf import unpermute_rows
    c = config
    q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)

    def put(name, rows, kind=None):
        rows = np.ascontiguousarray(rows, np.float32)
        if kind is None:
            w.add_tensor(name, rows)
        else:
            w.add_tensor(name, gguf.quants.quantize(rows, kind), raw_dtype=kind)

    def permute(rows, n_head):  # the inverse of unpermute_rows
        d_half = rows.shape[0] // n_head // 2
        return rows.reshape(n_head, 2, d_half, -1).swapaxes(1, 2).reshape(rows.shape)

    rows = packing.float_rows(c, params)
    lay = params["layers"]
    hd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    put("token_embd.weight", rows["embedding"], q.Q8_0)
    put("output.weight", rows["lm_head"], q.Q4_1)
    put("output_norm.weight", params["final_norm"])
    for i in range(c.num_layers):
        qkv = rows["wqkv"][i]
        assert np.array_equal(unpermute_rows(permute(qkv[:hd], c.num_heads), c.num_heads),
                              qkv[:hd])
        qk = q.Q5_0 if widening else q.Q4_1
        put(f"blk.{i}.attn_q.weight", permute(qkv[:hd], c.num_heads), qk)
        put(f"blk.{i}.attn_k.weight", permute(qkv[hd:hd + kd], c.num_kv_heads), qk)
        put(f"blk.{i}.attn_v.weight", qkv[hd + kd:], q.Q8_0)
        put(f"blk.{i}.attn_output.weight", rows["wo"][i], q.Q4_1)
        put(f"blk.{i}.ffn_gate.weight", rows["w_gate_up"][i][:c.intermediate_size], q.Q4_1)
        put(f"blk.{i}.ffn_up.weight", rows["w_gate_up"][i][c.intermediate_size:], q.Q4_1)
        put(f"blk.{i}.ffn_down.weight", rows["w_down"][i],
            q.Q8_0 if i == 0 else (q.Q4_0 if widening else q.Q4_1))
        put(f"blk.{i}.attn_norm.weight", lay["attn_norm"][i])
        put(f"blk.{i}.ffn_norm.weight", lay["mlp_norm"][i])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("widening", [False, True])
def test_gguf_blocks_load_as_the_file_stores_them(tmp_path, widening):
    """--weights=gguf on a GGUF file: uniform tensors keep their blocks (q / k rows
    un-permuted), mixed groups / stacks of Q8_0 / Q5_0 / Q4_0 widen to Q8_0, other mixes fall
    back to f32 rows, and the model computes what the float32 load of the same file computes."""
    config = models.TINY_CONFIGS["tiny-llama"]
    path = tmp_path / "tiny.gguf"
    _write_quantized_gguf(path, config, models.tiny_params(config), widening=widening)
    packed_lm = models.load(str(path), weights="gguf")
    float_lm = models.load(str(path))
    mixed = "q8_0" if widening else "f32"
    assert dict(packed_lm.model.config.weight_formats) == {
        "wqkv": mixed, "wo": "q4_1", "w_gate_up": "q4_1", "w_down": mixed,
        "embedding": "q8_0", "lm_head": "q4_1"}
    t, slots = 6, 8
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9]], jnp.int32)
    mask = jnp.tril(jnp.ones((t, slots), bool))[None]
    args = (tokens, jnp.arange(t)[None], packed_lm.model.init_cache(1, slots), mask)
    got = jax.jit(packed_lm.model.forward)(packed_lm.params, *args)
    want = jax.jit(float_lm.model.forward)(float_lm.params, *args)
    scale = float(np.abs(np.asarray(want.logits)).max())
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits),
                               atol=1e-5 * scale)


@pytest.mark.parametrize("fmt", ["q4_1", "i8"])
def test_kernel_reads_a_stack_layer_in_place(fmt):
    """``PackedWeight.at(i)``: the kernel reads layer ``i`` of a stack ``[L, N, R]`` without a
    copy; the same products as the sliced layer (bit for bit: the same code on the same
    bytes), with a static or a traced index (a scan over layers), on every code path; an
    index outside the stack is refused by the handler, never read."""
    rng = np.random.default_rng(11)
    k, n, num = 64, 72, 3
    ws = [_random_weight(rng, fmt, n, k) for _ in range(num)]
    stack = packed.as_jax(packed.stack(ws), jnp.float32)
    x = jnp.asarray(rng.normal(size=(3, k)).astype(np.float32))
    for isa in cpu_matmul.available_isas():
        for i in range(num):
            one = packed.as_jax(ws[i], jnp.float32)
            want = packed.linear(x, one, isa=isa)
            got = packed.linear(x, stack.at(i), isa=isa)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the reference path resolves the view to the same layer
    np.testing.assert_array_equal(
        np.asarray(packed.linear(x, stack.at(1), use_kernel=False)),
        np.asarray(packed.linear(x, packed.as_jax(ws[1], jnp.float32), use_kernel=False)))

    def scan(x0, in_place):  # x <- tanh(x W_i^T) over the stack, the index traced
        def body(v, xs):
            layer, i = xs
            w = stack.at(i) if in_place else layer  # layer: the scan's slice (a copy)
            return jnp.tanh(packed.linear(v, w)[:, :k]), None
        return jax.lax.scan(body, x0, (stack, jnp.arange(num)))[0]

    np.testing.assert_array_equal(np.asarray(jax.jit(scan, static_argnums=1)(x, True)),
                                  np.asarray(jax.jit(scan, static_argnums=1)(x, False)))
    with pytest.raises(Exception, match="layer index is outside the stack"):
        jax.jit(lambda i: packed.linear(x, stack.at(i)))(num).block_until_ready()
    with pytest.raises(ValueError, match="takes a stack of weights"):
        packed.as_jax(ws[0], jnp.float32).at(0)
