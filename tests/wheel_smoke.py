"""Smoke test of an installed specjax wheel (run by tests/test_packaging.py).

A plain script, run with a fresh virtualenv's python from a directory outside the checkout and
without PYTHONPATH; it imports nothing from tests/. Usage::

    python wheel_smoke.py CHECKOUT_DIR

Checks that specjax / models / drafters / experiments come from the venv's site-packages (not
CHECKOUT_DIR), that the embedded model loads, that plain and prompt-lookup greedy decoding give
the same tokens through the registry and the engine, that every method is registered, that
the shipped Hydra weights and their tuned tree are found, and that
``python -m experiments.generate`` runs. Prints ``WHEEL SMOKE OK`` at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def _check_in_process(site: str) -> None:
    """Embedded model, plain vs prompt-lookup greedy decoding through the registry and the
    engine, every method registered, the shipped Hydra heads."""
    from drafters import head_weights, registry
    from models import registry as models
    from specjax.decode import DecodeConfig
    from specjax.engine import Engine

    names = registry.names()
    for name in ("ar", "prompt_lookup", "draft_model", "layer_skip", "jacobi", "sjd",
                 "lookahead", "blockwise", "medusa", "hydra", "eagle"):
        assert name in names, f"method {name} is not registered in the installed package"
    lm = models.load("smollm2-135m")
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True)
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    config = DecodeConfig(max_new_tokens=8, eos_ids=lm.tokenizer.eos_ids)
    plain = Engine(lm.model, config).generate(lm.params, None, [ids]).tokens[0]
    drafter, dparams = registry.build("prompt_lookup", lm, draft_len=8)
    fast = Engine(lm.model, config, drafter).generate(lm.params, dparams, [ids]).tokens[0]
    print(f"plain {plain}\nprompt lookup {fast}\ntext {lm.tokenizer.decode(plain)!r}",
          flush=True)
    # The C++ kernel builds from the installed source (--weights=gguf) and decodes.
    tiny = models.load("tiny-llama", weights="gguf")
    assert dict(tiny.model.config.weight_formats)["wqkv"] == "q4_1"
    packed_rows = Engine(tiny.model, DecodeConfig(max_new_tokens=4)).generate(
        tiny.params, None, [[1, 2, 3]]).tokens[0]
    assert len(packed_rows) == 4, packed_rows
    assert plain, "plain decoding generated no token"
    assert plain == fast, "prompt lookup decoding differs from plain greedy decoding"

    weights = head_weights.shipped_path("hydra", "smollm2-135m")
    tree_file = head_weights.tree_file_of(weights)
    for path in (weights, tree_file):
        assert os.path.isfile(path) and _inside(path, site), f"shipped file missing: {path}"
    drafter, params = registry.build("hydra", lm)  # the shipped heads with their tuned tree
    choices, draft_vocab = head_weights.tuned_tree("tuned", weights)  # raises if unreadable
    assert choices and draft_vocab > 0, (choices, draft_vocab)
    assert params is not None and drafter.tree.num_nodes == len(choices) + 1
    print(f"hydra weights {weights}: tuned tree {choices}, draft_vocab {draft_vocab}",
          flush=True)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} CHECKOUT_DIR")
    checkout = argv[1]
    site = sysconfig.get_paths()["purelib"]
    print(f"python {sys.executable}\nsite-packages {site}\ncwd {os.getcwd()}", flush=True)
    assert not os.environ.get("PYTHONPATH"), "PYTHONPATH must be unset"
    assert not _inside(os.getcwd(), checkout), f"cwd {os.getcwd()} is inside the checkout"

    import drafters
    import experiments
    import models
    import specjax
    import specjax.kernels
    for module in (specjax, specjax.kernels, models, drafters, experiments):
        assert _inside(module.__file__, site) and not _inside(module.__file__, checkout), (
            f"{module.__name__} imported from {module.__file__}, not from {site}")

    # The binary runs alongside the in-process checks (its model load and compile overlap them).
    with open("generate.stdout", "w") as stdout, open("generate.stderr", "w") as stderr:
        cli = subprocess.Popen([sys.executable, "-m", "experiments.generate",
                                "--max_new_tokens=4", "--nostream"], cwd=os.getcwd(),
                               stdout=stdout, stderr=stderr)
    try:
        _check_in_process(site)
        code = cli.wait(timeout=600)
    except subprocess.TimeoutExpired:
        code = "timeout (600 s)"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    out, err = (Path(f"generate.{name}").read_text(errors="replace")
                for name in ("stdout", "stderr"))
    print(f"experiments.generate exit {code}\n--- stdout\n{out[-3000:]}"
          f"\n--- stderr\n{err[-3000:]}", flush=True)
    assert code == 0, "python -m experiments.generate failed"
    assert out.strip(), "python -m experiments.generate printed nothing"
    print("WHEEL SMOKE OK", flush=True)


if __name__ == "__main__":
    main(sys.argv)
