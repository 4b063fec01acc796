"""Decoding methods by name, for the experiment binaries: flags, validation and timed runs.

A :class:`Run` loads the model, builds the method's drafter, generates on the device (timed
after an ahead-of-time compile) or streams from a Python-driven step loop. Every method in
``METHODS`` is selectable with ``--method`` and runs on the embedded model with no other flags.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from absl import flags

from experiments.common import UserError
from specjax import decode, speculative
from specjax.prompts import make_prompt_batch
from specjax.sampling import SamplingConfig

# Defaults per method, chosen on SmolLM2-135M on the 2-core CPU (see WORKSPACE.md).
METHODS = {
    "ar": {},
    "prompt_lookup": {"draft_len": 8},
    "draft_model": {"draft_len": 2},
    "layer_skip": {"draft_len": 2},
    "jacobi": {},
    "sjd": {},
    "lookahead": {},
    "blockwise": {"draft_len": 4},
    "medusa": {},
    "hydra": {},
    "eagle": {},
}
DEFAULT_DRAFT_LAYERS = 4
ADAPTIVE_DRAFT = ("off", "acceptance")
# Drafters that read the verification outputs of nodes they did not offer: the adaptive wrapper
# must not narrow their verification forward.
READS_ALL_VERIFY_OUTPUTS = ("jacobi", "sjd", "lookahead")
HEAD_METHODS = ("blockwise", "medusa", "hydra", "eagle")  # trained, with shipped weights
TREE_CHOICES = {"prompt_lookup": ("chain", "tree"),
                "eagle": ("static", "dynamic", "tunedN", "generic"),
                "medusa": ("tuned", "tunedN", "generic"), "hydra": ("tuned", "tunedN", "generic")}
DEFAULT_TREE = {"prompt_lookup": "chain", "eagle": "static", "medusa": "tuned", "hydra": "tuned"}


def has_weights(method: str, model_name: str) -> bool:
    """Whether ``method`` can run on ``model_name`` without training (heads need shipped
    weights, trained per model; every other method always can)."""
    if method not in HEAD_METHODS:
        return True
    import os
    from drafters import head_weights
    return os.path.exists(head_weights.shipped_path(method, model_name))


def define_flags() -> None:
    flags.DEFINE_string("method", "ar", f"Decoding method, one of {', '.join(METHODS)}.")
    flags.DEFINE_integer("draft_len", 0, "Draft tokens per round (0 = the method's default).",
                         lower_bound=0)
    flags.DEFINE_string("draft_model", None,
                        "draft_model: registry name / checkpoint path of the draft model; by "
                        f"default the target's first {DEFAULT_DRAFT_LAYERS} layers "
                        "(--draft_layers).")
    flags.DEFINE_integer("draft_layers", DEFAULT_DRAFT_LAYERS,
                         "draft_model without --draft_model: how many of the target's first "
                         "layers form the draft model.", lower_bound=1)
    flags.DEFINE_string("skip_layers", None,
                        "layer_skip: comma-separated layers to skip while drafting (default: "
                        "a tuned set, see drafters/layer_skip.py).")
    flags.DEFINE_string("tree", "chain", "prompt_lookup: 'chain' (one continuation) or 'tree' "
                        "(--num_branches continuations verified together); eagle: 'static' "
                        "(EAGLE-1 tree tuned for the shipped layer, the default), 'tunedN' "
                        "(its best N-node tree), 'generic' (untuned) or 'dynamic' (EAGLE-2); "
                        "medusa, hydra: 'tuned' (the tree tuned for the shipped heads, the "
                        "default), 'tunedN' (its best N-node tree, e.g. tuned16) or 'generic'.")
    flags.DEFINE_integer("num_branches", 3, "prompt_lookup with --tree=tree: branches.",
                         lower_bound=1)
    flags.DEFINE_integer("window", 0, "jacobi/sjd: guessed tokens; lookahead: W columns "
                         "(0 = the method's default).", lower_bound=0)
    flags.DEFINE_integer("ngram", 0, "lookahead: n-gram size N (0 = default).", lower_bound=0)
    flags.DEFINE_integer("guess_set", -1, "lookahead: candidate n-grams verified per round G "
                         "(-1 = default).", lower_bound=-1)
    flags.DEFINE_string("jacobi_init", "repeat", "jacobi/sjd: fresh guesses: repeat, random or "
                        "prompt_lookup.")
    flags.DEFINE_enum("acceptance", "auto", list(speculative.ACCEPTANCE_RULES),
                      "auto = lossless. LOSSY rules (the output is NOT the target's): "
                      "typical_lossy = Medusa typical acceptance; topk_lossy / distance_lossy = "
                      "blockwise parallel decoding's relaxed criteria (see --topk_k, "
                      "--max_distance).")
    flags.DEFINE_integer("topk_k", 2, "--acceptance=topk_lossy: a draft passes when it is among "
                         "the target's k best tokens.", lower_bound=1)
    flags.DEFINE_integer("max_distance", 1, "--acceptance=distance_lossy: a draft passes when its "
                         "id is within this distance of the target's argmax (ordinal "
                         "vocabularies only).", lower_bound=0)
    flags.DEFINE_enum("attention", "xla", ["xla", "pallas", "auto"],
                      "Attention in decode steps and verification: xla, pallas (the Pallas "
                      "tree-attention kernel; interpreted, slow, on CPU) or auto (the kernel on "
                      "GPU / TPU, xla elsewhere).")
    flags.DEFINE_enum("adaptive_draft", "off", list(ADAPTIVE_DRAFT),
                      "Adaptive draft length (lossless, specjax/adaptive.py): off, or "
                      "acceptance = per-row length grown while drafts are accepted and cut back "
                      "after a rejection, capped at --draft_len.")


def spec_config(FLAGS) -> "speculative.SpecConfig":
    """The :class:`SpecConfig` the method flags ask for (raises ValueError on bad values)."""
    return speculative.SpecConfig(acceptance=FLAGS.acceptance, topk_k=FLAGS.topk_k,
                                  max_distance=FLAGS.max_distance)


@dataclasses.dataclass
class Result:
    """Generated ids per prompt plus timing and on-device statistics."""

    generated: list[list[int]]
    target_calls: int
    row_calls: int
    wall_s: float
    compile_s: float
    extra: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        new = sum(len(g) for g in self.generated)
        return {"new_tokens": new, "target_calls": self.target_calls,
                "tau": new / max(1, self.row_calls), "wall_s": self.wall_s,
                "tokens_per_s": new / self.wall_s if self.wall_s else 0.0,
                "compile_s": self.compile_s, **self.extra}

    def row_stats(self, gen: Sequence[int]) -> dict:
        return {"new_tokens": len(gen)}


def _rows(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [tokens[i, :lengths[i]].tolist() for i in range(len(lengths))]


def _spec_extra(stats) -> dict:
    rounds = max(1, int(stats.row_rounds))
    return {"rounds": int(stats.rounds), "drafted": int(stats.drafted),
            "accepted": int(stats.accepted),
            "acceptance_rate": int(stats.accepted) / max(1, int(stats.drafted)),
            "accept_rate_by_depth": [round(int(a) / rounds, 4) for a in stats.accepted_at_depth]}


@dataclasses.dataclass
class Run:
    """One configured decoding method."""

    method: str
    model_name: str
    config: decode.DecodeConfig
    spec: speculative.SpecConfig = speculative.SpecConfig()
    seed: int = 0
    draft_len: int = 0
    draft_model: Optional[str] = None
    draft_layers: int = DEFAULT_DRAFT_LAYERS
    skip_layers: Optional[tuple[int, ...]] = None
    num_branches: int = 1
    window: int = 0
    ngram: int = 0
    guess_set: int = -1
    jacobi_init: str = "repeat"
    eagle_tree: str = "static"
    head_tree: str = "tuned"  # medusa / hydra: tuned, tunedN or generic
    adaptive_draft: str = "off"
    plan: Optional[Any] = None  # specjax.sharding.ShardingPlan (params already placed), or None
    attention_impl: str = "xla"

    def load(self):
        from models import registry
        return registry.load(self.model_name, attention_impl=self.attention_impl)

    def config_for(self, loaded) -> decode.DecodeConfig:
        eos = loaded.tokenizer.eos_ids if loaded.tokenizer is not None else ()
        return dataclasses.replace(self.config, eos_ids=tuple(eos))

    def drafter(self, loaded):
        """``(drafter, drafter_params)`` for a speculative method (None for ``ar``); with a
        ``plan``, the drafter's own params are placed on its mesh."""
        drafter, dparams = self._drafter(loaded)
        if self.plan is None or dparams is None:
            return drafter, dparams
        from specjax import sharding
        if self.method == "draft_model" and self.draft_model:  # a separate LM: by its names
            return drafter, sharding.shard_drafter_params(self.plan, dparams,
                                                          drafter.model.logical_axes())
        if self.method == "draft_model":  # the target's first layers: already placed
            return drafter, dparams
        return drafter, sharding.shard_drafter_params(self.plan, dparams)

    def _drafter(self, loaded):
        from drafters import draft_model, layer_skip, prompt_lookup
        if self.adaptive_draft != "off" and self.method != "ar":
            from specjax.adaptive import AdaptiveDraftLength
            inner, dparams = dataclasses.replace(self, adaptive_draft="off")._drafter(loaded)
            return AdaptiveDraftLength(
                inner, policy=self.adaptive_draft,
                narrow_verify=self.method not in READS_ALL_VERIFY_OUTPUTS), dparams
        k = self.draft_len or METHODS[self.method].get("draft_len", 0)
        sampling = self.config.sampling
        if self.method == "ar":
            return None, None
        if self.method == "prompt_lookup":
            return prompt_lookup.PromptLookupDrafter(draft_len=k,
                                                     num_branches=self.num_branches), None
        if self.method == "draft_model":
            if self.draft_model:
                from models import registry
                small = registry.load(self.draft_model)
                return draft_model.DraftModelDrafter(small.model, k, sampling), small.params
            model, params = draft_model.from_target_layers(loaded.model, loaded.params,
                                                           self.draft_layers)
            return draft_model.DraftModelDrafter(model, k, sampling), params
        if self.method == "layer_skip":
            if self.skip_layers is None:
                return layer_skip.LayerSkipDrafter(loaded.model, None, k, sampling), None
            return layer_skip.LayerSkipDrafter.skipping(loaded.model, self.skip_layers,
                                                        draft_len=k, sampling=sampling), None
        if self.method in ("blockwise", "medusa", "hydra"):
            from drafters import head_weights  # shipped weights trained for the embedded model
            kwargs = {"draft_len": k} if self.method == "blockwise" and k else {}
            if self.method != "blockwise":
                kwargs["tree"] = self.head_tree
            return head_weights.load_shipped(self.method, loaded, **kwargs)
        if self.method == "eagle":
            from drafters import eagle_weights  # shipped layer trained for the embedded model
            return eagle_weights.load_shipped(loaded, tree=self.eagle_tree)
        if self.method in ("jacobi", "sjd"):
            from drafters import jacobi
            kwargs = {"window": self.window} if self.window else {}
            return jacobi.make(loaded.model, init=self.jacobi_init, sampling=sampling, **kwargs)
        if self.method == "lookahead":
            from drafters import lookahead
            kwargs = {"window": self.window} if self.window else {}
            if self.ngram:
                kwargs["ngram"] = self.ngram
            if self.guess_set >= 0:
                kwargs["guess_set"] = self.guess_set
            return lookahead.make(loaded.model, sampling=sampling, **kwargs)
        raise UserError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")

    def generate(self, loaded, prompts: Sequence[Sequence[int]], drafter=None) -> Result:
        """Runs the whole batch in one on-device loop; ``wall_s`` excludes compilation."""
        config = self.config_for(loaded)
        batch = decode.prepare_batch(prompts, loaded.model.vocab_size, self.plan)
        key = jax.random.key(self.seed)
        drafter, dparams = drafter if drafter is not None else self.drafter(loaded)
        t0 = time.perf_counter()
        if drafter is None:
            fn = decode.compile_generate(loaded.model, loaded.params, batch, config, key,
                                         plan=self.plan)
            call = lambda: fn(loaded.params, batch, key)  # noqa: E731
        else:
            fn, batch = speculative.compile_speculative_generate(
                loaded.model, loaded.params, drafter, dparams, batch, config, self.spec, key,
                plan=self.plan)
            call = lambda: fn(loaded.params, dparams, batch, key)  # noqa: E731
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(call())
        wall = time.perf_counter() - t0
        generated = _rows(np.asarray(out.tokens), np.asarray(out.lengths))
        if drafter is None:
            calls = int(out.stats.target_calls)
            return Result(generated, calls, calls * len(generated), wall, compile_s)
        return Result(generated, int(out.stats.target_calls), int(out.stats.row_calls), wall,
                      compile_s, _spec_extra(out.stats))

    def stream(self, loaded, prompts, on_tokens: Callable[[list[int]], None]) -> Result:
        """Python-driven rounds; ``on_tokens`` gets row 0's tokens so far after every round."""
        config = self.config_for(loaded)
        batch = make_prompt_batch(prompts, vocab_size=loaded.model.vocab_size)
        key = jax.random.key(self.seed)
        drafter, dparams = self.drafter(loaded)
        t0, t_first, calls, stats = time.perf_counter(), None, 0, None
        if drafter is None:
            generated = [[] for _ in prompts]
            for tokens, emitted in decode.stream(loaded.model, loaded.params, batch, config, key,
                                                 plan=self.plan):
                t_first = t_first or time.perf_counter()
                calls += 1
                for i in np.nonzero(emitted)[0]:
                    generated[i].append(int(tokens[i]))
                on_tokens(generated[0])
            row_calls = calls * len(prompts)
        else:
            for out_tokens, out_len, stats in speculative.speculative_stream(
                    loaded.model, loaded.params, drafter, dparams, batch, config, self.spec, key,
                    plan=self.plan):
                t_first = t_first or time.perf_counter()
                generated = _rows(out_tokens, out_len)
                on_tokens(generated[0])
            calls, row_calls = int(stats.target_calls), int(stats.row_calls)
        end = time.perf_counter()
        extra = {"loop": "python", "note": "wall_s excludes the first (compiling) call"}
        if stats is not None:
            extra |= _spec_extra(stats)
        return Result(generated, calls, row_calls, end - t_first, t_first - t0, extra)


