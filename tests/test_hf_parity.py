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


@pytest.mark.parametrize("case", sorted(CASES))
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
               "self_attn.o_proj.weight": "attn_output.weight"}


def _llama_cpp_permute(w, n_head):
    """What llama.cpp's converter does to llama q/k rows: half-split -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


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
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(getattr(c, "head_dim", None) or
                               c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    for name, t in model.state_dict().items():
        t = t.numpy()
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
                gguf_name = _GGUF_NAMES[rest]
            w.add_tensor(f"blk.{layer}.{gguf_name}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case,arch", [("llama_untied", "llama"), ("llama_tied_mha", "llama"),
                                       ("qwen2_tied", "qwen2")])
def test_gguf_layout_matches_transformers(tmp_path, case, arch):
    """GGUF loader: q/k row un-permutation, tying and biases, against transformers' logits."""
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
