"""A drafter's own matrices in 8-bit blocks, read by the CPU kernel: cheaper drafting.

A learned drafter re-reads its weights at every drafted depth: the EAGLE-3 drafter's decoder
layer, fusion and draft-vocabulary head are ~9M float32 values (37 MB), the block drafter's
about the same. On a packed target (``--weights=gguf``: a plain step of 6-8 ms on this CPU)
reading them cost 0.18 plain steps per round (2026-11-30), as much as a quarter of what a
drafted token saves. Kept as Q8_0 blocks (34 bytes per 32 values, 3.8x fewer bytes) and multiplied by the
CPU kernel (:func:`specjax.packed.linear`), the same reads take a quarter of the time.

Lossless by construction: the drafter only proposes; the target verifies every drafted token
with its own weights. The proposals change as little as Q8_0 rounding changes the drafter's
logits (the tests compare them with the float drafter's on the dequantised weights).

What is packed (:func:`pack_params`): every decoder-layer dict (one with ``wq``, ``wk``,
``wv``, ``wo``, ``w_gate``, ``w_up``, ``w_down``: rewritten as the target's packed layer,
``wqkv`` / ``wo`` / ``w_gate_up`` / ``w_down``, which :mod:`models.decoder_block` applies
through the kernel), and the 2-D matrices named in :data:`MATRIX_NAMES` (``[K, N]``, stored
as ``N`` rows) whose ``K`` is a whole number of 32-value blocks. Norms, embeddings, the
vocabulary map and anything else stay as they are. Modules read the packed leaves through
:func:`param_or_packed` and multiply with :func:`specjax.packed.dense`.

Axis glossary: K input features, N output features (rows), E hidden size.
"""

from __future__ import annotations

import jax
import numpy as np

from drafters import head_weights
from models.packing import FLOAT_LINEAR_NAMES, PACKED_LAYER_NAMES, dequantize_layer, layer_rows
from specjax import packed

# --drafter_weights choices: auto = q8_0 when the target keeps packed weights on the CPU.
DRAFTER_WEIGHTS = ("auto", "float32", "q8_0")
OPTION_HELP = ("The drafter's own matrices: q8_0 (8-bit blocks through the CPU kernel: "
               "cheaper drafting, the same lossless output), float32, or auto (q8_0 when the "
               "target's weights are packed and the backend is the CPU).")
MATRIX_NAMES = ("fc", "fuse", "head")  # x [..., K] @ w [K, N] matrices of the drafters
FORMAT = "q8_0"


def resolve(choice: str, target) -> str:
    """``"float32"`` or ``"q8_0"`` for a ``--drafter_weights`` choice and a target model
    (``auto``: q8_0 when the target's weights are packed and the backend is the CPU, where
    the kernel runs; elsewhere a packed product is a dequantise + dot, no cheaper)."""
    if choice not in DRAFTER_WEIGHTS:
        raise ValueError(f"drafter_weights must be one of {', '.join(DRAFTER_WEIGHTS)}, got "
                         f"{choice!r}")
    if choice != "auto":
        return choice
    return FORMAT if head_weights.is_packed(target) and jax.default_backend() == "cpu" \
        else "float32"


def _blocks(k: int) -> bool:
    return k % 32 == 0  # whole Q8_0 blocks of inputs


def _pack_rows(rows: np.ndarray, fmt: str) -> packed.PackedWeight:
    return packed.as_jax(packed.pack_gguf(np.ascontiguousarray(rows), fmt), None)


def pack_params(params, fmt: str = FORMAT):
    """``params`` (a drafter's decode params, any nesting of dicts) with its decoder layers and
    :data:`MATRIX_NAMES` matrices as ``fmt`` blocks (jax arrays); ``fmt="float32"`` returns
    ``params`` unchanged. A layer or matrix whose inputs are not whole blocks stays float."""
    if fmt == "float32":
        return params
    if fmt != FORMAT:
        raise ValueError(f"drafter weights pack as {FORMAT} (or stay float32), not {fmt!r}")

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        if all(n in out and not packed.is_packed(out[n]) for n in FLOAT_LINEAR_NAMES):
            e, f = np.shape(out["wq"])[0], np.shape(out["w_down"])[0]
            if _blocks(e) and _blocks(f) and _blocks(int(np.prod(np.shape(out["wo"])[:-1]))):
                rows = layer_rows({n: np.asarray(out.pop(n)) for n in FLOAT_LINEAR_NAMES}, e)
                out.update({n: _pack_rows(rows[n], fmt) for n in PACKED_LAYER_NAMES})
        for name in MATRIX_NAMES:
            w = out.get(name)
            if (w is not None and not packed.is_packed(w) and np.ndim(w) == 2
                    and _blocks(np.shape(w)[0])):
                out[name] = _pack_rows(np.asarray(w, np.float32).T, fmt)
        return out

    return walk(params)


def unpack_params(params, config):
    """The float drafter a packed one computes: ``params`` with every packed layer and matrix
    dequantised back into the float layout (``config``: the target's, for the layer's shapes).
    The reference the packed drafters are tested against."""
    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        if "wqkv" in out and packed.is_packed(out["wqkv"]):
            out.update(dequantize_layer(config, out))
            for n in PACKED_LAYER_NAMES:
                if n not in FLOAT_LINEAR_NAMES:
                    del out[n]
        for name in MATRIX_NAMES:
            if packed.is_packed(out.get(name)):
                out[name] = packed.dequantize(out[name]).T
        return out

    return walk(params)


def param_or_packed(module, name: str, init, shape, dtype) -> object:
    """Inside a Linen ``setup``: the ``params`` entry ``name`` when it was packed at load (a
    :class:`~specjax.packed.PackedWeight`), else ``module.param(name, init, shape, dtype)``."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, packed.PackedWeight):
            return value
    return module.param(name, init, shape, dtype)


def layer_params(module, specs: dict, dtype) -> dict:
    """Inside a Linen ``setup``: one decoder layer's params from
    :func:`models.decoder_block.param_specs` ``specs``; a layer packed at load
    (:func:`pack_params`) has ``wqkv`` / ``wo`` / ``w_gate_up`` / ``w_down`` instead of the
    float linear weights, which :func:`models.decoder_block.decoder_block` applies."""
    if module.has_variable("params", "wqkv"):
        names = [n for n in specs if n not in FLOAT_LINEAR_NAMES] + list(PACKED_LAYER_NAMES)
        return {n: module.get_variable("params", n) if n in PACKED_LAYER_NAMES
                else module.param(n, specs[n][2], specs[n][0], dtype) for n in names}
    return {n: module.param(n, init, shape, dtype) for n, (shape, _, init) in specs.items()}


def packed_leaves(params) -> list:
    """The packed weights among ``params``' leaves (none for a float drafter)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=packed.is_packed)
    return [x for x in leaves if packed.is_packed(x)]
