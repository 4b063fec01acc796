"""models/hf.py against transformers: tiny random checkpoints saved by save_pretrained, loaded by
specjax, same logits (max abs diff < 1e-4, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import hf  # noqa: E402
from models.llama import FAMILY_OPTIONS, LlamaConfig, LlamaModel  # noqa: E402
from specjax.masks import causal_mask  # noqa: E402

TOL = 1e-4
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, initializer_range=0.15)

CASES = {
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False), None),
    "llama_tied_mha": ("LlamaConfig", "LlamaForCausalLM",
                       dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=500.0),
                       None),
    "llama3_rope_sharded": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(tie_word_embeddings=False, rope_theta=50000.0,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=16)),
        "60KB"),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(tie_word_embeddings=False, sliding_window=None, head_dim=24), None),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), None),
    # Sequences of 40 tokens: a window of 8 cuts most of each row's context.
    "mistral_window": ("MistralConfig", "MistralForCausalLM",
                       dict(tie_word_embeddings=False, sliding_window=8), None),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=24),
              None),
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM",
                     dict(tie_word_embeddings=False, use_sliding_window=True, sliding_window=8,
                          max_window_layers=1), None),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default",
                                                           "rope_theta": 100.0},
                                     "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                        "rope_theta": 5000.0}}), None),
}
# llama.cpp fixes Gemma 3's local rope base at 10000 and its query scale at 1/sqrt(head_dim)
# below 27B (the GGUF metadata carries neither).
CASES["gemma3_local10k"] = CASES["gemma3"][:2] + (
    {**CASES["gemma3"][2], "query_pre_attn_scalar": 32, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}}}, None)
# What each case must turn on (config fields that differ from Llama's defaults).
FAMILY = {"qwen2_tied": {"qkv_bias"}, "mistral_window": {"layer_windows"},
          "qwen3": {"qk_norm"}, "qwen2_window": {"qkv_bias", "layer_windows"},
          "gemma3": {"qk_norm", "sandwich_norms", "activation", "embed_scale", "query_scale",
                     "layer_windows", "rope_local_theta"}}


def _save(tmp_path, case):
    cfg_cls, model_cls, extra, shard = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # norms are ones and biases zeros at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    return model


def _specjax_logits(directory, tokens):
    config, params, _ = hf.load_hf(str(directory))
    model = LlamaModel(config)
    b, t = tokens.shape
    cache = model.init_cache(b, t)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = model.forward(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), positions, cache,
                        causal_mask(cache.lengths, t, t))
    return config, np.asarray(out.logits)


@pytest.mark.parametrize("case", sorted(set(CASES) - {"gemma3_local10k"}))
def test_logits_match_transformers(tmp_path, case):
    model = _save(tmp_path, case)
    if CASES[case][3]:
        assert (tmp_path / "model.safetensors.index.json").exists()
    tokens = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 40))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    config, got = _specjax_logits(tmp_path, tokens)
    assert config.tie_embeddings == model.config.tie_word_embeddings
    assert {name for name in FAMILY_OPTIONS if getattr(config, name) !=
            LlamaConfig.__dataclass_fields__[name].default} == FAMILY.get(case, set())
    assert (config.rope_scaling is not None) == (case in ("llama3_rope_sharded", "gemma3"))
    assert np.abs(ref).max() > 1.0  # weights large enough for layout mistakes to show
    assert np.abs(got - ref).max() < TOL


_GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight",
               "self_attn.o_proj.weight": "attn_output.weight",
               "self_attn.q_norm.weight": "attn_q_norm.weight",
               "self_attn.k_norm.weight": "attn_k_norm.weight"}
_GEMMA_GGUF_NAMES = {**_GGUF_NAMES, "post_attention_layernorm.weight": "post_attention_norm.weight",
                     "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                     "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}


def _llama_cpp_permute(w, n_head):
    """What llama.cpp's converter does to llama q/k rows: half-split -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _llama3_rope_factors(rope, head_dim):
    """The per-frequency divisors llama.cpp's converter writes for Llama-3 rope scaling."""
    import math
    base = rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    factors = []
    for freq in 1.0 / base:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.asarray(factors, np.float32)


