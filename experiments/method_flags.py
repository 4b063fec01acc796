"""Command-line flags for the registered decoding methods (``drafters.registry``).

Every binary that decodes gets the same flags from :func:`define_flags`:

* ``--method`` (or ``--methods`` for the benchmarks) and one flag per method option, generated
  from the options dataclasses: an option shared by several methods (``--draft_len``,
  ``--tree``, ``--window``) is one flag whose help lists each method's default. A flag that no
  chosen method has is an error (:func:`options_for` / :func:`check_applicable`), never silently
  ignored.
* the run settings every method shares: ``--acceptance`` (with ``--topk_k`` /
  ``--max_distance``, which only apply to their rule), ``--adaptive_draft``, ``--attention``
  and ``--dtype``.

``python -m experiments.generate --help`` lists every method with its options.
"""

from __future__ import annotations

import collections

from absl import flags

from drafters import registry
from experiments.common import UserError
from specjax import speculative

ADAPTIVE_DRAFT = ("off", "acceptance")
ATTENTION = ("xla", "pallas", "auto")
# Flags of the run (not of a method): an option may not reuse these names.
RUN_FLAGS = ("method", "methods", "acceptance", "topk_k", "max_distance", "adaptive_draft",
             "attention", "dtype", "model", "max_new_tokens", "temperature", "top_k", "top_p",
             "min_p", "seed", "mesh", "distributed")


def _owners() -> dict[str, list[tuple[registry.Method, registry.OptionInfo]]]:
    """Option name -> the methods that have it (listing order), checked for one type each."""
    owners = collections.OrderedDict()
    for method in registry.methods():
        for name, info in method.options.fields().items():
            if name in RUN_FLAGS:
                raise TypeError(f"method {method.name!r}: option {name!r} would shadow the run "
                                "flag of that name; rename the option")
            owners.setdefault(name, []).append((method, info))
    for name, uses in owners.items():
        kinds = {info.kind for _, info in uses}
        if len(kinds) > 1:
            raise TypeError(f"option {name!r} has different types in "
                            f"{', '.join(m.name for m, _ in uses)}: {sorted(kinds)}")
    return owners


def _value_help(info: registry.OptionInfo) -> str:
    text = f"default {info.default!r}" if info.default is not None else "default: the drafter's"
    return text + (f", one of {'|'.join(info.choices)}" if info.choices else "")


def method_help() -> str:
    """The ``--method`` help: every method, its summary and its options."""
    lines = []
    for m in registry.methods():
        opts = ", ".join(f"--{n}" for n in m.options.fields()) or "no options"
        need = f" [trained weights: {m.weights}]" if m.weights else ""
        lines.append(f"{m.name}: {m.summary}{need} ({opts})")
    return "Decoding method. " + "; ".join(lines) + "."


def define_flags(multi: bool = False, default_method: str = "ar", selector: bool = True,
                 fv: flags.FlagValues = flags.FLAGS) -> None:
    """Defines ``--method`` (or ``--methods`` when ``multi``; neither without ``selector``, for
    a binary with its own), every method option and the run flags in ``fv``. Call once per
    binary, then ``flags.adopt_module_key_flags(method_flags, fv)`` so that ``--help`` lists
    them."""
    if selector and multi:
        flags.DEFINE_list("methods", None, "Methods to compare with ar (which always runs "
                          "first), each METHOD or METHOD:TREE (e.g. eagle:dynamic); default: "
                          "every method that runs on the model. " + method_help(),
                          flag_values=fv)
    elif selector:
        flags.DEFINE_string("method", default_method, method_help(), flag_values=fv)
    for name, uses in _owners().items():
        first = uses[0][1]
        if len({i.help for _, i in uses}) == 1:
            help_text = (f"[{', '.join(m.name for m, _ in uses)}] {first.help} "
                         + "; ".join(f"{m.name}: {_value_help(i)}" for m, i in uses) + ".")
        else:
            help_text = " ".join(f"[{m.name}] {i.help} ({_value_help(i)})." for m, i in uses)
        define = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float,
                  "bool": flags.DEFINE_bool, "str": flags.DEFINE_string}[first.kind]
        define(name, None, help_text, flag_values=fv)
    flags.DEFINE_enum("acceptance", "auto", list(speculative.ACCEPTANCE_RULES),
                      "auto = lossless. LOSSY rules (the output is NOT the target's): "
                      "typical_lossy = Medusa typical acceptance; topk_lossy / distance_lossy = "
                      "blockwise parallel decoding's relaxed criteria (see --topk_k, "
                      "--max_distance).", flag_values=fv)
    flags.DEFINE_integer("topk_k", 2, "--acceptance=topk_lossy: a draft passes when it is among "
                         "the target's k best tokens.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_distance", 1, "--acceptance=distance_lossy: a draft passes when its "
                         "id is within this distance of the target's argmax (ordinal "
                         "vocabularies only).", lower_bound=0, flag_values=fv)
    flags.DEFINE_enum("adaptive_draft", "off", list(ADAPTIVE_DRAFT),
                      "Adaptive draft length (lossless, specjax/adaptive.py), for any method but "
                      "ar: off, or acceptance = per-row length grown while drafts are accepted "
                      "and cut back after a rejection.", flag_values=fv)
    define_model_flags(fv)


