"""Bad input to every binary: one ``error:`` line naming the problem, exit status 2, no traceback,
no output file and no temporary file left; interruptions stop cleanly and leave nothing
partial. Each case runs the binary in a process of its own, with its own exit status and
stderr: forked from one that imported the binary once (``bad_input_driver.py``: the import is
most of a case's CPU time); the interruption tests start ``python -m`` as a user does.

Cases that need no model fail before any load. The few that need the real tokenizer (a prompt
longer than the context, a tree size the tuned file lacks) load SmolLM2 from its disk cache and
still fail before anything is compiled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The node range the refusal must name: the shipped medusa tree file's (json, no jax import).
with open(os.path.join(ROOT, "drafters", "weights", "smollm2-135m", "medusa.tree.json")) as _f:
    MEDUSA_TREE_NODES = len(json.load(_f)["order"])
SMALL_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
                "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _env():
    return dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))


def _write(path, content, mode="w"):
    with open(path, mode) as f:
        f.write(content)
    return path


def _setup(case_dir: str) -> dict:
    """The input files the cases point at, made in ``case_dir``; returns placeholders."""
    files = {
        "tmp": case_dir,
        "latin1": _write(os.path.join(case_dir, "latin1.txt"), b"ok prompt\ncaf\xe9\n", "wb"),
        "empty": _write(os.path.join(case_dir, "empty.txt"), "\n  \n"),
        "long": _write(os.path.join(case_dir, "long.txt"), "word " * 9000 + "\n"),
        "afile": _write(os.path.join(case_dir, "afile"), "x"),
    }
    for name, cfg in (("hf_missing", {k: v for k, v in SMALL_CONFIG.items()
                                      if k != "hidden_size"}),
                      ("hf_zero_heads", {**SMALL_CONFIG, "num_attention_heads": 0}),
                      ("hf_list", [SMALL_CONFIG]),
                      ("hf_heads", {**SMALL_CONFIG, "num_attention_heads": 5})):
        os.makedirs(os.path.join(case_dir, name))
        _write(os.path.join(case_dir, name, "config.json"), json.dumps(cfg))
        files[name] = os.path.join(case_dir, name)
    return files


# (binary, args, phrase of the error line). {name} fills in a path of _setup.
CASES = {
    # generate: flags
    "gen_unknown_method": ("generate", ["--method=bogus"], "--method: unknown method 'bogus'"),
    "gen_zero_tokens": ("generate", ["--max_new_tokens=0"], "max_new_tokens"),
    "gen_top_p": ("generate", ["--top_p=2"], "top_p must be in (0, 1]"),
    "gen_unknown_flag": ("generate", ["--no_such_flag=1"], "no_such_flag"),
    "gen_bad_weights": ("generate", ["--weights=int4"], "--weights"),
    "gen_gguf_weights_of_hf_dir": ("generate", ["--weights=gguf", "--model={hf_heads}"],
                                   "HF checkpoint directory: use --weights=int8"),
    "ar_weights_list": ("benchmark_ar", ["--weights_list=float32,int4", "--nohf"],
                        "--weights_list: give distinct formats among float32, gguf, gguf_a8, int8"),
    "ar_product_isas": ("benchmark_ar", ["--product_isas=auto,sse2", "--nohf"],
                        "--product_isas: give distinct values among auto, portable, avx2"),
    "device_check_widths": ("device_check", ["--widths=0,2", "--out={tmp}/o"],
                            "--widths must be >= 1 and below --cache_len"),
    "gen_flag_not_for_method": ("generate", ["--method=prompt_lookup", "--window=3"],
                                "--window does not apply to prompt_lookup"),
    "gen_bad_option_value": ("generate", ["--method=prompt_lookup", "--draft_len=0"],
                             "--draft_len must be >= 1"),
    "gen_bad_tree": ("generate", ["--method=medusa", "--tree=static"],
                     "--tree must be one of tuned, tunedN, generic"),
    "gen_tree_too_big": ("generate", ["--method=medusa", "--tree=tuned999"],
                         f"--method=medusa --tree=tuned999: a tuned tree has "
                         f"1..{MEDUSA_TREE_NODES} nodes"),
    "gen_compose_unknown_part": ("generate", ["--method=first_of", "--tree=nope+prompt_lookup"],
                                 "--tree=nope+prompt_lookup: unknown method 'nope'"),
    "gen_compose_one_part": ("generate", ["--method=merge", "--tree=prompt_lookup"],
                             "--tree must be one of PART+PART, got 'prompt_lookup'"),
    "gen_compose_ar_part": ("generate", ["--method=merge", "--tree=ar+prompt_lookup"],
                            "ar cannot be a part of a composition"),
    "gen_compose_part_tree": ("generate", ["--method=first_of",
                                           "--tree=prompt_lookup+medusa:static"],
                              "tree must be one of tuned, tunedN, generic"),
    "gen_skip_layers": ("generate", ["--method=layer_skip", "--skip_layers=1,x"],
                        "--skip_layers: expected comma-separated integers"),
    "gen_topk_without_rule": ("generate", ["--topk_k=3"], "--topk_k applies to "
                              "--acceptance=topk_lossy only"),
    "gen_bad_dtype": ("generate", ["--dtype=int8"], "dtype"),
    # generate: prompts
    "gen_empty_prompt": ("generate", ["--prompt=   "], "prompt is empty"),
    "gen_missing_prompts_file": ("generate", ["--prompts_file=/nonexistent/p.txt"],
                                 "does not exist"),
    "gen_prompts_file_dir": ("generate", ["--prompts_file={tmp}"], "is a directory"),
    "gen_prompts_file_latin1": ("generate", ["--prompts_file={latin1}"],
                                "line 2 is not valid UTF-8 (byte 0xe9 at column 4)"),
    "gen_prompts_file_empty": ("generate", ["--prompts_file={empty}"], "no non-empty lines"),
    "gen_prompt_bytes": ("generate", [b"--prompt=caf\xe9"], "--prompt is not valid UTF-8 text "
                         "(byte 0xe9 at position 3)"),
    "gen_prompt_over_context": ("generate", ["--prompts_file={long}", "--max_new_tokens=8"],
                                "over the model's context of 8192: shorten the prompt"),
    "gen_tokens_over_context": ("generate", ["--max_new_tokens=9000"], "leaves no room for a "
                                "prompt in the model's context of 8192 tokens"),
    # generate: models
    "gen_unknown_model": ("generate", ["--model=no-such-model"], "unknown model"),
    "gen_tiny_model": ("generate", ["--model=tiny-llama"], "has no tokenizer"),
    "gen_hf_missing_key": ("generate", ["--model={hf_missing}"],
                           "config.json: hidden_size is missing"),
    "gen_hf_zero_heads": ("generate", ["--model={hf_zero_heads}"],
                          "config.json: num_attention_heads must be a positive integer, got 0"),
    "gen_hf_list": ("generate", ["--model={hf_list}"], "holds a JSON list, not an object"),
    "gen_hf_heads": ("generate", ["--model={hf_heads}"], "num_attention_heads (5) must divide "
                     "hidden_size (32)"),
    # generate: outputs and mesh (refused before the model is loaded)
    "gen_output_dir": ("generate", ["--output_json={tmp}"], "is a directory: give a file path"),
    "gen_output_parent_file": ("generate", ["--output_json={afile}/out.json"],
                               "is a file, not a directory"),
    "gen_output_proc": ("generate", ["--output_json=/proc/specjax/out.json"],
                        "--output_json '/proc/specjax/out.json'"),
    "gen_bad_mesh": ("generate", ["--mesh=2y4"], "--mesh=2y4: mesh '2y4' is not DATAxMODEL"),
    "gen_mesh_too_big": ("generate", ["--mesh=1x3"], "needs 3 devices"),
    # benchmark
    "bench_unknown_method": ("benchmark", ["--methods=ar,bogus"], "unknown method 'bogus'"),
    "bench_category": ("benchmark", ["--categories=nope"], "nope"),
    "bench_prompts": ("benchmark", ["--prompts=/nonexistent.jsonl"], "does not exist"),
    "bench_peer_tiny": ("benchmark", ["--model=tiny-llama"], "transformers peer"),
    "bench_flag_not_for_methods": ("benchmark", ["--methods=prompt_lookup", "--window=3"],
                                   "--window does not apply to ar, prompt_lookup"),
    "bench_output_dir": ("benchmark", ["--nopeer", "--output_json={tmp}"], "is a directory"),
    "bench_plots_file": ("benchmark", ["--nopeer", "--plots={afile}"], "is a file: give a "
                         "directory"),
    "bench_tree": ("benchmark", ["--methods=layer_skip:x"], "layer_skip has no tree option"),
    # benchmark_batch, benchmark_ar, demo
    "batch_sizes": ("benchmark_batch", ["--batch_sizes=1,x"], "--batch_sizes must be integers"),
    "batch_method": ("benchmark_batch", ["--methods=bogus+adaptive"], "unknown method 'bogus'"),
    "batch_output": ("benchmark_batch", ["--output_md={tmp}"], "is a directory"),
    "ar_output": ("benchmark_ar", ["--nohf", "--output_json={afile}/x.json"], "is a file"),
    "demo_ar": ("demo", ["--method=ar"], "--method must be a speculative method"),
    "limits_lens": ("memory_limits", ["--prompt_lens=1,x"], "--prompt_lens must be integers"),
    "limits_over_context": ("memory_limits", ["--prompt_lens=8100"], "over the model's context "
                            "of 8192: use prompt lengths up to 8064"),
    # training and tree tuning
    "train_no_data": ("train_drafter", [], "--data_dir is required"),
    "train_output_dir": ("train_drafter", ["--data_dir={tmp}/d", "--output={tmp}"],
                         "is a directory"),
    "train_unknown_model": ("train_drafter", ["--data_dir={tmp}/d", "--model=nope"],
                            "unknown model"),
    "tune_no_data": ("tune_tree", [], "--data_dir is required"),
    "tune_output_dir": ("tune_tree", ["--data_dir={tmp}/d", "--output={tmp}"], "is a directory"),
    "tune_corpus_no_corpus": ("tune_tree", ["--drafter=eagle3"], "--corpus_dir is required"),
    "tune_corpus_data_dir": ("tune_tree", ["--drafter=block_diffusion", "--corpus_dir={tmp}",
                                           "--data_dir={tmp}"], "--data_dir does not apply"),
    "tune_corpus_vocab": ("tune_tree", ["--drafter=eagle3", "--corpus_dir={tmp}",
                                        "--draft_vocab=10"], "--draft_vocab does not apply"),
    "tune_corpus_fraction": ("tune_tree", ["--drafter=eagle3", "--corpus_dir={tmp}",
                                           "--eval_fraction=1.5"], "must be in (0, 1]"),
    "tune_not_a_corpus": ("tune_tree", ["--drafter=eagle3", "--corpus_dir={tmp}"],
                          "no manifest.json"),
    # distillation corpus and feature drafters
    "corpus_no_out": ("build_corpus", [], "--out_dir is required"),
    "corpus_out_is_file": ("build_corpus", ["--out_dir={afile}"], "is a file: give a directory"),
    "corpus_prompts_need_regen": ("build_corpus", ["--out_dir={tmp}", "--source={empty}"],
                                  "is a prompt file without responses: use --path=regenerated"),
    "corpus_no_source": ("build_corpus", ["--out_dir={tmp}", "--source=/nonexistent.txt"],
                         "is neither 'sharegpt' nor a prompt file"),
    "corpus_layers": ("build_corpus", ["--out_dir={tmp}", "--layers=2,99"],
                      "--layers [99] are outside the model's layers 0..29"),
    "corpus_layers_text": ("build_corpus", ["--out_dir={tmp}", "--layers=2,x"],
                           "give comma-separated layer numbers"),
    "task_prompts_not_jsonl": ("build_task_prompts", ["--output={tmp}/prompts.txt"],
                               "give the prompt file to write, ending in .jsonl"),
    "fdt_no_drafter": ("train_corpus_drafter", [], "--drafter is required"),
    "fdt_no_corpus": ("train_corpus_drafter", ["--drafter=eagle3"], "--corpus_dir is required"),
    "fdt_not_a_corpus": ("train_corpus_drafter", ["--drafter=eagle3", "--corpus_dir={tmp}"],
                         "no manifest.json"),
    "fdt_options": ("train_corpus_drafter", ["--drafter=block_diffusion", "--corpus_dir={tmp}",
                                             "--trainer_options=block_size"],
                    "--trainer_options entry 'block_size' is not key=value"),
    # Token Recycling's table and tree
    "table_no_corpus": ("build_recycling_table", [], "--corpus_dir is required"),
    "table_not_a_corpus": ("build_recycling_table", ["--corpus_dir={tmp}"], "no manifest.json"),
    "table_width": ("build_recycling_table", ["--corpus_dir={tmp}", "--table_width=60000"],
                    "--table_width 60000 is over the vocabulary (49152)"),
    # SAM-Decoding's static automaton
    "sam_no_corpus": ("build_sam_automaton", [], "--corpus_dir is required"),
    "sam_not_a_corpus": ("build_sam_automaton", ["--corpus_dir={tmp}"], "no manifest.json"),
    "sam_model": ("build_sam_automaton", ["--corpus_dir={tmp}", "--model=nope"],
                  "unknown model 'nope'"),
    "sam_output_dir": ("build_sam_automaton", ["--corpus_dir={tmp}", "--output={tmp}"],
                       "is a directory: give a file path"),
    "sam_static_missing": ("generate", ["--method=sam", "--static_path=/nonexistent.safetensors"],
                           "no suffix automaton at /nonexistent.safetensors"),
    # REST's datastore
    "rest_no_corpus": ("build_rest_datastore", [], "--corpus_dir is required"),
    "rest_not_a_corpus": ("build_rest_datastore", ["--corpus_dir={tmp}"], "no manifest.json"),
    "rest_output_is_dir": ("build_rest_datastore", ["--corpus_dir={tmp}", "--output={tmp}"],
                           "is a directory: give a file path"),
    "rest_sort_depth": ("build_rest_datastore", ["--corpus_dir={tmp}", "--sort_depth=1"],
                        "--sort_depth=1: 1 is not integer >= 2"),
    "tune_recycling_data_dir": ("tune_tree", ["--drafter=token_recycling", "--data_dir={tmp}"],
                                "--corpus_dir is required for --drafter=token_recycling"),
    "tune_recycling_fraction": ("tune_tree", ["--drafter=token_recycling", "--corpus_dir={tmp}",
                                              "--eval_fraction=1"], "builds its table from"),
    "train_from_corpus_two_dirs": ("train_drafter", ["--data_dir={tmp}/a,{tmp}/b",
                                                     "--from_corpus={tmp}"],
                                   "creates one new --data_dir"),
    "train_corpus_weights": ("train_corpus_drafter", ["--drafter=eagle3", "--corpus_dir={tmp}",
                                                      "--corpus_weights=1,2"],
                             "gives 2 weights for 1"),
    "train_init_weights": ("train_corpus_drafter", ["--drafter=eagle3", "--corpus_dir={tmp}",
                                                    "--init_weights={tmp}/none.safetensors"],
                           "--init_weights"),
    "plots_missing": ("bench_plots", ["--input=/nonexistent.json", "--plots={tmp}/p"],
                      "does not exist"),
}


def _run_binary(module, names, base):
    """Every case of one binary: ``{name: (returncode, stderr, files left behind)}``. The cases
    run in processes of their own, forked from one that imported the binary once
    (``bad_input_driver.py``)."""
    cases, dirs = [], {}
    for name in names:
        args = CASES[name][1]
        case_dir = dirs[name] = os.path.join(base, name)
        os.makedirs(case_dir)
        files = _setup(case_dir)
        argv = [a.format(**files) if isinstance(a, str) else a for a in args]
        cases.append({"name": name, "argv": [(a if isinstance(a, bytes) else a.encode()).hex()
                                             for a in argv]})
    before = {name: set(os.listdir(d)) for name, d in dirs.items()}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bad_input_driver.py"),
                           f"experiments.{module}"], input=json.dumps(cases).encode(), cwd=ROOT,
                          env=_env(), capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode("utf-8", "replace")
    out = json.loads(proc.stdout)
    return {name: (out[name][0], out[name][1], set(os.listdir(dirs[name])) - before[name])
            for name in names}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("bad_input"))
    by_binary = {}
    for name, (module, _, _) in CASES.items():
        by_binary.setdefault(module, []).append(name)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(_run_binary, module, names, base)
                   for module, names in by_binary.items()]
        return {name: r for f in futures for name, r in f.result().items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(results, name):
    rc, stderr, left = results[name]
    phrase = CASES[name][2]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert phrase in lines[0], stderr
    assert not left, left  # no output file, no temporary file


# Interruptions --------------------------------------------------------------------------------


def _wait_for(predicate, timeout, proc):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run to start")


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(args, signum, ready, tmp_path, timeout=600):
    """Starts ``python -m experiments.X args``, waits until ``ready(stdout_path, stderr_path)``,
    sends ``signum``; returns ``(returncode, stderr)``."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        # As from a terminal: SIGINT at its default. A process started from a pytest-xdist
        # worker inherits SIGINT ignored (seen: the Ctrl-C never arrived, the run finished),
        # and Python keeps an inherited SIG_IGN.
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=_env(), stdout=o,
                                stderr=e, preexec_fn=_default_sigint)
        try:
            _wait_for(lambda: ready(out, err), timeout, proc)
            proc.send_signal(signum)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, err.read_text(errors="replace")


