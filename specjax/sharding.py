"""Sharding over a device mesh: logical axis rules, param / cache / loop-state placement.

Everything is sharded by JAX's own machinery (GSPMD): parameters are placed once with
``jax.device_put`` from their logical axis names, and the jitted loops of ``specjax.decode`` and
``specjax.speculative`` take a static :class:`ShardingPlan` and pin the cache and loop state with
``jax.lax.with_sharding_constraint`` where they are created and at the end of every step or
round, so the while loop carries them in place and never moves the weights.

A user asks for a ``DATAxMODEL`` mesh (``--mesh=2x4``). MODEL is the tensor-parallel degree
(Megatron-style: column-parallel ``wq/wk/wv/w_gate/w_up/lm_head``, row-parallel ``wo/w_down``).
Because a model may have fewer kv heads than MODEL (SmolLM2: 9 heads, 3 kv heads), the mesh
built for it has three named axes, ``MODEL = model * group``:

* ``data``: batch rows (each device group decodes its own rows);
* ``model``: size ``gcd(MODEL, kv heads)``, splits the kv heads (weights and cache);
* ``group``: size ``MODEL / model``, splits the query heads that share one kv head; the cache's
  kv heads are replicated over it (each device keeps the kv heads its query heads read, so
  attention needs no communication).

When MODEL divides the kv heads, ``group`` has size 1 and this is the usual 2-D mesh.

Default rules (logical name -> mesh axes; None = replicated)::

    batch -> data        kv_heads -> model      q_heads, mlp, vocab -> (model, group)
    layers, embed, head_dim, cache_slots -> None

Fitting the rules to a model (:func:`make_plan`): MODEL must divide the query heads and the MLP
width (else ``ValueError``); the vocabulary is sharded when MODEL divides it and replicated
otherwise; the data axis must divide the batch (checked per call, ``ValueError``).

Axis glossary: B batch, L layers, K kv heads, S cache slots, D head dim, E embed, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model", "group")
MeshAxes = Optional[str | tuple[str, ...]]  # what one logical axis maps to

# Logical axes of the arrays specjax itself creates.
CACHE_AXES = P("layers", "batch", "kv_heads", "cache_slots", "head_dim")  # k, v [L, B, K, S, D]
ROWS_AXES = P("batch")  # leading axis of every per-row loop array ([B], [B, N], [B, E], ...)


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """Logical axis name -> mesh axis name, tuple of mesh axes, or None (replicated).
    Hashable, immutable.

    Attributes:
      rules: ``((logical, mesh_axes), ...)``; a logical name may appear once.
    """

    rules: tuple[tuple[str, MeshAxes], ...]

    def __post_init__(self):
        rules = tuple((str(k), v if v is None or isinstance(v, str) else tuple(v))
                      for k, v in self.rules)
        object.__setattr__(self, "rules", rules)
        seen: dict[str, MeshAxes] = {}
        for logical, mesh_axis in rules:
            if logical in seen and seen[logical] != mesh_axis:
                raise ValueError(
                    f"conflicting axis rules for {logical!r}: mapped to {seen[logical]!r} and "
                    f"{mesh_axis!r}; give each logical axis one mesh axis (or None)")
            seen[logical] = mesh_axis

    def as_dict(self) -> dict[str, MeshAxes]:
        return dict(self.rules)

    def replace(self, **updates: MeshAxes) -> "AxisRules":
        """These rules with some logical axes re-mapped (or added)."""
        merged = self.as_dict() | updates
        return AxisRules(tuple(merged.items()))

    def mesh_axis(self, logical: Optional[str]) -> MeshAxes:
        if logical is None:
            return None
        table = self.as_dict()
        if logical not in table:
            raise ValueError(f"no axis rule for logical axis {logical!r}: add one "
                             f"(rules.replace({logical}=None) replicates it)")
        return table[logical]

    def spec(self, logical: Sequence[Optional[str]]) -> P:
        """The mesh ``PartitionSpec`` of an array whose axes have these logical names.

        Raises:
          ValueError: two axes of the array map to the same mesh axis.
        """
        mesh_axes = [self.mesh_axis(name) for name in logical]
        used = [a for m in mesh_axes for a in _names(m)]
        dup = sorted({a for a in used if used.count(a) > 1})
        if dup:
            raise ValueError(
                f"logical axes {tuple(logical)} put mesh axis {dup[0]!r} on two dimensions of "
                "one array: map one of them to None or to another mesh axis")
        return P(*mesh_axes)

    def check_mesh(self, mesh: Mesh) -> None:
        unknown = sorted({a for _, m in self.rules for a in _names(m)} - set(mesh.axis_names))
        if unknown:
            raise ValueError(f"axis rules name mesh axes {unknown} that the mesh does not have "
                             f"(it has {tuple(mesh.axis_names)}): fix the rules or the mesh")


def _names(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


TENSOR_PARALLEL = ("model", "group")  # the whole MODEL degree

DEFAULT_RULES = AxisRules((
    ("batch", "data"),
    ("layers", None),
    ("embed", None),
    ("q_heads", TENSOR_PARALLEL),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", TENSOR_PARALLEL),
    ("vocab", TENSOR_PARALLEL),
    ("cache_slots", None),
))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh plus the axis rules fitted to one model: a static (hashable) jit argument.

    Build it with :func:`make_plan`; pass it as ``plan=`` to ``generate`` /
    ``speculative_generate`` (and their stream / compile variants) after placing the params
    with :meth:`shard_params`.
    """

    mesh: Mesh
    rules: AxisRules = DEFAULT_RULES

    def __post_init__(self):
        self.rules.check_mesh(self.mesh)

    @property
    def shape(self) -> tuple[int, int]:
        """``(DATA, MODEL)`` as the user asked for it (MODEL = model * group)."""
        get = lambda a: self.mesh.shape.get(a, 1)  # noqa: E731
        return (get("data"), get("model") * get("group"))

    def __str__(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}"

    # Shardings ---------------------------------------------------------------------------------

    def sharding(self, logical: Sequence[Optional[str]]) -> NamedSharding:
        return NamedSharding(self.mesh, self.rules.spec(logical))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def tree_shardings(self, logical_tree: Any) -> Any:
        """A tree of ``NamedSharding`` from a tree of logical ``PartitionSpec``s."""
        return jax.tree.map(self.sharding, logical_tree, is_leaf=lambda x: isinstance(x, P))

    # Placement (outside jit) -------------------------------------------------------------------

    def shard_params(self, params: Any, logical_tree: Any) -> Any:
        """Places ``params`` on the mesh as their logical axis names say (one ``device_put``).

        Args:
          params: arrays (host or device).
          logical_tree: the same tree with ``PartitionSpec``s of logical names as leaves
            (``LlamaModel.logical_axes()``).
        """
        return jax.device_put(params, self.tree_shardings(logical_tree))

    def abstract_params(self, shapes: Any, logical_tree: Any) -> Any:
        """``jax.ShapeDtypeStruct``s carrying the shardings: an orbax restore target."""
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes, self.tree_shardings(logical_tree))

    def replicate(self, tree: Any) -> Any:
        """Every array of ``tree`` replicated on all mesh devices (None leaves stay None)."""
        return jax.device_put(tree, self.replicated())

    def shard_rows(self, tree: Any) -> Any:
        """Every array of ``tree`` (batch-major, e.g. a ``PromptBatch``) split over ``data``."""
        self.check_batch(jax.tree.leaves(tree)[0].shape[0])
        return jax.tree.map(lambda x: jax.device_put(x, self._rows_sharding(np.ndim(x))), tree)

    def check_batch(self, batch: int) -> None:
        data = self.shape[0]
        if batch % data:
            raise ValueError(
                f"a batch of {batch} rows does not split over the mesh's data axis of size "
                f"{data}: pad the batch to a multiple of {data} rows or use a mesh whose data "
                f"axis divides {batch} (e.g. --mesh=1x{self.shape[1]})")

    # Constraints (inside jit) ------------------------------------------------------------------

    def _rows_sharding(self, ndim: int) -> NamedSharding:
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    def constrain_cache(self, cache):
        """Pins a ``KVCache``: ``k, v [L, B, K, S, D]`` as :data:`CACHE_AXES`, lengths by row."""
        kv = self.sharding(CACHE_AXES)
        return cache.replace(k=jax.lax.with_sharding_constraint(cache.k, kv),
                             v=jax.lax.with_sharding_constraint(cache.v, kv),
                             lengths=self.constrain_rows(cache.lengths))

    def constrain_rows(self, x: jax.Array) -> jax.Array:
        """Pins a batch-major array (leading axis B) to the ``data`` axis."""
        return jax.lax.with_sharding_constraint(x, self._rows_sharding(x.ndim))

    def constrain_replicated(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.replicated())


