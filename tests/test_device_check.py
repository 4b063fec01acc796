"""``experiments/device_check.py`` (the prepared GPU check) runs to completion on the CPU with tiny
shapes, with only the device image's packages importable (no gguf, tokenizers' users, tqdm,
jinja2, matplotlib, transformers or torch), and writes its JSON and Markdown summaries with every
section filled and the kernel checks passed."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("gguf", "tqdm", "jinja2", "matplotlib", "transformers", "torch", "scipy", "pytest")
RUN = f"""
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not on the device image")
sys.meta_path.insert(0, Block())
sys.argv = ["device_check"] + sys.argv[1:]
runpy.run_module("experiments.device_check", run_name="__main__")
"""


def test_device_check_smoke_run_on_cpu_with_the_device_image_packages(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", RUN, "--smoke", f"--out={out}", "--widths=1,3", "--calls=1",
         "--new_tokens=4", "--cache_len=64"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "device_check.json").read_text())
    assert result["tree_attention"] and all(r["passed"] for r in result["tree_attention"])
    assert {(r["model"], r["weights"]) for r in result["models"]} == {
        ("tiny", "float32"), ("tiny", "int8")}
    for r in result["models"]:
        assert set(r["verify_ms"]) == {"1", "3"} and all(v > 0 for v in r["verify_ms"].values())
        assert r["decode"]["new_tokens"] == 4 and r["decode"]["tokens_per_s"] > 0
    assert all(r["ms"]["pallas"] > 0 for r in result["attention_vs_xla"])
    md = (out / "device_check.md").read_text()
    assert "| tiny | int8 |" in md and "Tree-attention kernel vs reference" in md