def parse_layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise UserError(f"--skip_layers must be comma-separated integers, got {text!r}") from e


def tree_for(method: str, tree: str, given: bool) -> str:
    """The ``--tree`` value for ``method``: its default unless ``given``; validated per method
    (eagle: static / dynamic; every other method: chain / tree, used by prompt_lookup)."""
    choices = TREE_CHOICES.get(method, TREE_CHOICES["prompt_lookup"])
    if not given:
        tree = DEFAULT_TREE.get(method, tree)
    ok = tree in choices or ("tunedN" in choices and re.fullmatch(r"tuned[1-9]\d*", tree))
    if not ok:
        what = method if method in TREE_CHOICES else "prompt_lookup (and the default for others)"
        raise UserError(f"--tree must be one of {', '.join(choices)} for {what}, got {tree!r}")
    return tree


def build_run(FLAGS) -> Run:
    """Validates the flags and builds the run (before any slow model load)."""
    if FLAGS.method not in METHODS:
        raise UserError(f"unknown --method {FLAGS.method!r}; choose one of {', '.join(METHODS)}")
    if FLAGS.jacobi_init not in ("repeat", "random", "prompt_lookup"):
        raise UserError(f"--jacobi_init must be repeat, random or prompt_lookup, got "
                        f"{FLAGS.jacobi_init!r}")
    if FLAGS.method == "lookahead" and FLAGS.ngram == 1:
        raise UserError("--ngram must be >= 2 for lookahead (0 = default)")
    tree = tree_for(FLAGS.method, FLAGS.tree, FLAGS["tree"].present)
    try:
        sampling = SamplingConfig(temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                  top_p=FLAGS.top_p, min_p=FLAGS.min_p)
        config = decode.DecodeConfig(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling)
        spec = spec_config(FLAGS)
    except ValueError as e:
        raise UserError(str(e)) from e
    return Run(method=FLAGS.method, model_name=FLAGS.model, config=config, spec=spec,
               seed=FLAGS.seed, draft_len=FLAGS.draft_len, draft_model=FLAGS.draft_model,
               draft_layers=FLAGS.draft_layers, skip_layers=parse_layers(FLAGS.skip_layers),
               num_branches=FLAGS.num_branches if tree == "tree" else 1,
               window=FLAGS.window, ngram=FLAGS.ngram, guess_set=FLAGS.guess_set,
               jacobi_init=FLAGS.jacobi_init, adaptive_draft=FLAGS.adaptive_draft,
               attention_impl=FLAGS.attention,
               eagle_tree=tree if FLAGS.method == "eagle" else "static",
               head_tree=tree if FLAGS.method in ("medusa", "hydra") else "tuned")


class TextStreamer:
    """Prints decoded text incrementally (re-decodes the ids and prints the new suffix, so
    multi-byte characters split across tokens come out whole)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.printed = ""

    def push(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
