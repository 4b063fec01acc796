"""Loads Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2, SmolLM) from a directory.

A checkpoint directory holds ``config.json``, the weights as ``model.safetensors`` or as shards
listed in ``model.safetensors.index.json``, and optionally ``tokenizer.json`` (plus
``tokenizer_config.json`` / ``chat_template.jinja`` / ``generation_config.json``). Nothing is
downloaded: fetch the files first (e.g. ``huggingface-cli download ORG/NAME --local-dir DIR``).

HF stores every projection as ``[out, in]``; specjax keeps ``[in, out]`` with the head axes split
out (see ``models/llama.py``) and the layers stacked on a leading axis. Both use the same
half-split rotary layout, so no permutation is needed.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 safetensors)
import numpy as np
import tokenizers

from models.llama import LlamaConfig, RopeScaling
from models.tokenizer import TextTokenizer, end_token_ids

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the config."""


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: a Hugging Face checkpoint directory needs it. "
                              "Download the complete checkpoint into the directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file is corrupt or "
                              "truncated; download it again.") from None


# config.json keys every supported checkpoint has (positive integers).
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _bad(source: str, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{source}: {field} {problem}; fix config.json or download the "
                           "checkpoint again")


def _size(cfg: dict, key: str, source: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(source, key, f"must be a positive integer, got {value!r}")
    return value


def _number(cfg: dict, key: str, default: float, source: str) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _bad(source, key, f"must be a positive number, got {value!r}")
    return float(value)


def _rope_settings(cfg: dict, source: str) -> tuple[float, Optional[RopeScaling]]:
    """``(rope_theta, rope_scaling)`` from either the v5 ``rope_parameters`` or the older keys."""
    params, scaling = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise _bad(source, key, f"must be an object, got {value!r}")
    theta = _number({"rope_theta": params.get("rope_theta", cfg.get("rope_theta", 10000.0))},
                    "rope_theta", 10000.0, source)
    spec = params if params.get("rope_type", "default") != "default" else scaling or params
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported; "
                         f"supported: {SUPPORTED_ROPE_TYPES} (no scaling, or Llama-3 style "
                         "scaling).")
    if rope_type == "default":
        return theta, None
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k not in spec]
    if missing:
        raise _bad(source, "rope_scaling", f"({rope_type}) lacks {', '.join(missing)}")
    return theta, RopeScaling(
        factor=_number(spec, "factor", 0, source),
        low_freq_factor=_number(spec, "low_freq_factor", 0, source),
        high_freq_factor=_number(spec, "high_freq_factor", 0, source),
        original_max_position_embeddings=_size(spec, "original_max_position_embeddings", source))


def config_from_hf(cfg: dict, *, dtype: str = "float32", scan_layers: bool = True,
                   source: str = "config.json") -> LlamaConfig:
    """Maps a HF ``config.json`` dict to a :class:`LlamaConfig`, validated first.

    Raises:
      CheckpointError: a config that is not an object, lacks a required size, or holds a size
        that is not a positive integer or heads that do not divide (naming ``source`` and the
        field).
      ValueError: for an architecture or feature specjax does not implement.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source} holds a JSON {type(cfg).__name__}, not an object of "
                              "model settings: the file is not a Hugging Face config.json; "
                              "download it again")
    for key in REQUIRED_SIZES:
        if key not in cfg:
            raise _bad(source, key, "is missing (a required model size)")
        _size(cfg, key, source)
    for key in OPTIONAL_SIZES:
        if cfg.get(key) is not None:
            _size(cfg, key, source)
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; specjax "
                         f"loads {SUPPORTED_ARCHITECTURES} (SmolLM checkpoints are Llama).")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu').")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported by specjax's Llama.")
    qkv_bias = arch == "Qwen2ForCausalLM"
    if arch != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
        raise ValueError("attention_bias=True (a bias on o_proj as well) is not supported; only "
                         "Qwen2's q/k/v bias is.")
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
    if window and uses_window:
        warnings.warn(f"the checkpoint uses sliding-window attention (window {window}); specjax "
                      f"attends to the full context, identical only while a sequence stays "
                      f"within {window} tokens.", stacklevel=3)
    theta, scaling = _rope_settings(cfg, source)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise _bad(source, "num_key_value_heads", f"({kv_heads}) must divide "
                   f"num_attention_heads ({heads})")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise _bad(source, "num_attention_heads", f"({heads}) must divide hidden_size "
                       f"({hidden}) when there is no head_dim")
        head_dim = hidden // heads
    if head_dim % 2:
        raise _bad(source, "head_dim", f"({head_dim}) must be even for rotary embeddings")
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=theta,
        rope_scaling=scaling, rms_norm_eps=_number(cfg, "rms_norm_eps", 1e-6, source),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        max_position_embeddings=cfg.get("max_position_embeddings") or 4096,
        dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)


def _open_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy (bf16 comes back as ml_dtypes.bfloat16)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: download the complete checkpoint.") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read ({e}): the file is truncated or "
                              "corrupt; download it again.") from None


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """All weights of a checkpoint directory, single file or sharded."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map': the index is corrupt; download "
                                  "it again.")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_open_safetensors(os.path.join(directory, shard)))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index} lists tensors that no shard holds ({missing[:5]}...): "
                                  "shards are missing or stale; download them again.")
        return tensors
    if os.path.exists(single):
        return _open_safetensors(single)
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory}: "
                          "specjax reads safetensors weights only (convert .bin checkpoints with "
                          "transformers' save_pretrained(safe_serialization=True)).")


