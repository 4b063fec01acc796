"""Loads GGUF (llama.cpp) checkpoints: weights, config and tokenizer.

Architectures: ``llama`` (Llama 2/3/3.1+ with its ``rope_freqs`` factors, Mistral, SmolLM),
``qwen2`` (Qwen2 / Qwen2.5), ``qwen3`` and ``gemma3`` (text). Weights are dequantized to float32
with ``gguf.quants.dequantize``. llama.cpp's converter permutes the rows of the ``llama``
architecture's q and k projections (within each head, the half-split rotary layout becomes
interleaved pairs); :func:`unpermute_rows` undoes it so that specjax's half-split rope applies.
The other architectures keep HF's layout. A file without ``output.weight`` ties the LM head to
the embedding. Gemma files store their norms as ``1 + w`` already (llama.cpp's converter adds
the one), and llama.cpp fixes what the metadata does not say: Gemma 3's sliding-window layers
use rope base 10000 and every sixth layer is global (unless the file says otherwise). A
``llama`` file carries no sliding window (Mistral v0.1's 4096 window is lost in conversion, and
llama.cpp attends to the whole context too).

The tokenizer is rebuilt from the metadata (``tokenizer.ggml.*``) with the ``tokenizers``
library. Byte-level BPE vocabularies (``tokenizer.ggml.model == 'gpt2'``) are built here: the
pre-tokenizer is chosen from ``tokenizer.ggml.pre`` to match what the model's own HF
``tokenizer.json`` (and llama.cpp) does, e.g. ``smollm``: split every digit, then GPT-2 byte-level.
SentencePiece vocabularies (``'llama'``: Llama 2, Mistral, Gemma) are built by
:mod:`models.spm_tokenizer`. Other tokenizer models are not supported.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import tokenizers
from tokenizers import decoders, pre_tokenizers, processors

from models.hf import CheckpointError, params_from_hf
from models.llama import LlamaConfig, RopeScaling
from models.tokenizer import TextTokenizer, end_token_ids
from specjax import packed

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
_PERMUTED_ARCHITECTURES = ("llama",)
_GEMMA3_SWA_PATTERN = 6  # llama.cpp: layers 6k-1 are global, the others sliding-window
_GEMMA3_LOCAL_ROPE_BASE = 10000.0

# GPT-2 style split (the ByteLevel pre-tokenizer's built-in regex) after isolating each digit.
_DIGIT_SPLIT_PRES = ("smollm", "starcoder")
_GPT2_PRES = ("gpt2", "default")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRES = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "llama-v3": _LLAMA3_REGEX,
               "qwen2": _QWEN2_REGEX}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_HF_NAMES = {  # GGUF per-layer tensor -> HF per-layer tensor
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GEMMA_HF_NAMES = {**_HF_NAMES, "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                   "post_attention_norm.weight": "post_attention_layernorm.weight",
                   "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` for ``path``; a clear :class:`CheckpointError` if it is unreadable."""
    import gguf
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: pass the path of a .gguf file.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with b'GGUF'); "
                              "pass a llama.cpp .gguf checkpoint, or a HF checkpoint directory.")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader fails deep inside numpy on truncated files
        raise CheckpointError(
            f"{path} could not be read as GGUF ({type(e).__name__}: {e}): the file is truncated "
            f"or corrupt ({os.path.getsize(path)} bytes); download it again.") from None


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's rotary row permutation of a q/k weight ``[n_head*D, ...]`` (or bias).

    llama.cpp stores rows of each head as ``(i, half)`` pairs; HF stores ``(half, i)``.
    """
    d_half = w.shape[0] // n_head // 2
    return w.reshape(n_head, d_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(reader, path: str = "GGUF file", *, dtype: str = "float32",
                     scan_layers: bool = True) -> LlamaConfig:
    """Reads the architecture hyperparameters (``{arch}.*`` keys) into a :class:`LlamaConfig`."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{SUPPORTED_ARCHITECTURES} (Llama, Mistral, SmolLM files use 'llama').")
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731

    def need(key):
        value = get(key)
        if value is None:
            raise CheckpointError(f"{path} lacks the metadata key {arch}.{key}: the file is "
                                  "incomplete or was not written by llama.cpp's converter.")
        return value

    if get("expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts GGUF files are not supported.")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", None, "linear"):
        raise ValueError(f"{path}: rope scaling {scaling_type!r} is not supported from GGUF "
                         "metadata (supported: none, linear, and Llama 3.1's rope_freqs factors).")
    scaling = None
    if scaling_type == "linear" and float(get("rope.scaling.factor", 1.0)) != 1.0:
        scaling = RopeScaling(factor=float(get("rope.scaling.factor")), rope_type="linear")
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path} has no token_embd.weight tensor: the file is incomplete.")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings are not supported.")
    vocab = int(get("vocab_size", 0) or shapes["token_embd.weight"][-1])
    names = set(shapes)
    num_layers = int(need("block_count"))
    gemma = arch == "gemma3"
    family = {}
    if gemma:
        window = int(need("attention.sliding_window"))
        pattern = get("attention.sliding_window_pattern", _GEMMA3_SWA_PATTERN)
        if isinstance(pattern, (list, tuple)):  # per-layer flags: True = sliding window
            local = [bool(x) for x in pattern]
        else:
            local = [(i + 1) % int(pattern) != 0 for i in range(num_layers)]
        # llama.cpp: Gemma 3 27B (62 layers) scales queries by 1/sqrt(hidden / heads), the
        # others by 1/sqrt(head_dim) (query_pre_attn_scalar in HF's config).
        qscale = (hidden / heads) ** -0.5 if num_layers == 62 else 0.0
        family = dict(qk_norm=True, sandwich_norms=True, activation="gelu_tanh",
                      embed_scale=True, query_scale=qscale,
                      layer_windows=tuple(window if x else 0 for x in local),
                      rope_local_theta=float(get("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)))
    elif arch == "qwen3":
        family = dict(qk_norm=True)
    if "rope_freqs.weight" in names:  # Llama 3.1+: per-frequency divisors, read here (small)
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        family["rope_freq_factors"] = tuple(float(x) for x in np.asarray(factors.data).ravel())
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_layers=num_layers, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(get("context_length", 4096)),
        dtype=dtype, param_dtype=dtype, scan_layers=scan_layers, **family)


def params_from_gguf(reader, config: LlamaConfig, path: str = "GGUF file") -> dict:
    """Dequantizes every tensor and maps it into the specjax param tree (numpy float32)."""
    from gguf.quants import dequantize
    arch = _field(reader, "general.architecture")
    permuted = arch in _PERMUTED_ARCHITECTURES
    hf_names = _GEMMA_HF_NAMES if config.sandwich_norms else _HF_NAMES
    hf = {}
    for t in reader.tensors:
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name} uses quantization "
                                  f"{t.tensor_type.name}, which gguf's numpy dequantizer does not "
                                  "implement; use a file with another quantization.") from None
        if t.name == "token_embd.weight":
            hf["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            hf["model.norm.weight"] = w
        elif t.name == "output.weight":
            hf["lm_head.weight"] = w
        elif t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in hf_names:
                continue
            if permuted and rest.startswith(("attn_q.", "attn_k.")):
                w = unpermute_rows(w, config.num_heads if rest.startswith("attn_q.")
                                   else config.num_kv_heads)
            hf[f"model.layers.{layer}.{hf_names[rest]}"] = w
    return params_from_hf(hf, config, source=path)


def packed_weights_from_gguf(reader, config: LlamaConfig, path: str = "GGUF file") -> dict:
    """The linear layers, the embedding and an untied LM head as the file stores them:
    ``{name: PackedWeight}`` (numpy) for :func:`models.packing.assemble`.

    Tensors of a type the kernel reads (:data:`specjax.packed.GGUF_FORMATS`) keep their bytes
    (q / k rows un-permuted as whole rows). A fused group (q, k, v; gate, up) or a name whose
    tensors differ in type between its parts or layers is widened to ``q8_0`` when every type
    is Q8_0, Q5_0 or Q4_0 (the same values exactly: :func:`specjax.packed.widen_to_q8_0`; e.g.
    Gemma 3's and Qwen2.5's q / k / v); otherwise, or for a type the kernel does not read, it is
    dequantised to ``f32`` rows (lossless, but without the bytes saved).
    """
    from gguf.quants import dequantize
    arch = _field(reader, "general.architecture")
    permuted = arch in _PERMUTED_ARCHITECTURES
    tensors = {t.name: t for t in reader.tensors}

    def get(name, n_head=None):
        if name not in tensors:
            raise CheckpointError(f"{path} has no tensor {name}: the file is incomplete.")
        t = tensors[name]
        fmt = packed.GGUF_FORMATS.get(t.tensor_type.name)
        data = np.asarray(t.data)
        if fmt == "f32":
            data = np.ascontiguousarray(data, np.float32).view(np.uint8)
        data = data.reshape(int(t.shape[-1]), -1)  # [N rows, bytes]
        if n_head is not None:
            data = unpermute_rows(data, n_head)
        return fmt, data, t

    def as_f32(parts):
        rows = []
        for _, data, t, n_head in parts:
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(
                int(t.shape[-1]), int(t.shape[0]))
            rows.append(w if n_head is None else unpermute_rows(w, n_head))
        return packed.pack_f32(np.concatenate(rows))

    def weight(names_heads):
        parts = [get(n, h) + (h,) for n, h in names_heads]
        fmts = {p[0] for p in parts}
        k = int(parts[0][2].shape[0])
        if len(fmts) == 1 and None not in fmts:
            return packed.PackedWeight(np.concatenate([p[1] for p in parts]),
                                       np.zeros((1,), np.float32), fmts.pop(), k)
        if fmts <= set(packed.WIDENS_TO_Q8_0):
            wide = [packed.widen_to_q8_0(packed.PackedWeight(p[1], np.zeros((1,), np.float32),
                                                             p[0], k)) for p in parts]
            return packed.PackedWeight(np.concatenate([w.data for w in wide]),
                                       np.zeros((1,), np.float32), "q8_0", k)
        return as_f32(parts)

    c = config
    hq = c.num_heads if permuted else None
    hk = c.num_kv_heads if permuted else None
    groups = {"wqkv": [("attn_q.weight", hq), ("attn_k.weight", hk), ("attn_v.weight", None)],
              "wo": [("attn_output.weight", None)],
              "w_gate_up": [("ffn_gate.weight", None), ("ffn_up.weight", None)],
              "w_down": [("ffn_down.weight", None)]}
    out = {}
    for name, parts in groups.items():
        per_layer = [weight([(f"blk.{i}.{n}", h) for n, h in parts])
                     for i in range(c.num_layers)]
        fmts = {w.fmt for w in per_layer}
        if len(fmts) > 1 and fmts <= set(packed.WIDENS_TO_Q8_0):
            per_layer = [packed.widen_to_q8_0(w) for w in per_layer]
        elif len(fmts) > 1:
            per_layer = [packed.pack_f32(packed_np_dequantize(w)) for w in per_layer]
        out[name] = packed.stack(per_layer)
    out["embedding"] = weight([("token_embd.weight", None)])
    if not c.tie_embeddings:
        out["lm_head"] = weight([("output.weight", None)])
    return out


def packed_np_dequantize(w) -> np.ndarray:
    """float32 ``[N, K]`` values of a numpy :class:`specjax.packed.PackedWeight` (host side)."""
    import jax
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(packed.dequantize(packed.as_jax(w, np.float32)))


def _pre_tokenizer(pre: Optional[str], path: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    if pre in _SPLIT_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PRES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                     use_regex=False)])
    if pre not in _GPT2_PRES and pre is not None:
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre {pre!r}; using GPT-2 byte-level "
                      "splitting, which may tokenize some text differently from the original.",
                      stacklevel=3)
    return byte_level


