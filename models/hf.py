"""Loads Hugging Face checkpoints of the Llama-style families from a directory: Llama (and SmolLM),
Mistral (with its sliding window), Qwen2 / Qwen2.5 (q/k/v biases), Qwen3 (q / k norms) and
Gemma 3 text models (``Gemma3ForCausalLM``: sandwich norms, GeGLU, scaled embeddings, interleaved
sliding-window and global layers with their own rope bases; its ``(1 + w)`` norm weights are
stored as ``1 + w``).

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
from typing import Optional

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 safetensors)
import numpy as np
import tokenizers

from models.llama import LlamaConfig, RopeScaling
from models.tokenizer import TextTokenizer, end_token_ids

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Gemma3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
GEMMA = ("Gemma3ForCausalLM",)
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


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


def _rope_settings(cfg: dict, source: str) -> tuple[float, Optional[RopeScaling], float]:
    """``(rope_theta, rope_scaling, local_theta)`` from either the v5 ``rope_parameters`` (one
    dict, or one per layer type as Gemma 3 has) or the older keys; ``local_theta`` is the base of
    the sliding-window layers (0: the same as the others)."""
    params, scaling = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise _bad(source, key, f"must be an object, got {value!r}")
    local_theta = 0.0
    if "full_attention" in params or "sliding_attention" in params:  # per layer type (v5)
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope scaling on the sliding-window layers is not "
                             "supported")
        if local:
            local_theta = _number(local, "rope_theta", 10000.0, source)
        params = params.get("full_attention") or {}
    elif cfg.get("rope_local_base_freq") is not None:  # Gemma 3, older config.json
        local_theta = _number(cfg, "rope_local_base_freq", 10000.0, source)
    theta = _number({"rope_theta": params.get("rope_theta", cfg.get("rope_theta", 10000.0))},
                    "rope_theta", 10000.0, source)
    spec = params if params.get("rope_type", "default") != "default" else scaling or params
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported; "
                         f"supported: {SUPPORTED_ROPE_TYPES} (no scaling, Llama-3 style or "
                         "linear scaling).")
    if rope_type == "default":
        return theta, None, local_theta
    if rope_type == "linear":
        return theta, RopeScaling(factor=_number(spec, "factor", 0, source),
                                  rope_type="linear"), local_theta
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k not in spec]
    if missing:
        raise _bad(source, "rope_scaling", f"({rope_type}) lacks {', '.join(missing)}")
    return theta, RopeScaling(
        factor=_number(spec, "factor", 0, source),
        low_freq_factor=_number(spec, "low_freq_factor", 0, source),
        high_freq_factor=_number(spec, "high_freq_factor", 0, source),
        original_max_position_embeddings=_size(spec, "original_max_position_embeddings", source)
    ), local_theta


def _layer_windows(cfg: dict, arch: str, num_layers: int, source: str) -> tuple:
    """The per-layer sliding windows (0: global attention) the checkpoint was trained with."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is None:
        if arch in GEMMA:  # older config.json: every pattern-th layer is global
            pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(num_layers)]
        elif arch == "MistralForCausalLM":
            types = ["sliding_attention" if window else "full_attention"] * num_layers
        elif cfg.get("use_sliding_window") and window:  # Qwen2 / Qwen3
            first = cfg.get("max_window_layers", num_layers)
            types = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(num_layers)]
        else:
            return ()
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= {
            "sliding_attention", "full_attention"}:
        raise _bad(source, "layer_types", f"must list 'sliding_attention' or 'full_attention' "
                   f"for each of the {num_layers} layers, got {types!r}")
    if "sliding_attention" not in types:
        return ()
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise _bad(source, "sliding_window", f"must be a positive integer for the "
                   f"sliding-window layers, got {window!r}")
    return tuple(window if t == "sliding_attention" else 0 for t in types)


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
    arch = architecture(cfg)
    gemma = arch in GEMMA
    act = cfg.get("hidden_activation" if gemma else "hidden_act",
                  "gelu_pytorch_tanh" if gemma else "silu")
    if act != "silu" and act not in _GELU_TANH:
        raise ValueError(f"activation {act!r} is not supported (only 'silu' and "
                         "'gelu_pytorch_tanh').")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported by specjax's decoder.")
    qkv_bias = arch == "Qwen2ForCausalLM"
    if arch != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
        raise ValueError("attention_bias=True (a bias on o_proj as well) is not supported; only "
                         "Qwen2's q/k/v bias is.")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ValueError(f"{key} is not supported (Gemma 2's soft-capping; Gemma 3 has "
                             "none).")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True (an encoder) is not supported.")
    windows = _layer_windows(cfg, arch, cfg["num_hidden_layers"], source)
    theta, scaling, local_theta = _rope_settings(cfg, source)
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
        tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)), qkv_bias=qkv_bias,
        max_position_embeddings=cfg.get("max_position_embeddings") or 4096,
        dtype=dtype, param_dtype=dtype, scan_layers=scan_layers,
        qk_norm=arch in GEMMA + ("Qwen3ForCausalLM",), sandwich_norms=gemma,
        activation="silu" if act == "silu" else "gelu_tanh", embed_scale=gemma,
        query_scale=(_number(cfg, "query_pre_attn_scalar", 256, source) ** -0.5 if gemma
                     else 0.0),
        layer_windows=windows, rope_local_theta=local_theta if windows else 0.0)


