"""Test kit: tiny random Llama-family models and slow, obviously-correct references.

Lives in ``tests/`` (imported as ``tinymodels``; pytest puts this directory on ``sys.path``)
because it imports the concrete model ``models.llama``, which ``specjax`` itself never does.

* :func:`tiny_model` builds a small float32 model whose weights are redrawn at unit-preserving
  scales, so attention is peaked and logits are well separated (std ~2): masking or position
  bugs change logits by far more than float error, and greedy argmax has no near-ties.
* :func:`full_forward` runs a whole sequence from an empty cache (teacher forcing).
* :func:`reference_forward` is an independent float64 numpy Llama forward (no cache, plain
  causal attention, Hugging Face conventions), the oracle for the model's math.
* :func:`greedy_reference` is naive greedy decoding: a full forward over the whole sequence at
  every step.
* :func:`random_parents` draws random BFS-ordered trees; :class:`RefPool` is a plain-Python
  n-gram pool (the reference of ``drafters/ngram_pool.py``).
* :func:`chain_logits` runs one chain alone from scratch (padded to a shared width).
* :data:`PROMPTS` are the toy prompts lossless methods are checked on (``conftest.py``'s
  ``reference`` fixtures decode them); :func:`rows_of` turns a loop output into per-row token
  lists; :func:`script` (a scripted drafter's params) and :func:`teacher_records`
  (distillation records) are built from known continuations.
* :func:`smollm2_config` reads the SmolLM2 architecture without loading its weights.

Sequence-level distribution tests use ``sequence_kit.py``; shared fixtures (``target``,
``reference``, ...) live in ``conftest.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.llama import LlamaConfig, LlamaModel, RopeScaling
from specjax import masks

KINDS = ("llama", "gqa", "mqa", "qwen2", "llama3_rope", "qwen3", "gemma3", "mistral_window")
# The other families' kinds (models/llama.py family options), for tests/test_families.py.
FAMILY_KINDS = ("qwen3", "gemma3", "mistral_window")

# A ragged batch (lengths 5, 10, 1, 4) with repeats that prompt lookup and n-gram pools can use.
PROMPTS = [[1, 2, 3, 1, 2], [4, 5, 6, 7, 8, 9, 10, 4, 5, 6], [11], [7, 7, 7, 7]]
SMALL_VOCAB = 24  # vocabulary of conftest's small_vocab_target (Jacobi, lookahead tests)


def tiny_config(kind: str = "llama", **overrides) -> LlamaConfig:
    """A small float32 :class:`LlamaConfig` of one architecture flavour.

    kinds: ``llama`` (multi-head, 3 layers), ``gqa`` (2 kv heads), ``mqa`` (1 kv head),
    ``qwen2`` (qkv bias, tied embeddings, theta 1e6), ``llama3_rope`` (Llama-3 rope scaling with
    a 64-token original context, so all three frequency bands occur at head_dim 16), ``qwen3``
    (q / k norms), ``gemma3`` (Gemma 3's layer: sandwich norms, q / k norms, GeGLU, scaled
    embeddings, a query scale, layers 0 and 2 with a 6-token window and rope base 1e4, layer 1
    global with base 1e6; untied, as tied random weights with scaled embeddings make a model that
    repeats its input), ``mistral_window`` (every layer through a 5-token window). The
    windows are shorter than :data:`PROMPTS` plus a few new tokens, so decoding crosses them.
    """
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3,
                num_heads=4, num_kv_heads=4)
    if kind == "llama":
        pass
    elif kind == "gqa":
        base.update(num_kv_heads=2)
    elif kind == "mqa":
        base.update(num_kv_heads=1, num_layers=2)
    elif kind == "qwen2":
        base.update(num_kv_heads=2, num_layers=2, qkv_bias=True, tie_embeddings=True,
                    rope_theta=1e6, rms_norm_eps=1e-6)
    elif kind == "llama3_rope":
        base.update(num_kv_heads=2, num_layers=2, rope_theta=500000.0,
                    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0,
                                             original_max_position_embeddings=64))
    elif kind == "qwen3":
        base.update(num_kv_heads=2, num_layers=2, qk_norm=True, rope_theta=1e6, head_dim=24)
    elif kind == "gemma3":
        base.update(num_kv_heads=1, qk_norm=True, sandwich_norms=True, activation="gelu_tanh",
                    embed_scale=True, query_scale=20.0 ** -0.5,
                    layer_windows=(6, 0, 6), rope_theta=1e6, rope_local_theta=1e4,
                    rms_norm_eps=1e-6)
    elif kind == "mistral_window":
        base.update(num_kv_heads=2, num_layers=2, layer_windows=(5, 5))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    base.update(overrides)
    return LlamaConfig(**base)


def random_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Parameters with the model's tree structure, drawn from numpy at unit-preserving scales."""
    model = LlamaModel(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    rng = np.random.default_rng(seed)
    e, f, h, d = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
    embedding_std = 2.0 / math.sqrt(e) if config.tie_embeddings else 1.0
    if config.embed_scale:  # the model multiplies by sqrt(e): unit-scale after that
        embedding_std /= math.sqrt(e)
    std = {
        "embedding": embedding_std,
        "wq": 2.0 / math.sqrt(e), "wk": 1.0 / math.sqrt(e), "wv": 1.0 / math.sqrt(e),
        "wo": 1.0 / math.sqrt(h * d), "w_gate": 1.0 / math.sqrt(e), "w_up": 1.0 / math.sqrt(e),
        "w_down": 1.0 / math.sqrt(f), "bq": 0.5, "bk": 0.5, "bv": 0.5,
        "lm_head": 2.0 / math.sqrt(e),
    }

    def draw(path, leaf):
        name = path[-1].key
        if name.endswith("norm"):
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = std[name] * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _tiny_model_cached(kind, seed, overrides):
    config = tiny_config(kind, **dict(overrides))
    return LlamaModel(config), random_params(config, seed)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    """``(LlamaModel, params)`` for :func:`tiny_config` ``(kind, **overrides)``; cached."""
    return _tiny_model_cached(kind, seed, tuple(sorted(overrides.items())))


@functools.partial(jax.jit, static_argnames=("model", "layers", "hidden_layers"))
def forward(model, params, tokens, positions, cache, mask, layers=None, hidden_layers=(),
            logits_at=None):
    """Jitted ``model.forward`` (``layers`` / ``hidden_layers`` must be tuples)."""
    return model.forward(params, tokens, positions, cache, mask, layers=layers,
                         hidden_layers=hidden_layers, logits_at=logits_at)


def full_forward(model, params, tokens, num_slots: int | None = None, layers=None,
                 hidden_layers=(), start_position: int = 0):
    """Teacher-forced forward of ``tokens[B, T]`` from an empty cache, at positions
    ``start_position + (0..T-1)``."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    num_slots = t if num_slots is None else num_slots
    cache = model.init_cache(b, num_slots)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + start_position, (b, t))
    mask = masks.causal_mask(cache.lengths, t, num_slots)
    return forward(model, params, tokens, positions, cache, mask,
                   layers=None if layers is None else tuple(layers),
                   hidden_layers=tuple(hidden_layers))


def greedy_reference(model, params, prompt: Sequence[int], max_new_tokens: int,
                     eos_ids: Sequence[int] = (), width: int | None = None) -> list[int]:
    """Naive greedy decoding: a full forward over the whole sequence for every new token.

    The sequence is right-padded to ``width`` (default prompt + max_new_tokens) so every step
    reuses one compiled forward; causality makes the padding invisible to earlier positions.
    """
    seq = list(prompt)
    width = len(seq) + max_new_tokens if width is None else width
    out = []
    for _ in range(max_new_tokens):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(full_forward(model, params, padded).logits)[0, len(seq) - 1]
        token = int(np.argmax(logits))
        out.append(token)
        seq.append(token)
        if token in eos_ids:
            break
    return out


def chain_logits(model, params, chain: Sequence[int], width: int = 16) -> np.ndarray:
    """Logits ``[len(chain), V]`` of one chain run alone from scratch (right-padded to ``width``;
    causality hides the padding), so chains of different lengths share one compiled forward."""
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(chain)] = chain
    return np.asarray(full_forward(model, params, padded).logits)[0, :len(chain)]


def rows_of(out) -> list[list[int]]:
    """Each row's new tokens as a list, from a loop output's ``tokens[B, N]`` and
    ``lengths[B]`` (``GenerateOutput``, ``SpecOutput``)."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tokens[i, :lengths[i]].tolist() for i in range(len(lengths))]


def script(prompts, rows, width: int = 64) -> jax.Array:
    """``int32[B, width]``: each ``prompt + row``, zero-padded; the params of a
    ``drafters.scripted.ScriptedDrafter`` that knows the continuations ``rows``."""
    out = np.zeros((len(prompts), width), np.int32)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        out[i, :len(p) + len(r)] = list(p) + list(r)
    return jnp.asarray(out)


def teacher_records(model, params, prompts, rows):
    """``distill.Records`` of ``prompt + row`` sequences (right-padded to the longest), with the
    target's teacher-forced hidden states: training data from known continuations."""
    from drafters import distill
    seqs = [list(p) + list(r) for p, r in zip(prompts, rows)]
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    hidden = np.asarray(distill.teacher_forced_hidden(model, params, tokens))
    return distill.Records(tokens, np.array(list(map(len, seqs)), np.int32),
                           np.array(list(map(len, prompts)), np.int32), hidden, {})


def smollm2_config() -> LlamaConfig:
    """The SmolLM2-135M architecture, read from its GGUF file's metadata (no weights loaded)."""
    from models import gguf, registry
    path = registry.gguf_path(registry.SMOLLM2)
    return gguf.config_from_gguf(gguf.open_gguf(path), path)


def reference_inv_freq(config: LlamaConfig, local: bool = False) -> np.ndarray:
    """float64 rope inverse frequencies, Llama-3 scaling written out per frequency as in HF's
    ``_compute_llama3_parameters``; with ``local``, those of a sliding-window layer (its own
    base, unscaled, as Gemma 3's)."""
    d = config.head_dim
    if local and config.rope_local_theta:
        return np.array([1.0 / config.rope_local_theta ** (i / d) for i in range(0, d, 2)])
    inv = [1.0 / config.rope_theta ** (i / d) for i in range(0, d, 2)]
    if config.rope_freq_factors:
        return np.array(inv) / np.array(config.rope_freq_factors)
    s = config.rope_scaling
    if s is None:
        return np.array(inv)
    if s.rope_type == "linear":
        return np.array(inv) / s.factor
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return np.array(out)


def reference_forward(model: LlamaModel, params, tokens, start_position: int = 0) -> dict:
    """Independent float64 numpy forward of ``tokens[B, T]`` at positions
    ``start_position + (0..T-1)``.

    Plain causal attention over the sequence (no cache), kv heads repeated per query group,
    half-split rotary embeddings: the Hugging Face Llama/Qwen2 conventions; and the family
    options written out as in HF's Qwen3 / Gemma 3 / Mistral code: q / k norms, sandwich norms,
    tanh-GELU, scaled embeddings, the query scale, per-layer windows and rope bases.

    Returns:
      dict with ``logits [B, T, V]``, ``hidden [B, T, E]`` (after the final norm) and
      ``residuals [L, B, T, E]`` (residual stream after each layer).
    """
    c = model.config
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    lp = p["layers"]
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    group = c.num_heads // c.num_kv_heads
    pos = np.arange(t) + start_position

    def rope_tables(local):
        angles = pos[:, None] * reference_inv_freq(c, local)[None, :]  # [T, D/2]
        return np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps) * w

    def rope(x, tables):  # [B, T, N, D]
        cos, sin = tables
        x1, x2 = np.split(x, 2, axis=-1)
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def act(g):
        if c.activation == "gelu_tanh":
            return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        return g / (1 + np.exp(-g))

    scale = c.query_scale or 1 / math.sqrt(c.head_dim)
    x = p["embedder"]["embedding"][tokens]
    if c.embed_scale:
        x = x * math.sqrt(c.hidden_size)
    residuals = []
    for i in range(c.num_layers):
        window = c.layer_windows[i] if c.layer_windows else 0
        visible = pos[:, None] >= pos[None, :]
        if window:
            visible &= pos[:, None] - pos[None, :] < window
        tables = rope_tables(local=window > 0)
        h = rms(x, lp["attn_norm"][i])
        q = np.einsum("bte,ehd->bthd", h, lp["wq"][i])
        k = np.einsum("bte,ekd->btkd", h, lp["wk"][i])
        v = np.einsum("bte,ekd->btkd", h, lp["wv"][i])
        if c.qkv_bias:
            q, k, v = q + lp["bq"][i], k + lp["bk"][i], v + lp["bv"][i]
        if c.qk_norm:
            q, k = rms(q, lp["q_norm"][i]), rms(k, lp["k_norm"][i])
        q, k = rope(q, tables), rope(k, tables)
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # head j -> kv j // G
        scores = np.einsum("bthd,bshd->bhts", q, k) * scale
        scores = np.where(visible, scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = np.einsum("bhts,bshd->bthd", probs, v)
        o = np.einsum("bthd,hde->bte", attn, lp["wo"][i])
        x = x + (rms(o, lp["post_attn_norm"][i]) if c.sandwich_norms else o)
        h = rms(x, lp["mlp_norm"][i])
        m = (act(h @ lp["w_gate"][i]) * (h @ lp["w_up"][i])) @ lp["w_down"][i]
        x = x + (rms(m, lp["post_mlp_norm"][i]) if c.sandwich_norms else m)
        residuals.append(x)
    hidden = rms(x, p["final_norm"])
    head = p["embedder"]["embedding"].T if c.tie_embeddings else p["lm_head"]
    return {"logits": hidden @ head, "hidden": hidden, "residuals": np.stack(residuals)}


# References for drafter data structures ---------------------------------------------------


def truncate_file(path) -> None:
    """Cuts a file to its first half (a damaged download)."""
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])


