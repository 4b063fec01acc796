"""Smoke tests of the experiment binaries (run as subprocesses, as a user runs them) and of the
benchmark helpers.

Real-model (SmolLM2) subprocesses are few: one good ``generate`` run. Everything else uses the
tiny random models. Bad input to every binary is tested in ``tests/test_bad_input.py``.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import benchmark as bench
from experiments import spec_bench
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_BENCH = bench.DEFAULT_PROMPTS


def _start(module, args):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run(module, args, timeout=600):
    return _finish(_start(module, args), timeout)


# --------------------------------------------------------------------- generate.py


def test_generate_good_run_writes_documented_json(tmp_path):
    out = tmp_path / "out.json"
    rc, stdout, err = _run("experiments.generate",
                           ["--max_new_tokens=4", "--nostream", f"--output_json={out}"])
    assert rc == 0, err
    obj = json.loads(out.read_text())
    for key in ("prompt", "prompt_ids", "generated_ids", "text", "stats"):
        assert key in obj
    for key in ("new_tokens", "target_calls", "tau", "wall_s", "tokens_per_s"):
        assert key in obj["stats"], obj["stats"]
    assert 1 <= len(obj["generated_ids"]) <= 4
    assert obj["stats"]["new_tokens"] == len(obj["generated_ids"])
    assert obj["stats"]["tau"] == pytest.approx(1.0)  # plain decoding: one token per call
    assert all(isinstance(i, int) for i in obj["prompt_ids"] + obj["generated_ids"])
    assert obj["text"].strip() and obj["text"].strip() in stdout


# --------------------------------------------------------------------- benchmark.py


@pytest.mark.skipif(not os.path.isfile(SPEC_BENCH), reason="Spec-Bench prompts not available")
def test_benchmark_smoke(tmp_path):
    js, md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc, stdout, err = _run("experiments.benchmark", [
        "--model=tiny-llama", "--nopeer", "--per_category=1", "--categories=qa,translation",
        "--max_new_tokens=4", "--draft_layers=1", f"--output_json={js}",
        f"--output_md={md}"])
    assert rc == 0, err
    res = json.loads(js.read_text())
    # Every registered method runs by default (sjd only on request: it is jacobi when greedy).
    assert list(res["methods"]) == ["ar", "prompt_lookup", "draft_model", "layer_skip",
                                    "jacobi", "lookahead", "token_recycling", "sam",
                                    "first_of", "merge"]
    assert res["groups"] == ["translation", "qa"] and res["num_prompts"] == 2
    assert res["mismatches"] == []
    for name, m in res["methods"].items():
        assert len(m["per_prompt"]) == 2
        o = m["overall"]
        assert o["new_tokens"] == 8 and o["tau"] >= 1.0 and o["tokens_per_s"] > 0
        if name != "ar":
            assert o["mismatches"] == 0 and o["speedup"] > 0
            if m["draft_len"]:  # jacobi / lookahead have a window, not a draft length
                assert len(o["accept_rate_by_depth"]) == m["draft_len"]
            assert set(m["by_category"]) == {"translation", "qa"}
    spec = [n for n, m in res["methods"].items() if "round_breakdown" in m]
    # prompt lookup verifies at the width of its drafts: not comparable, left out
    assert {"draft_model", "layer_skip"} <= set(spec) and not {"ar", "prompt_lookup"} & set(spec)
    for name in spec:
        b = res["methods"][name]["round_breakdown"]
        assert b["calls"] == 16 and b["step_s"] > 0 and b["round_s"] > 0 and b["verify_s"] > 0
        assert b["round_steps"] == pytest.approx(b["round_s"] / b["step_s"])
        assert b["drafting_steps"] == pytest.approx(b["round_steps"] - b["verify_steps"])
    text = md.read_text()
    assert "| prompt_lookup |" in text and "Speedup / tau by task group" in text
    assert "Round cost breakdown" in text
    assert "ar" in stdout and "speedup" in stdout


def test_tree_shape_drafter_is_lossless_and_drafts_the_shape():
    """The round-cost breakdown's no-cost drafter: any tree shape, output equal to plain
    decoding's (so its rounds are real rounds)."""
    import tinymodels as kit
    from drafters.eagle import EagleDrafter
    from experiments.bench_round_cost import TreeShapeDrafter
    from specjax.decode import DecodeConfig, generate
    from specjax.speculative import speculative_generate
    model, params = kit.tiny_model("gqa")
    like = EagleDrafter.create(model)  # a 2-level static tree
    drafter = TreeShapeDrafter.like(like)
    assert drafter.tree is like.tree and drafter.feature_layers == tuple(like.feature_layers)
    config = DecodeConfig(max_new_tokens=10)
    want = kit.rows_of(generate(model, params, kit.PROMPTS, config))
    got = speculative_generate(model, params, drafter, (), kit.PROMPTS, config)
    assert kit.rows_of(got) == want


