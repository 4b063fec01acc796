"""Weight formats of a Llama-family model: float params, or linear layers kept packed.

``--weights`` (every binary) chooses one:

* ``float32``: every weight a float array in the config's dtype (the default, the only choice
  for training, and the only one whose weights split over a mesh's ``model`` axis: packed
  weights have no logical axes, so on a mesh they are replicated while the cache and the batch
  rows still shard; tested exact on 8 fake devices in ``tests/multidevice_sharding.py``);
* ``gguf``: the checkpoint's own blocks (e.g. SmolLM2's Q4_1 layers and Q8_0 embedding) read from
  the GGUF file as they are; every linear layer and the LM head run through
  :func:`specjax.packed.linear` (the C++ kernel on CPU). For a tiny test model, its float weights
  quantised by ``gguf``'s quantiser (Q4_1 layers, Q8_0 embedding / head), so that every method
  can be tested on the format without a GGUF file;
* ``gguf_a8``: ``gguf``'s weights, and every packed product's input rounded to 8 bits per
  32-value block first (``LlamaConfig.act8``; Q8_0 / Q4_0 / Q4_1 weights, the rest keep float
  inputs): llama.cpp's arithmetic, integer multiply-adds in the kernel. Another model than
  ``gguf`` / ``float32`` (its tokens can differ); every method is lossless with respect to it;
* ``int8``: per-output-channel symmetric int8 of the float weights (any checkpoint).

A packed model differs from the float one in its param tree: the layers hold four packed
projections, rows = output features (:data:`PACKED_LAYER_NAMES`): ``wqkv`` (the q, k and v
rows, in that order: one call for the three), ``wo``, ``w_gate_up`` (gate rows, then up rows) and
``w_down``; the embedding (``embedder/embedding``, rows = token ids) and an untied ``lm_head``
(rows = token ids) are packed too; norms and biases stay float. Which names are packed, in which
format, is static: ``LlamaConfig.weight_formats``.

Axis glossary: L layers, E embedding width, F MLP width, H query heads, K kv heads, D head dim,
V vocabulary, N rows (output features).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from specjax import packed

WEIGHTS = ("float32", "gguf", "gguf_a8", "int8")
PACKED_LAYER_NAMES = ("wqkv", "wo", "w_gate_up", "w_down")
FLOAT_LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# The formats a tiny (float) model is quantised to for --weights=gguf: SmolLM2's file's.
TINY_GGUF_FORMATS = {"layers": "q4_1", "embedding": "q8_0", "lm_head": "q8_0"}


def packed_shapes(config) -> dict:
    """``{name: (N rows, K inputs)}`` of every packable weight of ``config``."""
    c = config
    e, f, d = c.hidden_size, c.intermediate_size, c.head_dim
    shapes = {"wqkv": ((c.num_heads + 2 * c.num_kv_heads) * d, e), "wo": (e, c.num_heads * d),
              "w_gate_up": (2 * f, e), "w_down": (e, f), "embedding": (c.vocab_size, e)}
    if not c.tie_embeddings:
        shapes["lm_head"] = (c.vocab_size, e)
    return shapes


def layer_rows(lay: dict, hidden_size: int) -> dict:
    """One layer's (or a stack's) float linear weights (numpy, the float layout: ``wq [(L,) E,
    H, D]``, ...) as the rows of :data:`PACKED_LAYER_NAMES`: ``{name: float32 [(L,) N, K]}``."""
    e = hidden_size
    el = lambda w: np.asarray(w, np.float32)  # noqa: E731
    lead = el(lay["w_down"]).shape[:-2]  # () for one layer, (L,) for a stack

    def rows(w):  # [..., E, X...] -> [..., N, E]
        return np.swapaxes(el(w).reshape(lead + (e, -1)), -1, -2)

    return {
        "wqkv": np.concatenate([rows(lay["wq"]), rows(lay["wk"]), rows(lay["wv"])], axis=-2),
        "wo": np.swapaxes(el(lay["wo"]).reshape(lead + (-1, e)), -1, -2),
        "w_gate_up": np.concatenate([rows(lay["w_gate"]), rows(lay["w_up"])], axis=-2),
        "w_down": np.swapaxes(el(lay["w_down"]), -1, -2),
    }


def float_rows(config, params: dict) -> dict:
    """The packable weights of float ``params`` (numpy) as rows: ``{name: float32 [(L,) N, K]}``."""
    out = layer_rows(params["layers"], config.hidden_size)
    el = lambda w: np.asarray(w, np.float32)  # noqa: E731
    out["embedding"] = el(params["embedder"]["embedding"])
    if not config.tie_embeddings:
        out["lm_head"] = el(params["lm_head"]).T
    return out


def assemble(config, params: dict, packed_weights: dict):
    """``(config, params)`` with ``packed_weights`` (``{name: PackedWeight}``, numpy) in place of
    the float weights they replace; ``config.weight_formats`` records the formats."""
    lay = {k: v for k, v in params["layers"].items() if k not in FLOAT_LINEAR_NAMES}
    lay.update({k: packed_weights[k] for k in PACKED_LAYER_NAMES})
    out = {k: v for k, v in params.items() if k not in ("layers", "embedder", "lm_head")}
    out["layers"] = lay
    out["embedder"] = {"embedding": packed_weights["embedding"]}
    if not config.tie_embeddings:
        out["lm_head"] = packed_weights["lm_head"]
    formats = tuple(sorted((k, w.fmt) for k, w in packed_weights.items()))
    return dataclasses.replace(config, weight_formats=formats), out


def weights_of(config) -> str:
    """The ``--weights`` name (:data:`WEIGHTS`) a model with this config was loaded as:
    ``float32`` without packed weights, ``int8`` for per-channel int8 rows, else ``gguf`` (or
    ``gguf_a8`` with 8-bit activations)."""
    formats = {fmt for _, fmt in config.weight_formats}
    if not formats:
        return "float32"
    if "i8" in formats:
        return "int8"
    return "gguf_a8" if config.act8 else "gguf"


def pack_float(config, params: dict, weights: str):
    """Packs float numpy ``params`` as ``weights`` (``int8``, or ``gguf`` for a model without a
    GGUF file: :data:`TINY_GGUF_FORMATS`). Returns ``(config, params)``."""
    if weights not in ("int8", "gguf"):
        raise ValueError(f"pack_float packs int8 or gguf, not {weights!r}")
    if config.weight_formats:
        raise ValueError("these params are packed already")
    rows = float_rows(config, params)
    out = {}
    for name, w in rows.items():
        if weights == "int8":
            out[name] = packed.pack_int8(w)
        else:
            kind = "layers" if name in PACKED_LAYER_NAMES else name
            out[name] = packed.pack_gguf(w, TINY_GGUF_FORMATS[kind])
    return assemble(config, params, out)


def dequantize_layer(config, lay: dict) -> dict:
    """The float linear weights (jax, float32, the float layout ``wq [(L,) E, H, D]``, ...) that
    one packed layer's (or a stack's) :data:`PACKED_LAYER_NAMES` compute: the inverse of
    :func:`layer_rows` up to the format's rounding."""
    import jax.numpy as jnp
    c = config
    e, f, h, k, d = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                     c.head_dim)
    lead = lay["w_down"].data.shape[:-2]
    cols = lambda w: jnp.swapaxes(packed.dequantize(lay[w]), -1, -2)  # [.., N, K] -> [.., K, N]
    qkv = cols("wqkv")  # [(L,) E, (H + 2K) D]
    gate_up = cols("w_gate_up")
    return {"wq": qkv[..., :h * d].reshape(lead + (e, h, d)),
            "wk": qkv[..., h * d:(h + k) * d].reshape(lead + (e, k, d)),
            "wv": qkv[..., (h + k) * d:].reshape(lead + (e, k, d)),
            "wo": cols("wo").reshape(lead + (h, d, e)),
            "w_gate": gate_up[..., :f], "w_up": gate_up[..., f:], "w_down": cols("w_down")}


def unpack(config, params: dict):
    """The float model a packed one computes: ``(config, params)`` with every packed weight
    dequantised (:func:`specjax.packed.dequantize`) back into the float layout (jax arrays, the
    config's ``param_dtype``). The reference the packed path is tested against."""
    import jax.numpy as jnp
    if not config.weight_formats:
        return config, params
    if getattr(config, "act8", False):
        raise ValueError("a gguf_a8 model rounds its activations to 8 bits: no float model "
                         "computes it (unpack a gguf one)")
    c = config
    dt = jnp.dtype(c.param_dtype)
    lay = {n: w for n, w in params["layers"].items() if n not in PACKED_LAYER_NAMES}
    lay.update(dequantize_layer(c, params["layers"]))
    out = dict(params)
    out["layers"] = {name: w.astype(dt) for name, w in lay.items()}
    out["embedder"] = {"embedding": packed.dequantize(params["embedder"]["embedding"]).astype(dt)}
    if not c.tie_embeddings:
        out["lm_head"] = packed.dequantize(params["lm_head"]).T.astype(dt)
    return dataclasses.replace(c, weight_formats=()), out
