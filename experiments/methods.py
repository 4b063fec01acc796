"""A configured decoding run for the experiment binaries: method, model, settings, timing.

A :class:`Run` is one registered method (``drafters.registry``) with its options, the model to
load and the decoding settings. :func:`build_run` makes it from the flags, the same way in
every binary (``generate``, ``demo``, ``benchmark``, ``benchmark_batch``, ``tune_tree``), so
they cannot drift apart. Decoding goes through :class:`specjax.engine.Engine`, one API for
plain and speculative decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax

from drafters import registry
from experiments import method_flags
from experiments.common import UserError
from specjax import decode, engine, memory, speculative
from specjax.sampling import SamplingConfig


@dataclasses.dataclass
class Result:
    """Generated ids per prompt plus timing and on-device statistics."""

    generation: engine.Generation
    compile_s: float
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def generated(self) -> list[list[int]]:
        return self.generation.tokens

    @property
    def wall_s(self) -> float:
        return self.generation.wall_s

    def summary(self) -> dict:
        g = self.generation
        stats = g.stats.as_dict()
        out = {"new_tokens": g.new_tokens, "target_calls": g.stats.target_calls,
               "tau": g.tau, "wall_s": g.wall_s,
               "tokens_per_s": g.new_tokens / g.wall_s if g.wall_s else 0.0,
               "compile_s": self.compile_s}
        if g.stats.accepted_at_depth:  # a speculative run
            out |= {k: stats[k] for k in ("rounds", "drafted", "accepted", "acceptance_rate",
                                         "accept_rate_by_depth")}
        return out | self.extra

    @staticmethod
    def row_stats(gen: Sequence[int]) -> dict:
        return {"new_tokens": len(gen)}


@dataclasses.dataclass(frozen=True)
class Run:
    """One configured decoding method.

    Attributes:
      method: a registered method name.
      model_name: registry name, HF directory or ``.gguf`` file.
      config: decoding settings (``eos_ids`` are filled from the tokenizer by
        :meth:`config_for`).
      options: the method's options (None: its defaults).
      spec: acceptance settings.
      seed: PRNG seed of the run.
      adaptive_draft: ``"off"`` or ``"acceptance"`` (wraps the drafter, lossless).
      max_draft_len: with ``adaptive_draft``, the cap on the drafted depth (None: the
        drafter's tree depth; larger values are cut to it).
      attention_impl, dtype, scan_layers, weights: how the model is built
        (``models.registry.load``).
      plan: a ``ShardingPlan`` (params already placed) or None.
    """

    method: str
    model_name: str = "smollm2-135m"
    config: decode.DecodeConfig = decode.DecodeConfig(max_new_tokens=128)
    options: Optional[registry.Options] = None
    spec: speculative.SpecConfig = speculative.SpecConfig()
    seed: int = 0
    adaptive_draft: str = "off"
    max_draft_len: Optional[int] = None
    attention_impl: str = "xla"
    dtype: str = "float32"
    scan_layers: bool = True
    weights: str = "float32"
    plan: Optional[Any] = None

    def __post_init__(self):
        spec = registry.get(self.method)  # ValueError for an unknown name
        if self.options is None:
            object.__setattr__(self, "options", spec.options())
        elif not isinstance(self.options, spec.options):
            raise ValueError(f"{self.method} takes {spec.options.__name__}, got "
                             f"{type(self.options).__name__}")

    @property
    def registered(self) -> registry.Method:
        return registry.get(self.method)

    def load(self):
        from models import registry as models
        return models.load(self.model_name, dtype=self.dtype, attention_impl=self.attention_impl,
                           scan_layers=self.scan_layers, weights=self.weights)

    def config_for(self, loaded) -> decode.DecodeConfig:
        eos = loaded.tokenizer.eos_ids if loaded.tokenizer is not None else ()
        return dataclasses.replace(self.config, eos_ids=tuple(eos))

    def drafter(self, loaded):
        """``(drafter, drafter_params)`` (``(None, None)`` for ``ar``), wrapped for adaptive
        draft length if asked, its params placed on the plan's mesh as the method declares."""
        ctx = registry.BuildContext(lm=loaded, sampling=self.config.sampling)
        try:
            drafter, dparams = self.registered.build(ctx, self.options)
        except ValueError as e:  # name the flags that led to it (e.g. --tree=tuned999)
            raise UserError(f"{self.flags_text()}: {e}") from None
        if drafter is None:
            return None, None
        if self.adaptive_draft != "off":
            from specjax.adaptive import AdaptiveDraftLength
            cap = None if self.max_draft_len is None else min(self.max_draft_len,
                                                              drafter.tree.max_depth)
            drafter = AdaptiveDraftLength(drafter, policy=self.adaptive_draft,
                                          max_draft_len=cap)
        return drafter, self._place(drafter, dparams)

    def flags_text(self) -> str:
        """``--method=NAME`` and the options that differ from the method's defaults, as flags."""
        default = self.registered.options()
        text = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
        given = [f"--{f.name}={text(getattr(self.options, f.name))}"
                 for f in dataclasses.fields(self.options)
                 if getattr(self.options, f.name) != getattr(default, f.name)]
        return " ".join([f"--method={self.method}"] + given)

    def _place(self, drafter, dparams):
        how = self.options.param_sharding()
        if self.plan is None or dparams is None or how in ("none", "placed_with_target"):
            return dparams
        from specjax import sharding
        if how == "by_logical_axes":
            return sharding.shard_drafter_params(self.plan, dparams,
                                                 drafter.model.logical_axes())
        return sharding.shard_drafter_params(self.plan, dparams)

    def engine(self, loaded, drafter) -> engine.Engine:
        """The :class:`~specjax.engine.Engine` of ``drafter`` (from :meth:`drafter`)."""
        return engine.Engine(loaded.model, self.config_for(loaded), drafter, self.spec,
                             self.plan)

    def generate(self, loaded, prompts: Sequence[Sequence[int]], drafter=None) -> Result:
        """Runs the prompts in on-device loops; ``wall_s`` excludes compilation.

        All prompts form one batch when its buffers fit the free device memory; otherwise they
        run in batches of the rows that fit (:func:`specjax.memory.rows_that_fit`), longest
        prompts first (each batch then pads little), and the results come back in prompt
        order. Batch ``i`` samples with ``fold_in(key, i)``. ``drafter``: ``(drafter, params)``
        instead of :meth:`drafter`'s.
        """
        drafter, dparams = drafter if drafter is not None else self.drafter(loaded)
        eng = self.engine(loaded, drafter)
        key = jax.random.key(self.seed)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        longest_first = [prompts[i] for i in order]
        try:  # one batch when it fits (the common case: compiled once)
            compiled = eng.compile(loaded.params, dparams, prompts, key)
            return Result(compiled.run(), compiled.compile_s)
        except memory.MemoryBudgetError:
            if len(prompts) == 1 or self.plan is not None:
                raise
        rows = memory.rows_that_fit(
            lambda b: eng.required_bytes(loaded.params, dparams, longest_first[:b]), len(prompts))
        tokens, stats, wall, compile_s = [None] * len(prompts), None, 0.0, 0.0
        for n, start in enumerate(range(0, len(prompts), rows)):
            part = order[start:start + rows]
            compiled = eng.compile(loaded.params, dparams, [prompts[i] for i in part],
                                   jax.random.fold_in(key, n))
            gen = compiled.run()
            for i, row in zip(part, gen.tokens):
                tokens[i] = row
            stats = gen.stats if stats is None else stats + gen.stats
            wall, compile_s = wall + gen.wall_s, compile_s + compiled.compile_s
        return Result(engine.Generation(tokens, stats, wall), compile_s,
                      {"batches": -(-len(prompts) // rows), "rows_per_batch": rows})

    def stream(self, loaded, prompts, on_tokens: Callable[[list[int]], None]) -> Result:
        """Python-driven steps / rounds; ``on_tokens`` gets row 0's tokens so far after each."""
        drafter, dparams = self.drafter(loaded)
        gen = first = None
        for gen in self.engine(loaded, drafter).stream(loaded.params, dparams, prompts,
                                                       jax.random.key(self.seed)):
            first = first if first is not None else gen.wall_s
            on_tokens(gen.tokens[0])
        gen.wall_s -= first
        return Result(gen, first, {"loop": "python",
                                   "note": "wall_s excludes the first (compiling) call"})


def build_run(FLAGS, name: Optional[str] = None, *, check: bool = True) -> Run:
    """Validates the flags and builds the run of ``name`` (``METHOD`` or ``METHOD:TREE``;
    default ``--method``) before any slow model load. ``check``: also reject option flags the
    method does not have (single-method binaries; the benchmarks check the whole list with
    :func:`method_flags.check_applicable`)."""
    method_name, tree = registry.split_name(FLAGS.method if name is None else name)
    try:
        method = registry.get(method_name)
    except ValueError as e:
        raise UserError(f"--method: {e}") from None
    if check:
        method_flags.check_applicable([method], FLAGS)
    options = method_flags.options_for(method, FLAGS, tree)
    try:
        sampling = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                  top_p=FLAGS.top_p, min_p=FLAGS.min_p) \
            if "temperature" in FLAGS else SamplingConfig()
        config = decode.DecodeConfig(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling)
        spec = speculative.SpecConfig(acceptance=FLAGS.acceptance, topk_k=FLAGS.topk_k,
                                      max_distance=FLAGS.max_distance)
    except ValueError as e:
        raise UserError(str(e)) from e
    return Run(method=method_name, model_name=FLAGS.model, config=config, options=options,
               spec=spec, seed=FLAGS.seed if "seed" in FLAGS else 0,
               adaptive_draft="off" if method_name == "ar" else FLAGS.adaptive_draft,
               attention_impl=FLAGS.attention, dtype=FLAGS.dtype, weights=FLAGS.weights,
               scan_layers=FLAGS.scan_layers if "scan_layers" in FLAGS else True)


def tree_for(method: str, tree: str, given: bool) -> str:
    """The tree ``method`` runs: its default unless ``given``; UserError when ``method`` has
    no tree option or ``tree`` is not one of its choices."""
    m = registry.get(method)
    choices, default = m.trees
    if not choices:
        raise UserError(f"{method} has no tree option")
    if not given:
        return default
    try:
        return m.make_options(tree=tree).tree
    except ValueError as e:
        why = "" if str(e).startswith("tree must be one of") else f": {e}"
        raise UserError(f"--tree must be one of {', '.join(choices)} for {method}, got "
                        f"{tree!r}{why}") from None
