"""The method registry (``drafters.registry``), its flags (``experiments.method_flags``), the
one run construction every binary shares (``experiments.methods.build_run``) and the engine
API (``specjax.engine``): every registered method lossless through it, flags that do not apply
rejected, the binaries building identical runs, and the WORKSPACE example of a new method.
"""

import dataclasses
import os
import re
import types

import pytest
from absl import flags

from drafters import registry
from experiments import benchmark, common, generate, method_flags, methods
from specjax import decode, engine
from specjax.drafter import DrafterBase, Proposal, check_drafter
from specjax.speculative import speculative_generate
from specjax.tree import DraftTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 3, 9, 3, 9, 3]]
CONFIG = decode.DecodeConfig(max_new_tokens=10)
BUILTIN = ["ar", "prompt_lookup", "draft_model", "layer_skip", "jacobi", "sjd", "lookahead",
           "blockwise", "medusa", "hydra", "eagle"]


@pytest.fixture(scope="module")
def tiny():
    from models import registry as models
    return models.load("tiny-llama")


@pytest.fixture(scope="module")
def plain_rows(tiny):
    return engine.Engine(tiny.model, CONFIG).generate(tiny.params, None, PROMPTS).tokens


def _generate_flags(*args):
    fv = flags.FlagValues()
    generate.define_flags(fv)
    fv(["generate", *args])
    return fv


def _benchmark_flags(*args):
    fv = flags.FlagValues()
    benchmark.define_flags(fv)
    fv(["benchmark", *args])
    return fv


# The registry ---------------------------------------------------------------------------------


def test_builtin_methods_are_registered_in_listing_order():
    assert registry.names()[:len(BUILTIN)] == BUILTIN
    for m in registry.methods():
        opts = m.options()  # the defaults are valid
        assert dataclasses.is_dataclass(opts) and hash(opts) == hash(m.options())
        with pytest.raises(dataclasses.FrozenInstanceError):
            opts.__setattr__("x", 1)
        assert opts.param_sharding() in registry.PARAM_SHARDINGS
    assert registry.get("hydra").weights == "hydra" and registry.get("jacobi").weights is None
    assert registry.get("eagle").trees == (("static", "dynamic", "tunedN", "generic"), "static")
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of ar, "):
        registry.get("nope")


def test_options_are_validated_with_the_allowed_values():
    po = registry.get("prompt_lookup")
    with pytest.raises(ValueError, match="draft_len must be >= 1, got 0"):
        po.make_options(draft_len=0)
    with pytest.raises(ValueError, match="tree must be one of chain, tree, got 'dynamic'"):
        po.make_options(tree="dynamic")
    with pytest.raises(ValueError, match="prompt_lookup has no option window"):
        po.make_options(window=3)
    medusa = registry.get("medusa")
    assert medusa.make_options(tree="tuned12").tree == "tuned12"
    for bad in ("tuned0", "tunedx", "static"):
        with pytest.raises(ValueError, match="tuned, tunedN, generic"):
            medusa.make_options(tree=bad)


@pytest.mark.parametrize("name", [m.name for m in registry.methods()
                                  if m.weights is None and m.name != "ar"])
def test_untrained_methods_are_lossless_through_the_engine(tiny, plain_rows, name):
    method = registry.get(name)
    options = method.make_options(draft_layers=1) if name == "draft_model" else None  # 2 layers
    run = methods.Run(name, "tiny-llama", CONFIG, options)
    drafter, dparams = run.drafter(tiny)
    check_drafter(drafter)
    got = run.engine(tiny, drafter).compile(tiny.params, dparams, PROMPTS).run()
    assert got.tokens == plain_rows
    assert got.stats.row_calls <= got.new_tokens and got.stats.accepted_at_depth


def test_engine_has_one_return_shape_and_streams(tiny, plain_rows):
    from drafters.prompt_lookup import PromptLookupDrafter
    for drafter in (None, PromptLookupDrafter(draft_len=3)):
        eng = engine.Engine(tiny.model, CONFIG, drafter)
        compiled = eng.compile(tiny.params, None, PROMPTS)
        gen = compiled.run()
        assert isinstance(gen, engine.Generation) and gen.tokens == plain_rows
        assert compiled.compile_s > 0 and gen.wall_s > 0
        assert gen.tau == gen.new_tokens / gen.stats.row_calls
        steps = list(eng.stream(tiny.params, None, PROMPTS))
        assert steps[-1].tokens == plain_rows
        assert [len(t) for t in steps[0].tokens] == [1, 1]  # after the prefill
        assert steps[-1].stats == gen.stats
    plain = engine.Engine(tiny.model, CONFIG).generate(tiny.params, None, PROMPTS)
    assert plain.tau == 1.0 and plain.stats.drafted == 0  # a plain step offers no draft