def test_sigint_while_streaming_stops_cleanly(tmp_path):
    target = tmp_path / "out.json"
    rc, stderr = _interrupt(
        ["experiments.generate", "--max_new_tokens=400", "--prompt=Count from 1 to 300.",
         f"--output_json={target}"], signal.SIGINT,
        lambda out, err: out.exists() and out.stat().st_size > 20, tmp_path)
    assert rc == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted (SIGINT): stopped, no output written"
    assert not target.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_sigterm_during_the_benchmark_stops_cleanly(tmp_path):
    target = tmp_path / "bench.json"
    rc, stderr = _interrupt(
        ["experiments.benchmark", "--model=tiny-llama", "--nopeer", "--per_category=3",
         "--max_new_tokens=48", "--methods=prompt_lookup,jacobi", f"--output_json={target}"],
        signal.SIGTERM, lambda out, err: b"prompt_lookup" in err.read_bytes(), tmp_path)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == ("interrupted (SIGTERM): stopped, no output "
                                               "written")
    assert not target.exists()


def test_sigint_during_training_then_the_rerun_resumes(tmp_path):
    """Ctrl-C during training: one line, exit 130, no weights file; the same command again
    resumes from the last complete checkpoint and finishes."""
    import numpy as np
    from drafters import distill
    from models import registry
    lm = registry.load("tiny-gqa")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, lm.model.vocab_size, size=n).tolist() for n in (5, 9, 7, 12)]
    data, ckpt = str(tmp_path / "data"), tmp_path / "ckpt"
    distill.distill(lm.model, lm.params, prompts, data, max_new_tokens=16, batch_size=4,
                    model_name="tiny-gqa")
    weights = tmp_path / "medusa.safetensors"
    args = ["experiments.train_drafter", "--model=tiny-gqa", "--drafter=medusa",
            f"--data_dir={data}", "--steps=200", "--batch_size=8", "--ckpt_every=5",
            "--eval_every=0", "--eval_fraction=0.25", f"--ckpt_dir={ckpt}", f"--output={weights}"]
    saved = lambda out, err: ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())  # noqa: E731
    rc, stderr = _interrupt(args, signal.SIGINT, saved, tmp_path)
    assert rc == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted \(SIGINT\): stopped, no output written; checkpoint saved "
                        r"at step \d+, rerun the same command to resume", last), last
    assert not weights.exists()
    rerun = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed from" in rerun.stderr and weights.exists()


def test_an_interruption_dropped_inside_a_gc_callback_is_raised_again(monkeypatch):
    """Python drops an exception raised in a garbage-collection callback ("Exception ignored
    in ..."): a Ctrl-C landing in jax's GC callback was lost and the run went on to the end.
    The binaries' hook raises it again a moment later, without printing it."""
    import gc
    from experiments import common
    previous = signal.signal(signal.SIGALRM, common._raise_dropped)
    monkeypatch.setattr(sys, "unraisablehook", common._keep_dropped_interruptions)
    state = {"raised": False}

    def callback(phase, info):
        if phase == "start" and not state["raised"]:
            state["raised"] = True
            raise KeyboardInterrupt

    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            gc.collect()  # the callback's KeyboardInterrupt is dropped here...
            end = time.time() + 5
            while time.time() < end:  # ...and raised again by SIGALRM
                sum(range(1000))
        assert state["raised"]
    finally:
        gc.callbacks.remove(callback)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