def test_round_cost_breakdown_fuses_the_same_rounds():
    """The breakdown's fused rounds are the loop's rounds (same tokens as one call per round),
    and its figures are per round."""
    import jax
    import numpy as np
    import tinymodels as kit
    from drafters import prompt_lookup
    from experiments import bench_round_cost
    from specjax.decode import DecodeConfig, DecodeLoop
    from specjax.speculative import SpecConfig, SpecLoop
    model, params = kit.tiny_model("gqa")
    config = DecodeConfig(max_new_tokens=12)
    loop = SpecLoop(model, prompt_lookup.PromptLookupDrafter(draft_len=3), config, SpecConfig())
    batch, slots = loop.prepare([kit.PROMPTS[0]])
    start = loop.jit_start(params, None, batch, jax.random.key(0), slots)
    fused = bench_round_cost._rounds(loop, params, None, start, 3)
    one = loop.jit_start(params, None, batch, jax.random.key(0), slots)
    for _ in range(3):
        one = loop.jit_round(params, None, one)
    np.testing.assert_array_equal(np.asarray(fused.out_tokens), np.asarray(one.out_tokens))
    assert int(fused.stats.rounds) == int(one.stats.rounds) == 3
    got = bench_round_cost.breakdown(loop, DecodeLoop(model, config), params, None,
                                     kit.PROMPTS[0], calls=2, rounds_per_call=3)
    assert got["rounds_per_call"] == 3 and got["calls"] == 2
    assert got["round_steps"] == pytest.approx(got["round_s"] / got["step_s"])
    assert got["drafting_steps"] == pytest.approx(got["round_steps"] - got["verify_steps"])
    with pytest.raises(ValueError, match="at least 1"):
        bench_round_cost.breakdown(loop, DecodeLoop(model, config), params, None,
                                   kit.PROMPTS[0], rounds_per_call=0)


def test_benchmark_ar_smoke(tmp_path):
    js, md = tmp_path / "ar.json", tmp_path / "ar.md"
    rc, _, err = _run("experiments.benchmark_ar", [
        "--model=tiny-llama", "--nohf", "--nollama_cpp", "--num_prompts=1", "--max_new_tokens=4",
        "--weights_list=float32,gguf,gguf_a8", "--verify_widths=1,3", "--verify_calls=1",
        "--verify_cache_len=16", "--product_isas=auto,portable", f"--output_json={js}",
        f"--output_md={md}"])
    assert rc == 0, err
    res = json.loads(js.read_text())
    assert set(res["tokens_per_s"]) == {"generate", "stream", "generate_gguf",
                                        "generate_gguf_a8"}
    assert res["ratios"]["stream/generate"] > 0 and res["ratios"]["generate_gguf/generate"] > 0
    row = res["per_prompt"][0]
    assert row["stream"]["same_tokens_as_generate"]
    assert row["generate"]["new_tokens"] == 4 and row["generate"]["target_calls"] == 4
    assert row["generate_gguf"]["new_tokens"] == 4  # a quantised tiny model: its own tokens
    # the prefill + first token timed apart (on a tiny model the 3 steps after it are within
    # the timing noise: the rate's arithmetic is tested below)
    for way in ("generate", "stream", "generate_gguf"):
        assert row[way]["first_token_s"] > 0 and "decode_tokens_per_s" in row[way]
    assert set(res["decode_tokens_per_s"]) == set(res["tokens_per_s"])
    assert set(res["verify_ms"]) == {"float32", "gguf", "gguf_a8"}
    assert all(set(v) == {"1", "3"} and min(v.values()) > 0 for v in res["verify_ms"].values())
    # the packed products alone, for the packed formats only
    assert set(res["packed_products"]) == {"gguf", "gguf_a8", "gguf (portable)",
                                           "gguf_a8 (portable)"}
    for by_width in res["packed_products"].values():
        assert set(by_width) == {"1", "3"}
        assert all(v["ms"] > 0 and v["g_multiply_adds_per_s"] > 0 and v["gb_per_s"] > 0
                   for v in by_width.values())
    text = md.read_text()
    assert "| stream |" in text and "| generate (gguf) |" in text and "T=3" in text
    assert "decode tok/s" in text and "first token ms" in text
    assert "## Packed products of one forward" in text


