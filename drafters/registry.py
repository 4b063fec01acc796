"""Decoding methods by name: a typed, frozen options dataclass plus a build function each.

A method is registered by the drafter file that implements it, at import time::

    @dataclasses.dataclass(frozen=True)
    class PromptLookupOptions(registry.Options):
        draft_len: int = registry.option(8, "Draft tokens per branch.", minimum=1)

    def build(ctx: registry.BuildContext, options: PromptLookupOptions):
        return PromptLookupDrafter(draft_len=options.draft_len), None   # (drafter, params)

    registry.register(registry.Method(
        "prompt_lookup", PromptLookupOptions, build, "copies the continuation of an n-gram "
        "match in the prompt and the text so far", order=10))

Everything a binary needs to know about a method is here: its options (typed fields with a
default, a help text and a validity rule, which the binaries turn into flags), its tree option
and default (an option named ``tree``; ``METHOD:TREE`` names that tree), whether it needs
weights trained for the model, and how its params shard on a device mesh
(:meth:`Options.param_sharding`). Whether a drafter reads verification outputs of nodes it did
not offer is part of the drafter contract (``reads_unoffered_outputs``), not repeated here.

:func:`methods` imports every module of the ``drafters`` package once, so a new method is one
new file in ``drafters/`` (plus its tests); nothing else needs editing. ``ar`` (plain
decoding, no drafter) is registered here.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import typing
from typing import Any, Callable, Optional

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
PARAM_SHARDINGS = ("none", "replicated", "by_logical_axes", "placed_with_target")


# Options -------------------------------------------------------------------------------------


def option(default, help: str, *, choices: tuple = (), patterns: Optional[dict] = None,
           minimum: Optional[float] = None, parse: Optional[Callable[[str], Any]] = None):
    """A method option: a dataclass field with a default and its flag metadata.

    Args:
      default: the value when the user gives none (None allowed: "the drafter's own").
      help: one line for ``--help``.
      choices: the allowed values (strings), if a closed set, in the order listings show them;
        an entry named in ``patterns`` stands for every string its regex matches.
      patterns: ``{shown name: regex}``, e.g. ``{"tunedN": r"tuned[1-9][0-9]*"}``.
      minimum: the smallest allowed number.
      parse: turns the flag's text into the value (e.g. a comma-separated list of ints).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": tuple(choices), "patterns": dict(patterns or {}),
        "minimum": minimum, "parse": parse})


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every method's options: frozen, typed, validated in ``__post_init__`` with a
    ``ValueError`` that names the option and what is allowed."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            minimum = meta.get("minimum")
            if minimum is not None and value < minimum:
                raise ValueError(f"{f.name} must be >= {minimum}, got {value}")
            choices, patterns = meta.get("choices", ()), meta.get("patterns", {})
            literal = [c for c in choices if c not in patterns]
            if choices and value not in literal and not any(
                    re.fullmatch(p, str(value)) for p in patterns.values()):
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")

    def param_sharding(self) -> str:
        """How the drafter's params are placed on a mesh: ``"none"`` (no params),
        ``"replicated"`` (small heads), ``"by_logical_axes"`` (a separate model, sharded by the
        names of ``drafter.model.logical_axes()``) or ``"placed_with_target"`` (slices of the
        target's params, already placed)."""
        return "replicated"

    @classmethod
    def fields(cls) -> dict[str, "OptionInfo"]:
        """Name -> :class:`OptionInfo` of every option, in declaration order."""
        hints = typing.get_type_hints(cls)
        return {f.name: OptionInfo(f.name, hints[f.name], f.default, f.metadata.get("help", ""),
                                   f.metadata.get("choices", ()), f.metadata.get("minimum"),
                                   f.metadata.get("parse"))
                for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option as the binaries see it (its flag's type, default and help)."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple = ()
    minimum: Optional[float] = None
    parse: Optional[Callable[[str], Any]] = None

    @property
    def kind(self) -> str:
        """``int``, ``float``, ``bool`` or ``str`` (anything parsed from text)."""
        base = self.type
        if typing.get_origin(base) is typing.Union:
            base = next(a for a in typing.get_args(base) if a is not type(None))
        if self.parse is None and base in (int, float, bool):
            return base.__name__
        return "str"


def parse_ints(text: str) -> tuple[int, ...]:
    """``"1,5, 9"`` -> ``(1, 5, 9)``; ValueError naming the text otherwise."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


# Methods -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """What a build function gets besides its options.

    Attributes:
      lm: the loaded target (``models.registry.LoadedModel``: ``model``, ``params``,
        ``tokenizer``, ``name``).
      sampling: the decoding's ``SamplingConfig`` (drafters that sample use the same).
    """

    lm: Any
    sampling: Any

    @property
    def model(self):
        return self.lm.model

    @property
    def params(self):
        return self.lm.params

    @property
    def packed_weights(self) -> bool:
        """Whether the target keeps its weights packed (``--weights=gguf|gguf_a8|int8``): its
        plain step is then ~3x cheaper while a multi-token verify is not, so methods whose
        best draft size depends on that ratio take their packed-weights default."""
        from drafters import head_weights
        return head_weights.is_packed(self.model)

    def size_for_weights(self, given: Optional[int], default: int, packed: int) -> int:
        """A draft size whose best value depends on the weight format: ``given`` when the user
        set it, else ``packed`` on a packed target and ``default`` otherwise."""
        if given is not None:
            return given
        return packed if self.packed_weights else default


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered decoding method.

    Attributes:
      name: what ``--method`` / ``--methods`` call it.
      options: its :class:`Options` subclass (the defaults are the tuned ones).
      build: ``build(BuildContext, options) -> (drafter, drafter_params)``; ``(None, None)``
        for plain decoding. Raises ValueError (bad values) or a weights error with what to do.
      summary: one line for listings.
      weights: the weights file stem it needs under ``drafters/weights/<model>/`` (trained per
        model), or None when it runs on any model without training.
      order: where it appears in listings and the benchmark's default run (lower first).
      in_default_benchmark: False for methods the benchmark runs only on request.
    """

    name: str
    options: type
    build: Callable[[BuildContext, Any], tuple[Any, Any]]
    summary: str
    weights: Optional[str] = None
    order: int = 100
    in_default_benchmark: bool = True

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"method names are lower_snake_case, got {self.name!r}")
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise TypeError(f"{self.name}: options must be a subclass of registry.Options")

    @property
    def trees(self) -> tuple[tuple[str, ...], str]:
        """``(choices, default)`` of its ``tree`` option (``((), "")`` when it has none)."""
        info = self.options.fields().get("tree")
        if info is None:
            return (), ""
        return info.choices, info.default

    def has_weights(self, model_name: str) -> bool:
        """Whether it can run on ``model_name`` as shipped (no weights needed, or they exist)."""
        return self.weights is None or os.path.exists(
            os.path.join(WEIGHTS_DIR, model_name, f"{self.weights}.safetensors"))

    def make_options(self, **values) -> Options:
        """Its options with ``values`` set (ValueError for an unknown name or a bad value)."""
        known = self.options.fields()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{self.name} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(known) or 'none'}")
        return self.options(**values)


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """A method without options."""