def set_post_processor(backend, tokens, bos: Optional[int], eos: Optional[int]) -> None:
    """Makes ``encode(add_special_tokens=True)`` add ``bos`` before and ``eos`` after the text
    (None: not added; both None: no post-processor)."""
    single, specials = "$A:0", []
    if bos is not None:
        single, specials = f"{tokens[bos]}:0 {single}", [(tokens[bos], int(bos))]
    if eos is not None:
        single = f"{single} {tokens[eos]}:0"
        specials = list(dict.fromkeys(specials + [(tokens[eos], int(eos))]))
    if specials:
        backend.post_processor = processors.TemplateProcessing(single=single,
                                                               special_tokens=specials)


def tokenizer_from_gguf(reader, path: str = "GGUF file") -> Optional[TextTokenizer]:
    """Builds the tokenizer described by the metadata; None (with a warning) if unsupported."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind == "llama":
        from models.spm_tokenizer import spm_tokenizer_from_gguf  # it imports this module
        return spm_tokenizer_from_gguf(reader, path)
    if kind != "gpt2":
        warnings.warn(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, "
                      "'gpt2', and SentencePiece, 'llama'); no tokenizer loaded: pass token ids, "
                      "or load the HF checkpoint directory for its tokenizer.json.", stacklevel=2)
        return None
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", []))
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges,
                                                         fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"), path)
    backend.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty == _CONTROL]
    plain = [tokenizers.AddedToken(tokens[i], special=False, normalized=False)
             for i, ty in enumerate(types) if ty == _USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(plain)

    tid = lambda key: _field(reader, f"tokenizer.ggml.{key}")  # noqa: E731
    bos, eos = tid("bos_token_id"), tid("eos_token_id")
    set_post_processor(backend, tokens, bos if tid("add_bos_token") else None,
                       eos if tid("add_eos_token") else None)
    eos_ids = end_token_ids(backend, [eos, tid("eot_token_id"), tid("eom_token_id")])
    return TextTokenizer(backend, bos_id=bos, eos_ids=eos_ids, pad_id=tid("padding_token_id"),
                         chat_template=_field(reader, "tokenizer.chat_template"))


def load_gguf(path: str, *, dtype: str = "float32", scan_layers: bool = True
              ) -> tuple[LlamaConfig, dict, Optional[TextTokenizer]]:
    """Reads a GGUF file.

    Returns:
      ``(config, params, tokenizer)``: params are numpy float32 in the specjax layout; tokenizer
      is None when the file's tokenizer model is not supported.
    """
    reader = open_gguf(path)
    config = config_from_gguf(reader, path, dtype=dtype, scan_layers=scan_layers)
    params = params_from_gguf(reader, config, path)
    return config, params, tokenizer_from_gguf(reader, path)