# Building a plan --------------------------------------------------------------------------------


def parse_mesh(text: str) -> tuple[int, int]:
    """``"2x4"`` -> ``(2, 4)`` (DATAxMODEL)."""
    parts = text.lower().strip().split("x")
    try:
        data, model = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"mesh {text!r} is not DATAxMODEL (two positive integers, e.g. 2x4: "
                         "2-way data parallel, 4-way tensor parallel)") from None
    if data < 1 or model < 1:
        raise ValueError(f"mesh {text!r}: both sizes must be >= 1 (e.g. 1x8)")
    return data, model


def make_mesh(data: int, model: int, num_kv_heads: Optional[int] = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``(data, model, group)`` mesh for a DATAxMODEL request over the first ``data * model``
    of ``devices`` (default: all of ``jax.devices()``, every host's under ``jax.distributed``):
    ``model = gcd(MODEL, num_kv_heads)`` (MODEL when None), ``group = MODEL / model``."""
    devices = list(jax.devices() if devices is None else devices)
    need = data * model
    if need > len(devices):
        raise ValueError(
            f"mesh {data}x{model} needs {need} devices but only {len(devices)} are available: "
            f"use a mesh with DATA*MODEL <= {len(devices)} (e.g. 1x{len(devices)}), or run on "
            "more devices (all hosts of a pod slice, with jax.distributed initialised)")
    kv = model if num_kv_heads is None else math.gcd(model, num_kv_heads)
    shape = (data, kv, model // kv)
    auto = (jax.sharding.AxisType.Auto,) * 3
    if need == len(devices):  # topology-aware device order (TPU)
        return jax.make_mesh(shape, MESH_AXES, auto, devices=devices)
    return Mesh(np.asarray(devices[:need]).reshape(shape), MESH_AXES, axis_types=auto)


def fit_rules(model: int, *, num_heads: int, num_kv_heads: int, mlp_width: int,
              vocab_size: int, rules: AxisRules = DEFAULT_RULES) -> AxisRules:
    """``rules`` adjusted to a model's sizes on a model axis of size ``model`` (see the module
    docstring); ``ValueError`` saying what to do when the model cannot be split that way."""
    if model == 1:
        return rules
    if num_heads % model:
        raise ValueError(
            f"the model axis ({model}) does not divide the {num_heads} query heads: use a "
            f"model axis that divides {num_heads} ({_divisors(num_heads)}), e.g. "
            f"--mesh={model}x1 for data parallelism only")
    if mlp_width % model:
        raise ValueError(f"the model axis ({model}) does not divide the MLP width {mlp_width}: "
                         f"use a model axis that divides it ({_divisors(mlp_width)})")
    del num_kv_heads  # any count fits: the mesh's model axis is gcd(MODEL, kv heads)
    if rules.as_dict().get("vocab") is not None and vocab_size % model:
        rules = rules.replace(vocab=None)  # an odd vocabulary: replicate embedding / LM head
    return rules


def make_plan(data: int, model: int, *, num_heads: int, num_kv_heads: int, mlp_width: int,
              vocab_size: int, rules: AxisRules = DEFAULT_RULES,
              devices: Optional[Sequence[Any]] = None) -> ShardingPlan:
    """A validated :class:`ShardingPlan` for a ``data x model`` mesh and a model of these sizes.

    Raises:
      ValueError: more devices than exist, or a model axis that does not fit the model.
    """
    mesh = make_mesh(data, model, num_kv_heads, devices)
    return ShardingPlan(mesh, fit_rules(model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                        mlp_width=mlp_width, vocab_size=vocab_size, rules=rules))


def plan_for_config(data: int, model: int, config: Any, **kwargs) -> ShardingPlan:
    """:func:`make_plan` with the sizes read from a model config (``num_heads``,
    ``num_kv_heads``, ``intermediate_size``, ``vocab_size``, as ``LlamaConfig`` has)."""
    return make_plan(data, model, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                     mlp_width=config.intermediate_size, vocab_size=config.vocab_size, **kwargs)


def default_mesh_shape(config: Any, num_devices: Optional[int] = None) -> tuple[int, int]:
    """All devices on the model axis when that fits the model, otherwise one device."""
    n = len(jax.devices()) if num_devices is None else num_devices
    try:
        fit_rules(n, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                  mlp_width=config.intermediate_size, vocab_size=config.vocab_size)
    except ValueError:
        return (1, 1)
    return (1, n)


def shard_drafter_params(plan: ShardingPlan, params: Any,
                         logical_tree: Optional[Any] = None) -> Any:
    """Places a drafter's params (once, before decoding). None (no params) stays None.

    With ``logical_tree`` (a draft LM's ``logical_axes()``): by the plan's rules, except that a
    dimension the mesh axes do not divide (a draft model with other head counts than the
    target) is replicated. Without (draft heads, small next to the target): replicated.
    """
    if params is None:
        return None
    if logical_tree is None:
        return plan.replicate(params)
    sizes = dict(plan.mesh.shape)

    def place(x, logical):
        spec = plan.rules.spec(logical)
        fitted = [axes if x.shape[i] % int(np.prod([sizes[a] for a in _names(axes)])) == 0
                  else None for i, axes in enumerate(tuple(spec)[:np.ndim(x)])]
        return jax.device_put(x, NamedSharding(plan.mesh, P(*fitted)))

    return jax.tree.map(place, params, logical_tree)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