def test_benchmark_ar_decode_rate():
    from experiments.benchmark_ar import _timing
    r = _timing([5] * 11, 2.5, 0.5, target_calls=11)
    assert r["tokens_per_s"] == 11 / 2.5 and r["decode_tokens_per_s"] == 10 / 2.0
    assert r["first_token_s"] == 0.5 and r["target_calls"] == 11
    # one token, or a first-token time not below the whole (noise): no decode rate, not a
    # negative or infinite one
    assert _timing([5], 0.4, 0.4)["decode_tokens_per_s"] is None
    assert _timing([5] * 4, 0.01, 0.012)["decode_tokens_per_s"] is None


def test_memory_limits_smoke(tmp_path):
    js, md = tmp_path / "limits.json", tmp_path / "limits.md"
    rc, stdout, err = _run("experiments.memory_limits", [
        "--model=tiny-llama", "--methods=prompt_lookup", "--prompt_lens=8,200",
        "--batch_sizes=4", "--max_new_tokens=8", f"--output_json={js}", f"--output_md={md}"])
    assert rc == 0, err
    res = json.loads(js.read_text())
    assert res["free_gb"] > 0 and res["weights_bytes"] > 0
    rows = {r["prompt_len"]: r for r in res["methods"]["prompt_lookup"]}
    assert set(rows) == {8, 200} and {r["batch_size"] for r in rows.values()} == {4}
    # more prompt tokens need more memory, so no more of them fit in one batch
    assert rows[200]["required_bytes"] > rows[8]["required_bytes"] > 0
    assert 4 <= rows[200]["rows_that_fit"] <= rows[8]["rows_that_fit"]
    assert "| prompt_lookup | 200 | 4 |" in md.read_text() and "| prompt_lookup | 8 | 4 |" in stdout


# --------------------------------------------------------------------- helpers, in process