def define_model_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """``--attention``, ``--dtype`` and ``--weights`` in ``fv``: how the target model is built
    (every binary that loads one, decoding or not: load it with :func:`load_model`)."""
    flags.DEFINE_enum("attention", "xla", list(ATTENTION),
                      "Attention in decode steps and verification: xla, pallas (the Pallas "
                      "tree-attention kernel; interpreted, slow, on CPU) or auto (the kernel on "
                      "GPU / TPU, xla elsewhere).", flag_values=fv)
    from models.registry import DTYPES  # what the loaders build
    flags.DEFINE_enum("dtype", "float32", list(DTYPES),
                      "Weights, activations and cache: float32 (the default; fastest on CPU) or "
                      "bfloat16 (the choice on GPU / TPU; 16-bit on CPU is several times "
                      "slower in XLA:CPU). Logits and sampling stay float32.", flag_values=fv)
    from models.packing import WEIGHTS
    flags.DEFINE_enum("weights", "float32", list(WEIGHTS),
                      "How the target's linear layers are stored: float32 (float arrays in "
                      "--dtype), gguf (the GGUF file's own 4/8-bit blocks, read by specjax's C++ "
                      "kernel on CPU: the fastest on CPU), gguf_a8 (those blocks with the "
                      "activations rounded to 8 bits per block, llama.cpp's arithmetic: another "
                      "model) or int8 (per-channel int8). The output is the target's with THOSE "
                      "weights (gguf: the same numbers as float32).",
                      flag_values=fv)


def model_config(FLAGS, name=None):
    """The architecture of ``--model`` (or ``name``), read without its weights, so that flags
    are checked against it before the slow load (the mesh, ``--max_new_tokens`` against the
    context)."""
    from models import registry as models
    name = FLAGS.model if name is None else name
    if "weights" in FLAGS:
        try:  # builds the CPU kernel for gguf / int8 now: a missing compiler fails early
            models.check_weights(FLAGS.weights, name)
        except ValueError as e:
            raise UserError(f"--weights: {e}") from None
    config = models.config_of(name)
    limit = config.max_position_embeddings
    if "max_new_tokens" in FLAGS and FLAGS.max_new_tokens >= limit:
        raise UserError(f"--max_new_tokens={FLAGS.max_new_tokens} leaves no room for a prompt in "
                        f"the model's context of {limit} tokens: use at most {limit - 1}")
    return config


def load_model(FLAGS, name=None):
    """The model of ``--model`` (or ``name``) built as ``--dtype`` / ``--attention`` (and
    ``--scan_layers`` where a binary has it) say: how every binary loads its target."""
    from models import registry as models
    return models.load(FLAGS.model if name is None else name, dtype=FLAGS.dtype,
                       attention_impl=FLAGS.attention,
                       scan_layers=FLAGS.scan_layers if "scan_layers" in FLAGS else True,
                       weights=FLAGS.weights)


def _parse(info: registry.OptionInfo, value):
    if value is None or info.parse is None or not isinstance(value, str):
        return value
    try:
        return info.parse(value)
    except ValueError as e:
        raise UserError(f"--{info.name}: {e}") from None


def options_for(method: registry.Method, FLAGS, tree: str = "") -> registry.Options:
    """``method``'s options from the flags given on the command line (the rest keep their
    defaults) and a ``METHOD:TREE`` suffix; UserError for a flag the method does not have
    (single-method binaries) or a bad value."""
    values = {}
    for name, info in method.options.fields().items():
        if FLAGS[name].present:
            values[name] = _parse(info, FLAGS[name].value)
    if tree:
        if "tree" not in method.options.fields():
            raise UserError(f"{method.name}:{tree}: {method.name} has no tree option")
        values["tree"] = tree
    try:
        return method.make_options(**values)
    except ValueError as e:
        raise UserError(f"--method={method.name}: --{e}") from None


def check_applicable(chosen: list[registry.Method], FLAGS) -> None:
    """UserError naming any option flag given on the command line that none of ``chosen``
    has (so it would be silently ignored), and lossy-rule parameters without their rule."""
    names = [m.name for m in chosen]
    for name, uses in _owners().items():
        if FLAGS[name].present and not any(m in chosen for m, _ in uses):
            raise UserError(f"--{name} does not apply to {', '.join(names)}: it is an option "
                            f"of {', '.join(m.name for m, _ in uses)}")
    for flag, rule in (("topk_k", "topk_lossy"), ("max_distance", "distance_lossy")):
        if FLAGS[flag].present and FLAGS.acceptance != rule:
            raise UserError(f"--{flag} applies to --acceptance={rule} only")
    if FLAGS.adaptive_draft != "off" and names == ["ar"]:
        raise UserError("--adaptive_draft applies to speculative methods, not ar")