def noisy_params(drafter, seed: int = 1, scale: float = 0.3):
    """A drafter's init params plus Gaussian noise (heads whose drafts differ from the target's
    own LM head; any drafter with ``init_params(key)``)."""
    params = drafter.init_params(jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape)
                                     for a, k in zip(leaves, keys)])


def random_parents(rng, num_nodes):
    """A random valid BFS-ordered parent list (depth non-decreasing with the index)."""
    parents, depth = [-1], [0]
    for n in range(1, num_nodes):
        allowed = [m for m in range(n) if depth[m] + 1 >= depth[n - 1]]
        p = int(rng.choice(allowed))
        parents.append(p)
        depth.append(depth[p] + 1)
    return parents


class RefPool:
    """One row's pool as Python lists: bucket -> [(first, rest)] oldest first."""

    def __init__(self, num_keys, capacity):
        self.num_keys, self.capacity = num_keys, capacity
        self.buckets = {}

    def insert(self, gram):
        first, rest = gram[0], tuple(gram[1:])
        bucket = self.buckets.setdefault(first % self.num_keys, [])
        if (first, rest) in bucket:
            bucket.remove((first, rest))
        elif len(bucket) == self.capacity:
            bucket.pop(0)
        bucket.append((first, rest))

    def lookup(self, first, count):
        bucket = self.buckets.get(first % self.num_keys, [])
        return [rest for f, rest in reversed(bucket) if f == first][:count]