def _write_questions(path):
    rows = []
    for i, cat in enumerate(["writing", "writing", "roleplay", "coding", "qa", "qa", "qa"]):
        rows.append({"question_id": i, "category": cat, "turns": [f"question {i}", "turn 2"]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_read_prompts_groups_and_round_robin(tmp_path):
    path = tmp_path / "q.jsonl"
    _write_questions(path)
    got = spec_bench.read_prompts(str(path), 3, None)
    assert [(p.group, p.category, p.question_id) for p in got] == [
        ("mt_bench", "writing", 0), ("mt_bench", "roleplay", 2), ("mt_bench", "coding", 3),
        ("qa", "qa", 4), ("qa", "qa", 5), ("qa", "qa", 6)]
    assert got[0].text == "question 0"  # first turn only
    assert [p.question_id for p in spec_bench.read_prompts(str(path), 5, ["writing"])] == [0, 1]
    assert [p.question_id for p in spec_bench.read_prompts(str(path), 1, ["qa"])] == [4]
    with pytest.raises(common.UserError, match="unknown --categories"):
        spec_bench.read_prompts(str(path), 1, ["nope"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "qa", "turns": []}\n')
    with pytest.raises(common.UserError, match="bad.jsonl:1"):
        spec_bench.read_prompts(str(bad), 1, None)


def test_spec_bench_split_holds_out_what_the_benchmark_measures(tmp_path):
    path = tmp_path / "q.jsonl"
    _write_questions(path)
    measured = {p.text for p in spec_bench.read_prompts(str(path), 2, None)}
    train = spec_bench.split_texts(str(path), 2, "train")
    held = spec_bench.split_texts(str(path), 2, "eval")
    assert set(held) == measured and not set(train) & measured
    assert sorted(train + held) == sorted(spec_bench.split_texts(str(path), 2, "all"))
    assert train == ["question 3", "question 1", "question 6"]  # in read_prompts order
    # every smaller --per_category is inside the held-out part
    assert {p.text for p in spec_bench.read_prompts(str(path), 1, None)} <= set(held)
    assert spec_bench.split_texts(str(path), 0, "train") == spec_bench.split_texts(
        str(path), 0, "all")
    with pytest.raises(common.UserError, match="train, eval or all"):
        spec_bench.split_texts(str(path), 2, "test")
    # what the training binaries read: the split, then [offset:offset + limit]
    import types
    fv = types.SimpleNamespace(spec_bench_split="train", spec_bench_eval_per_category=2)
    texts, described = spec_bench.training_texts(str(path), 2, 1, fv)
    assert texts == train[1:3] and "train split, 2 per group held out" in described
    lines = tmp_path / "p.txt"
    lines.write_text("a\nb\nc\n")
    assert spec_bench.training_texts(str(lines), 1, 1, fv) == (["b"], str(lines))
    with pytest.raises(ValueError, match="gave no prompts"):
        spec_bench.training_texts(str(path), 2, 3, fv)


def test_aggregate_and_mismatch():
    assert bench.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_mismatch([1, 2, 3], [1, 2]) == 2
    ar = [{"new_tokens": 10, "wall_s": 1.0, "tokens_per_s": 10.0, "target_calls": 10},
          {"new_tokens": 10, "wall_s": 4.0, "tokens_per_s": 2.5, "target_calls": 10}]
    spec = [{"new_tokens": 10, "wall_s": 0.5, "tokens_per_s": 20.0, "target_calls": 4,
             "rounds": 3, "drafted": 9, "accepted": 6, "accepted_at_depth": [3, 2, 1],
             "matches_ar": True},
            {"new_tokens": 10, "wall_s": 4.0, "tokens_per_s": 2.5, "target_calls": 10,
             "rounds": 9, "drafted": 27, "accepted": 0, "accepted_at_depth": [0, 0, 0],
             "matches_ar": False}]
    a = bench.aggregate(spec, ar)
    assert a["tau"] == pytest.approx(20 / 14)
    assert a["speedup"] == pytest.approx((22.5 / 2) / (12.5 / 2))  # mean tok/s ratio
    assert a["speedup_wall"] == pytest.approx(5.0 / 4.5)
    assert a["accept_rate_by_depth"] == [0.25, round(2 / 12, 4), round(1 / 12, 4)]
    assert a["acceptance_rate"] == pytest.approx(6 / 36)
    assert a["mismatches"] == 1


# --------------------------------------------------------------------- hf_peer


def test_hf_peer_modes_agree_and_stop_at_eos(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from experiments import hf_peer
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.5)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    peer = hf_peer.Peer.load(str(tmp_path), eos_ids=[63], draft="first_layers:1", num_threads=1)
    plain = peer.generate(prompt, 12)
    assert len(plain.generated) == 12 and plain.target_calls == 12
    lookup = peer.generate(prompt, 12, prompt_lookup_num_tokens=4)
    assisted = peer.generate(prompt, 12, assisted=True, draft_len=3)
    assert lookup.generated == plain.generated == assisted.generated
    assert assisted.draft_calls > 0 and len(peer.assistant.model.layers) == 1
    assert len(peer.model.model.layers) == 2  # the draft shares modules, the target is intact
    # The same EOS ids as specjax: generation stops at (and includes) the first EOS.
    eos = plain.generated[2]
    stop = hf_peer.Peer(peer.model, eos_ids=[eos]).generate(prompt, 12)
    assert stop.generated == plain.generated[:plain.generated.index(eos) + 1]
    with pytest.raises(ValueError, match="cannot load"):
        hf_peer.resolve("tiny-llama")


def _char_tokenizer(pieces, specials, eos):
    """A byte-level BPE over ``pieces`` (lowercase letters, ``Ġ`` = space, merged pairs) with
    ``specials`` first: every id decodes to ASCII text, so any output re-tokenises."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {s: i for i, s in enumerate(list(specials) + list(pieces))}
    merges = [(p[0], p[1:]) for p in pieces if len(p) > 1]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(list(specials))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    import transformers
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos)


def test_hf_peer_assists_across_tokenizers(tmp_path):
    """A draft model with another vocabulary: transformers' universal assisted generation with
    both tokenizers (loaded from the checkpoints), greedy output equal to plain generate's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from experiments import hf_peer
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ"]
    target_tok = _char_tokenizer(letters + ["th", "he", "at", "Ġt"], ["<eos>"], "<eos>")
    draft_tok = _char_tokenizer(letters[::-1], ["<s>", "</s>"], "</s>")
    dirs = {}
    for name, tok, layers in (("target", target_tok, 2), ("draft", draft_tok, 1)):
        torch.manual_seed(len(name))
        config = transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, initializer_range=0.5)
        dirs[name] = tmp_path / name
        transformers.LlamaForCausalLM(config).save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    assert len(target_tok) != len(draft_tok)
    prompt = target_tok("the cat sat on the mat")["input_ids"]
    peer = hf_peer.Peer.load(str(dirs["target"]), eos_ids=[0], draft=str(dirs["draft"]),
                             num_threads=1)
    assert peer.cross_vocab
    plain = peer.generate(prompt, 12)
    assisted = peer.generate(prompt, 12, assisted=True, draft_len=3)
    assert assisted.generated == plain.generated and assisted.draft_calls > 0
    assert 1 <= len(plain.generated) <= 12
    with pytest.raises(ValueError, match="needs both tokenizers"):
        hf_peer.Peer(peer.model, eos_ids=[0], assistant=peer.assistant)


# --------------------------------------------------------------------- raw prompts, options


def test_raw_prompts_skip_the_chat_template():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from models.tokenizer import TextTokenizer
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "def": 1, "f():": 2, "user": 3},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = TextTokenizer(backend, chat_template="user {{ messages[0]['content'] }}")
    assert spec_bench.encode_prompt(tok, "def f():", 99) == [3, 1, 2]  # templated
    assert spec_bench.encode_prompt(tok, "def f():", 99, chat=False) == [1, 2]  # as is
    assert spec_bench.encode_prompt(None, "ab", 99, chat=False) == [97 % 99, 98 % 99]


def test_method_option_sets_one_method_and_peer_twin():
    from experiments import methods
    runs = {n: methods.Run(n) for n in ("ar", "cross_vocab", "staged", "draft_model")}
    got = bench.with_method_options(runs, ["cross_vocab.draft_model=smollm2-135m",
                                           "staged.draft_len=6", "cross_vocab.expansion=2.5"])
    assert got["cross_vocab"].options.draft_model == "smollm2-135m"
    assert got["cross_vocab"].options.expansion == 2.5
    assert got["staged"].options.draft_len == 6 and got["staged"].options.draft_model is None
    assert got["draft_model"] == runs["draft_model"] and runs["staged"].options.draft_len == 4
    assert bench.assisted_twin(got, "smollm2-135m") == "cross_vocab"
    assert bench.assisted_twin(got, "first_layers:4") == "draft_model"
    for bad, match in (("staged=3", "METHOD.OPTION=VALUE"), ("sam.draft_len=3", "not among"),
                       ("staged.nope=1", "no option 'nope'"), ("staged.draft_len=x", "x"),
                       ("staged.draft_len=0", "draft_len")):
        with pytest.raises(common.UserError, match=match):
            bench.with_method_options(runs, [bad])
