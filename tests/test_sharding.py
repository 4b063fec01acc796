"""Sharding: axis rules and mesh validation here (one device); exact sharded decoding on 8 fake
CPU devices in a separate process (``tests/multidevice_sharding.py``), so that every other test
keeps its single device."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from specjax import sharding
from specjax.sharding import AxisRules, DEFAULT_RULES

_TESTS = os.path.dirname(os.path.abspath(__file__))


def test_multidevice_sharded_decoding_in_own_process():
    env = dict(os.environ)
    # Fake devices, plus cheaper XLA:CPU code generation (compilation dominates these tests;
    # the single-device references are computed in the same process with the same flags).
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(_TESTS, "multidevice_sharding.py")],
        cwd=os.path.dirname(_TESTS), env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


def test_rules_map_logical_names_to_mesh_axes():
    assert DEFAULT_RULES.spec(("layers", "embed", "q_heads", "head_dim")) == \
        P(None, None, ("model", "group"), None)
    assert DEFAULT_RULES.spec(("layers", "batch", "kv_heads", "cache_slots", "head_dim")) == \
        P(None, "data", "model", None, None)
    assert DEFAULT_RULES.spec((None, "batch")) == P(None, "data")
    assert DEFAULT_RULES.replace(vocab=None).spec(("vocab", "embed")) == P(None, None)


def test_rules_reject_conflicts_and_unknown_names():
    with pytest.raises(ValueError, match="conflicting axis rules for 'batch'"):
        AxisRules((("batch", "data"), ("batch", "model")))
    AxisRules((("batch", "data"), ("batch", "data")))  # a repeat that agrees is fine
    with pytest.raises(ValueError, match="mesh axis 'model' on two dimensions"):
        DEFAULT_RULES.spec(("q_heads", "kv_heads"))  # ('model', 'group') and 'model'
    with pytest.raises(ValueError, match="mesh axis 'data' on two dimensions"):
        AxisRules((("a", "data"), ("b", ("data", "model")))).spec(("a", "b"))
    with pytest.raises(ValueError, match="no axis rule for logical axis 'experts'"):
        DEFAULT_RULES.spec(("experts",))
    mesh = sharding.make_mesh(1, 1)
    with pytest.raises(ValueError, match=r"mesh axes \['tensor'\] that the mesh does not have"):
        sharding.ShardingPlan(mesh, DEFAULT_RULES.replace(mlp="tensor"))


@pytest.mark.parametrize("text, want", [("2x4", (2, 4)), ("1X8", (1, 8)), (" 8x1 ", (8, 1))])
def test_parse_mesh(text, want):
    assert sharding.parse_mesh(text) == want


@pytest.mark.parametrize("text", ["8", "2x", "x4", "2x4x1", "axb", "0x8", "2x-1"])
def test_parse_mesh_rejects_bad_text(text):
    with pytest.raises(ValueError, match="mesh"):
        sharding.parse_mesh(text)


def test_validation_errors_say_what_to_do():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"needs {2 * n} devices but only {n} are available"):
        sharding.make_mesh(2, n)
    with pytest.raises(ValueError, match=r"does not divide the 9 query heads: use a model axis "
                                         r"that divides 9 \(1, 3, 9\)"):
        sharding.fit_rules(2, num_heads=9, num_kv_heads=3, mlp_width=8, vocab_size=8)
    with pytest.raises(ValueError, match="does not divide the MLP width 10"):
        sharding.fit_rules(3, num_heads=9, num_kv_heads=3, mlp_width=10, vocab_size=9)
    assert sharding.fit_rules(3, num_heads=9, num_kv_heads=3, mlp_width=9,
                              vocab_size=10).as_dict()["vocab"] is None


def test_default_mesh_shape_uses_all_devices_when_they_fit():
    from tinymodels import tiny_config
    assert sharding.default_mesh_shape(tiny_config("llama"), num_devices=4) == (1, 4)
    assert sharding.default_mesh_shape(tiny_config("llama"), num_devices=8) == (1, 1)  # 4 heads
    assert sharding.default_mesh_shape(tiny_config("gqa"), num_devices=2) == (1, 2)


def test_plan_is_a_hashable_static_argument():
    a = sharding.make_plan(1, 1, num_heads=4, num_kv_heads=2, mlp_width=8, vocab_size=8)
    b = sharding.make_plan(1, 1, num_heads=4, num_kv_heads=2, mlp_width=8, vocab_size=8)
    assert hash(a) == hash(b) and a == b and str(a) == "1x1"


def test_cli_mesh_helpers_explain_bad_input():
    from experiments import common
    from tinymodels import tiny_config
    config = tiny_config("llama")
    assert common.mesh_plan("auto", config) is None  # one device here: the unsharded path
    assert common.mesh_plan("1x1", config) is None
    n = len(jax.devices())
    with pytest.raises(common.UserError, match=f"--mesh=2x{4 * n}: mesh 2x{4 * n} needs"):
        common.mesh_plan(f"2x{4 * n}", config)
    with pytest.raises(common.UserError, match="--mesh=two: mesh 'two' is not DATAxMODEL"):
        common.mesh_plan("two", config)


@pytest.mark.parametrize("env, multi", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
])
def test_multi_process_environment_detection(env, multi):
    from experiments import common
    assert common.multi_process_env(env) is multi
    assert common.init_distributed("off") is False  # never initialises when told not to