def params_from_hf(tensors: dict[str, np.ndarray], config: LlamaConfig, source: str = "checkpoint"
                   ) -> dict:
    """Maps HF tensor names to the specjax param tree (numpy float32, layers stacked).

    Args:
      tensors: name -> array as stored by HF (``[out, in]`` projections).
      config: the architecture the tensors must fit.
      source: named in error messages.
    """
    c = config
    e, f, h, k, d, v = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                        c.head_dim, c.vocab_size)

    def get(name, shape):
        if name not in tensors:
            raise CheckpointError(f"{source} has no tensor {name!r}: the weights do not match "
                                  "config.json (or a shard is missing); re-download the "
                                  "checkpoint.")
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, "
                                  f"config.json implies {shape}; config and weights disagree.")
        return np.asarray(arr, dtype=np.float32)

    def per_layer(suffix, shape, transform):
        return np.stack([transform(get(f"model.layers.{i}.{suffix}", shape))
                         for i in range(c.num_layers)])

    layers = {
        "attn_norm": per_layer("input_layernorm.weight", (e,), lambda w: w),
        "wq": per_layer("self_attn.q_proj.weight", (h * d, e), lambda w: w.T.reshape(e, h, d)),
        "wk": per_layer("self_attn.k_proj.weight", (k * d, e), lambda w: w.T.reshape(e, k, d)),
        "wv": per_layer("self_attn.v_proj.weight", (k * d, e), lambda w: w.T.reshape(e, k, d)),
        "wo": per_layer("self_attn.o_proj.weight", (e, h * d), lambda w: w.T.reshape(h, d, e)),
        "mlp_norm": per_layer("post_attention_layernorm.weight", (e,), lambda w: w),
        "w_gate": per_layer("mlp.gate_proj.weight", (f, e), lambda w: w.T),
        "w_up": per_layer("mlp.up_proj.weight", (f, e), lambda w: w.T),
        "w_down": per_layer("mlp.down_proj.weight", (e, f), lambda w: w.T),
    }
    if c.qkv_bias:
        layers["bq"] = per_layer("self_attn.q_proj.bias", (h * d,), lambda b: b.reshape(h, d))
        layers["bk"] = per_layer("self_attn.k_proj.bias", (k * d,), lambda b: b.reshape(k, d))
        layers["bv"] = per_layer("self_attn.v_proj.bias", (k * d,), lambda b: b.reshape(k, d))
    params = {"embedder": {"embedding": get("model.embed_tokens.weight", (v, e))},
              "final_norm": get("model.norm.weight", (e,)), "layers": layers}
    if not c.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", (v, e)).T
    return params


def load_tokenizer(directory: str) -> Optional[TextTokenizer]:
    """The tokenizer of a checkpoint directory, or None when it has no ``tokenizer.json``."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return None
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"{path} could not be parsed ({e}): download it again.") from None
    tok_cfg_path = os.path.join(directory, "tokenizer_config.json")
    tok_cfg = read_json(tok_cfg_path) if os.path.exists(tok_cfg_path) else {}
    cfg_path = os.path.join(directory, "config.json")
    cfg = read_json(cfg_path) if os.path.exists(cfg_path) else {}
    gen_path = os.path.join(directory, "generation_config.json")
    gen = read_json(gen_path) if os.path.exists(gen_path) else {}

    def token_id(value):
        if isinstance(value, dict):  # an AddedToken serialised by older transformers
            value = value.get("content")
        return backend.token_to_id(value) if isinstance(value, str) else None

    def as_list(value):
        return list(value) if isinstance(value, (list, tuple)) else [value]

    eos = as_list(gen.get("eos_token_id")) + as_list(cfg.get("eos_token_id"))
    eos = [token_id(tok_cfg.get("eos_token"))] + eos
    bos = token_id(tok_cfg.get("bos_token"))
    bos = bos if bos is not None else gen.get("bos_token_id", cfg.get("bos_token_id"))
    template = tok_cfg.get("chat_template")
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return TextTokenizer(backend, bos_id=bos, eos_ids=end_token_ids(backend, eos),
                         pad_id=token_id(tok_cfg.get("pad_token")), chat_template=template)


def load_hf(directory: str, *, dtype: str = "float32", scan_layers: bool = True
            ) -> tuple[LlamaConfig, dict, Optional[TextTokenizer]]:
    """Reads a HF checkpoint directory.

    Returns:
      ``(config, params, tokenizer)``: params are numpy float32 in the specjax layout (cast them
      when putting them on device); tokenizer is None without ``tokenizer.json``.
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory: pass a Hugging Face checkpoint "
                              "directory (config.json + *.safetensors).")
    path = os.path.join(directory, "config.json")
    config = config_from_hf(read_json(path), dtype=dtype, scan_layers=scan_layers, source=path)
    params = params_from_hf(read_safetensors(directory), config, source=directory)
    return config, params, load_tokenizer(directory)