_METHODS: dict[str, Method] = {}
_DISCOVERED = False


def register(method: Method) -> Method:
    """Adds ``method``; re-registering the same name from the same module (a reload) replaces
    it, a second module claiming a taken name is an error."""
    old = _METHODS.get(method.name)
    if old is not None and old.build.__module__ != method.build.__module__:
        raise ValueError(f"method {method.name!r} is registered twice ({old.build.__module__}, "
                         f"{method.build.__module__})")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Removes a method (one registered for a notebook session or a test); built-in methods
    come back with their module's next import only."""
    _METHODS.pop(name, None)


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    import drafters
    for info in pkgutil.iter_modules(drafters.__path__):
        importlib.import_module(f"drafters.{info.name}")
    _DISCOVERED = True


def methods() -> list[Method]:
    """Every registered method, in listing order (``ar`` first)."""
    _discover()
    return sorted(_METHODS.values(), key=lambda m: (m.order, m.name))


def names() -> list[str]:
    return [m.name for m in methods()]


def get(name: str) -> Method:
    """The method called ``name``; ValueError listing the known ones otherwise."""
    _discover()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(names())}")
    return _METHODS[name]


def build(name: str, lm, sampling=None, **options) -> tuple[Any, Any]:
    """``(drafter, drafter_params)`` of method ``name`` for the loaded target ``lm`` (notebook
    style): its options from ``options`` (the rest default), ``sampling`` the decoding's
    ``SamplingConfig`` (default greedy). ``(None, None)`` for ``ar``."""
    from specjax.sampling import SamplingConfig
    method = get(name)
    ctx = BuildContext(lm=lm, sampling=SamplingConfig() if sampling is None else sampling)
    return method.build(ctx, method.make_options(**options))


def split_name(spec: str) -> tuple[str, str]:
    """``"eagle:dynamic"`` -> ``("eagle", "dynamic")``; ``"medusa"`` -> ``("medusa", "")``: the
    ``METHOD:TREE`` shorthand for the method's ``tree`` option."""
    name, _, tree = spec.partition(":")
    return name, tree


def _build_plain(ctx: BuildContext, options: NoOptions):
    del ctx, options
    return None, None


register(Method("ar", NoOptions, _build_plain,
                "plain autoregressive decoding: the reference every method must reproduce",
                order=0))