def test_tau_counts_only_live_rows_when_a_row_stops_early(tiny, plain_rows):
    """A batch where one row hits EOS early: plain decoding's tau is exactly 1 (finished rows
    stop counting calls), and a speculative method counts its rows the same way."""
    from drafters.prompt_lookup import PromptLookupDrafter
    first, other = plain_rows
    stop = next(i for i in range(1, len(first) - 2)
                if first[i] not in first[:i] and first[i] not in other[:i + 3])
    config = dataclasses.replace(CONFIG, eos_ids=(first[stop],))
    plain = engine.Engine(tiny.model, config).generate(tiny.params, None, PROMPTS)
    assert plain.tokens[0] == first[:stop + 1]  # row 0 stopped early, at its EOS
    assert len(plain.tokens[1]) > stop + 1
    assert plain.tau == 1.0 and plain.stats.row_calls == plain.new_tokens
    spec = engine.Engine(tiny.model, config, PromptLookupDrafter(draft_len=3)).generate(
        tiny.params, None, PROMPTS)
    assert spec.tokens == plain.tokens
    # each live row's call emits >= 1 token, so row_calls <= tokens; the finished row adds none
    assert spec.stats.row_calls <= spec.new_tokens and spec.tau >= 1.0
    assert spec.stats.row_calls < spec.stats.target_calls * len(PROMPTS)


def test_a_drafter_without_the_contract_is_refused_before_tracing(tiny):
    @dataclasses.dataclass(frozen=True)
    class Bare:  # propose only: no DrafterBase
        tree: DraftTree = DraftTree.chain(2)

        def propose(self, params, state, ctx, key):
            return Proposal(tokens=ctx.history[:, :3]), state, ctx.cache

    with pytest.raises(TypeError, match="missing deterministic, siblings, verify_widths, "
                       "reads_unoffered_outputs, feature_layers, commits_any_proposal, "
                       "check_compatible, init, commit; "
                       "subclass "
                       "specjax.drafter.DrafterBase"):
        speculative_generate(tiny.model, tiny.params, Bare(), None, PROMPTS, CONFIG)


# A new method in one file: the WORKSPACE example ----------------------------------------------


def _workspace_example() -> str:
    text = open(os.path.join(ROOT, "WORKSPACE.md"), encoding="utf-8").read()
    marker = text.index("<!-- example: a new method")
    match = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    return match.group(1)


def test_workspace_example_adds_a_working_method_in_one_file(tiny, plain_rows):
    source = _workspace_example()
    assert len(source.strip().splitlines()) <= 30
    module = types.ModuleType("drafters.workspace_example")
    exec(compile(source, "WORKSPACE.md", "exec"), module.__dict__)  # noqa: S102
    try:
        method = registry.get("repeat_last")
        assert "repeat_last" in registry.names()
        fv = _generate_flags("--method=repeat_last", "--draft_len=3", "--model=tiny-llama",
                             "--max_new_tokens=10")
        run = methods.build_run(fv)
        assert run.options == method.make_options(draft_len=3)
        drafter, dparams = run.drafter(tiny)
        gen = run.engine(tiny, drafter).compile(tiny.params, dparams, PROMPTS).run()
        assert gen.tokens == plain_rows  # lossless, whatever it drafts
        assert gen.stats.drafted > 0
    finally:
        registry.unregister("repeat_last")
    assert "repeat_last" not in registry.names()


# Flags -----------------------------------------------------------------------------------------