def architecture(cfg: dict) -> str:
    """The supported architecture a ``config.json`` names; ValueError if none."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        hint = (" (a multimodal Gemma 3: load its text model from a GGUF file, or a "
                "Gemma3ForCausalLM checkpoint)" if "Gemma3ForConditionalGeneration" in archs
                else " (SmolLM checkpoints are Llama)")
        raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; specjax "
                         f"loads {SUPPORTED_ARCHITECTURES}{hint}.")
    return arch


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


def params_from_hf(tensors: dict[str, np.ndarray], config: LlamaConfig, source: str = "checkpoint",
                   *, norm_offset: float = 0.0) -> dict:
    """Maps HF tensor names to the specjax param tree (numpy float32, layers stacked).

    Args:
      tensors: name -> array as stored by HF (``[out, in]`` projections).
      config: the architecture the tensors must fit; with ``sandwich_norms`` (Gemma) the layer
        norms have Gemma's names (``post_attention_layernorm`` is then the norm on the attention
        output, ``pre_feedforward_layernorm`` the MLP's input norm).
      source: named in error messages.
      norm_offset: added to every norm weight (1.0 for Gemma's ``(1 + w)`` scale).
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

    norm = lambda w: w + np.float32(norm_offset)  # noqa: E731
    mlp_norm = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
    layers = {
        "attn_norm": per_layer("input_layernorm.weight", (e,), norm),
        "wq": per_layer("self_attn.q_proj.weight", (h * d, e), lambda w: w.T.reshape(e, h, d)),
        "wk": per_layer("self_attn.k_proj.weight", (k * d, e), lambda w: w.T.reshape(e, k, d)),
        "wv": per_layer("self_attn.v_proj.weight", (k * d, e), lambda w: w.T.reshape(e, k, d)),
        "wo": per_layer("self_attn.o_proj.weight", (e, h * d), lambda w: w.T.reshape(h, d, e)),
        "mlp_norm": per_layer(f"{mlp_norm}.weight", (e,), norm),
        "w_gate": per_layer("mlp.gate_proj.weight", (f, e), lambda w: w.T),
        "w_up": per_layer("mlp.up_proj.weight", (f, e), lambda w: w.T),
        "w_down": per_layer("mlp.down_proj.weight", (e, f), lambda w: w.T),
    }
    if c.qkv_bias:
        layers["bq"] = per_layer("self_attn.q_proj.bias", (h * d,), lambda b: b.reshape(h, d))
        layers["bk"] = per_layer("self_attn.k_proj.bias", (k * d,), lambda b: b.reshape(k, d))
        layers["bv"] = per_layer("self_attn.v_proj.bias", (k * d,), lambda b: b.reshape(k, d))
    if c.qk_norm:
        layers["q_norm"] = per_layer("self_attn.q_norm.weight", (d,), norm)
        layers["k_norm"] = per_layer("self_attn.k_norm.weight", (d,), norm)
    if c.sandwich_norms:
        layers["post_attn_norm"] = per_layer("post_attention_layernorm.weight", (e,), norm)
        layers["post_mlp_norm"] = per_layer("post_feedforward_layernorm.weight", (e,), norm)
    params = {"embedder": {"embedding": get("model.embed_tokens.weight", (v, e))},
              "final_norm": norm(get("model.norm.weight", (e,))), "layers": layers}
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
    cfg = read_json(path)
    config = config_from_hf(cfg, dtype=dtype, scan_layers=scan_layers, source=path)
    params = params_from_hf(read_safetensors(directory), config, source=directory,
                            norm_offset=1.0 if architecture(cfg) in GEMMA else 0.0)
    return config, params, load_tokenizer(directory)