def _write_gguf(path, model, arch):
    """A float32 GGUF of a transformers model, laid out as llama.cpp's converter writes it."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if "rope_theta" in c.rope_parameters:
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(c.vocab_size)
    gemma = arch == "gemma3"
    names = _GEMMA_GGUF_NAMES if gemma else _GGUF_NAMES
    if gemma:  # what llama.cpp's converter writes (its loader fixes the local rope base)
        w.add_sliding_window(c.sliding_window)
        w.add_array(f"{arch}.attention.sliding_window_pattern",
                    [t == "sliding_attention" for t in c.layer_types])
        full = c.rope_parameters["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
    scaling = c.rope_parameters
    if arch == "llama" and scaling.get("rope_type") == "llama3":  # llama.cpp: a rope_freqs tensor
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(scaling, head_dim))
    for name, t in model.state_dict().items():
        t = t.numpy()
        if gemma and name.endswith("norm.weight"):
            t = t + 1.0  # llama.cpp stores Gemma's (1 + w)
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t)
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                w.add_tensor("output.weight", t)
        else:
            _, _, layer, rest = name.split(".", 3)
            if rest.startswith("self_attn.") and rest[10] in "qkv" and rest[11:17] == "_proj.":
                part = rest[10]
                if arch == "llama" and part in "qk":
                    t = _llama_cpp_permute(t, c.num_attention_heads if part == "q"
                                           else c.num_key_value_heads)
                gguf_name = f"attn_{part}.{rest.rsplit('.', 1)[1]}"
            else:
                gguf_name = names[rest]
            w.add_tensor(f"blk.{layer}.{gguf_name}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case,arch", [("llama_untied", "llama"), ("llama_tied_mha", "llama"),
                                       ("llama3_rope_sharded", "llama"),
                                       ("qwen2_tied", "qwen2"), ("qwen3", "qwen3"),
                                       ("gemma3_local10k", "gemma3")])
def test_gguf_layout_matches_transformers(tmp_path, case, arch):
    """GGUF loader: q/k row un-permutation, tying and biases, q / k norms, Gemma's norms, window
    pattern and rope bases, against transformers' logits."""
    from models import gguf as gguf_loader
    model = _save(tmp_path, case)
    _write_gguf(tmp_path / "m.gguf", model, arch)
    config, params, tok = gguf_loader.load_gguf(str(tmp_path / "m.gguf"))
    assert tok is None  # no tokenizer metadata in this file
    assert config.tie_embeddings == model.config.tie_word_embeddings
    assert config.qkv_bias == (arch == "qwen2")
    tokens = np.random.default_rng(2).integers(0, SMALL["vocab_size"], (2, 24))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    lm = LlamaModel(config)
    cache = lm.init_cache(2, 24)
    positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    got = lm.forward(params, jnp.asarray(tokens), positions, cache,
                     causal_mask(cache.lengths, 24, 24)).logits
    if arch == "gemma3":
        assert config.layer_windows == (8, 0) and config.rope_scaling.rope_type == "linear"
    assert bool(config.rope_freq_factors) == (case == "llama3_rope_sharded")
    assert np.abs(np.asarray(got) - ref).max() < TOL


def test_config_errors():
    base = {**SMALL, "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ValueError, match="supported"):
        hf.config_from_hf({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="llama3"):
        hf.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        hf.config_from_hf({**base, "attention_bias": True})
    cfg = hf.config_from_hf({**base, "rope_scaling": {"type": "llama3", "factor": 4.0,
                                                      "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64},
                             "rope_theta": 1e4})
    assert cfg.rope_scaling.factor == 4.0 and cfg.rope_theta == 1e4


def test_missing_and_misshaped_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file
    _save(tmp_path, "llama_untied")
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path)
    with pytest.raises(hf.CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        hf.load_hf(str(tmp_path))
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, path)
    with pytest.raises(hf.CheckpointError, match="shape"):
        hf.load_hf(str(tmp_path))


def test_bfloat16_checkpoint(tmp_path):
    """bf16 safetensors (how most checkpoints ship) load exactly, upcast to float32."""
    model = _save(tmp_path, "llama_untied").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    _, params, _ = hf.load_hf(str(tmp_path))
    want = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()  # [K*D, E]
    got = params["layers"]["wk"][1]  # [E, K, D]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.reshape(got.shape[0], -1).T, want)