def test_option_flags_apply_only_to_methods_that_have_them():
    run = methods.build_run(_generate_flags("--method=prompt_lookup", "--draft_len=4",
                                            "--tree=tree", "--num_branches=2"))
    assert run.options == registry.get("prompt_lookup").make_options(
        draft_len=4, tree="tree", num_branches=2)
    skip = methods.build_run(_generate_flags("--method=layer_skip", "--skip_layers=1, 3"))
    assert skip.options.skip_layers == (1, 3)
    cases = [(["--method=prompt_lookup", "--window=3"],
              "--window does not apply to prompt_lookup: it is an option of jacobi, sjd, "
              "lookahead"),
             (["--method=ar", "--draft_len=2"], "--draft_len does not apply to ar"),
             (["--method=medusa", "--tree=chain"], "--tree must be one of tuned, tunedN, generic"),
             (["--method=prompt_lookup", "--draft_len=0"], "--draft_len must be >= 1, got 0"),
             (["--method=layer_skip", "--skip_layers=1,x"], "--skip_layers: expected comma"),
             (["--method=prompt_lookup", "--topk_k=3"], "--topk_k applies to "
              "--acceptance=topk_lossy only"),
             (["--method=ar", "--adaptive_draft=acceptance"], "--adaptive_draft applies to "
              "speculative methods"),
             (["--method=bogus"], "--method: unknown method 'bogus'")]
    for args, message in cases:
        with pytest.raises(common.UserError, match=re.escape(message)):
            methods.build_run(_generate_flags(*args))


def test_benchmark_applies_each_flag_to_the_methods_that_have_it():
    runs = benchmark.build_runs(_benchmark_flags(
        "--methods=prompt_lookup,jacobi,eagle:dynamic,medusa:tuned8", "--draft_len=5",
        "--window=3", "--nopeer"))
    assert list(runs) == ["ar", "prompt_lookup", "jacobi", "eagle:dynamic", "medusa:tuned8"]
    assert runs["prompt_lookup"].options.draft_len == 5 and runs["jacobi"].options.window == 3
    assert runs["eagle:dynamic"].options.tree == "dynamic"
    assert runs["medusa:tuned8"].options.tree == "tuned8"
    with pytest.raises(common.UserError, match="--window does not apply to ar, prompt_lookup"):
        benchmark.build_runs(_benchmark_flags("--methods=prompt_lookup", "--window=3"))
    with pytest.raises(common.UserError, match="layer_skip:x: layer_skip has no tree option"):
        benchmark.build_runs(_benchmark_flags("--methods=layer_skip:x"))


@pytest.mark.parametrize("name", BUILTIN)
def test_generate_and_benchmark_build_the_same_run(name):
    """The benchmark cannot drift from generate: the same flags give equal runs (method,
    options, decoding, acceptance, attention, dtype)."""
    method = registry.get(name)
    common_args = ["--model=tiny-llama", "--max_new_tokens=7", "--attention=pallas",
                   "--dtype=bfloat16"]
    if "draft_len" in method.options.fields():
        common_args.append("--draft_len=1")
    from_generate = methods.build_run(_generate_flags(f"--method={name}", *common_args))
    from_benchmark = benchmark.build_runs(_benchmark_flags(f"--methods={name}", *common_args))
    assert from_benchmark[name] == from_generate
    assert from_generate.attention_impl == "pallas" and from_generate.dtype == "bfloat16"


def test_attention_dtype_and_weights_reach_the_model_in_every_binary():
    fv = _generate_flags("--model=tiny-llama", "--attention=pallas", "--dtype=bfloat16")
    loaded = methods.build_run(fv).load()
    assert loaded.model.config.attention_impl == "pallas"
    assert loaded.model.config.dtype == loaded.model.config.param_dtype == "bfloat16"
    loaded = method_flags.load_model(fv)
    assert loaded.model.config.attention_impl == "pallas"
    fv = _generate_flags("--model=tiny-llama", "--weights=int8")
    assert dict(methods.build_run(fv).load().model.config.weight_formats)["wqkv"] == "i8"
    assert dict(method_flags.load_model(fv).model.config.weight_formats)["w_down"] == "i8"
    # Every binary loads its target through Run.load or method_flags.load_model, which both
    # read --attention, --dtype and --weights; none calls the loader on its own.
    for name in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
        if name.endswith(".py") and name not in ("methods.py", "method_flags.py"):
            source = open(os.path.join(ROOT, "experiments", name), encoding="utf-8").read()
            assert not re.search(r"registry\.load\(|models\.load\(", source), name
