"""experiments/bench_plots.py: the three PNGs of a benchmark result (valid, of the documented
pixel size, not blank), its input errors (nothing written), and its CLI as a subprocess."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from experiments import bench_plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ["translation", "rag"]


def _metrics(tau, speedup=None, depth=None):
    m = {"prompts": 2, "new_tokens": 64, "wall_s": 1.0, "tokens_per_s": 30.0 * (speedup or 1),
         "tau": tau}
    if speedup is not None:
        m |= {"speedup": speedup, "speedup_wall": speedup * 0.95}
    if depth is not None:
        m["accept_rate_by_depth"] = depth
    return m


def _method(tau, speedup=None, depth=None, lossless=True):
    return {"overall": _metrics(tau, speedup, depth),
            "by_category": {g: _metrics(tau + 0.2 * i, speedup and speedup + 0.1 * i, depth)
                            for i, g in enumerate(GROUPS)},
            "lossless": lossless, "draft_len": len(depth or []), "compile_s": 2.0,
            "per_prompt": []}


def _peer_mode(tau, speedup=None):
    mode = {"overall": _metrics(tau, speedup), "per_prompt": [],
            "by_category": {g: _metrics(tau, speedup) for g in GROUPS}}
    for m in [mode["overall"], *mode["by_category"].values()]:
        m["vs_specjax_ar"] = 0.7
    return mode


def make_result(peer="modes"):
    """A small benchmark result: ar, a lossless and a lossy method, two task groups."""
    if peer == "modes":
        peer = {"modes": {"plain": _peer_mode(1.0), "prompt_lookup": _peer_mode(1.6, 1.2)}}
    return {"config": {"model": "tiny-test", "max_new_tokens": 32, "per_category": 2},
            "command": "python -m experiments.benchmark --per_category=2 " + "--x=y " * 40,
            "environment": {"cpu_cores": 2}, "groups": GROUPS, "num_prompts": 4,
            "methods": {"ar": _method(1.0),
                        "prompt_lookup": _method(1.7, 1.15, [0.3, 0.2, 0.1, 0.05]),
                        "layer_skip": _method(1.75, 0.6, [0.5, 0.25], lossless=False)},
            "peer": peer, "mismatches": []}


def check_png(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == bench_plots.PIXELS
    assert bench_plots.PIXELS == (round(bench_plots.FIGSIZE[0] * bench_plots.DPI),
                                  round(bench_plots.FIGSIZE[1] * bench_plots.DPI))
    from matplotlib import image
    pixels = image.imread(path)
    assert pixels.shape[:2] == (height, width)
    rgb = (pixels[..., :3] * 255).astype(np.int32)
    assert rgb.std() > 10  # drawn on, not one colour
    assert len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])) > 20


@pytest.mark.parametrize("peer", ["modes", None, {"error": "RuntimeError: boom"}])
def test_write_plots(tmp_path, peer):
    out = tmp_path / "new" / "plots"  # created, parents included
    paths = bench_plots.write_plots(make_result(peer), str(out))
    assert [os.path.basename(p) for p in paths] == list(bench_plots.FILES)
    for p in paths:
        check_png(p)
    assert sorted(os.listdir(out)) == sorted(bench_plots.FILES)  # no temporary files left


def test_only_ar(tmp_path):
    result = make_result(None)
    result["methods"] = {"ar": result["methods"]["ar"]}
    for p in bench_plots.write_plots(result, str(tmp_path)):
        check_png(p)


@pytest.mark.parametrize("result, message", [
    ({"config": {}}, "no 'methods'"),
    ([1, 2], "got list"),
    ({"methods": {"ar": {"tau": 1.0}}, "groups": []}, "'ar' has no 'overall'"),
    ({"methods": {"ar": _method(1.0)}}, "no 'groups'"),
    ({"methods": {"ar": _method(1.0)}, "groups": [], "peer": {"modes": [1]}}, "'modes'"),
])
def test_not_a_result(tmp_path, result, message):
    out = tmp_path / "plots"
    with pytest.raises(ValueError, match=message) as e:
        bench_plots.write_plots(result, str(out))
    assert "\n" not in str(e.value) and "experiments.benchmark" in str(e.value)
    assert not out.exists()


def test_out_dir_is_a_file(tmp_path):
    out = tmp_path / "plots"
    out.write_text("keep me")
    with pytest.raises(ValueError, match="existing file"):
        bench_plots.write_plots(make_result(), str(out))
    assert out.read_text() == "keep me"


def test_failure_writes_nothing(tmp_path, monkeypatch):
    def broken(result):
        raise RuntimeError("render failed")
    monkeypatch.setitem(bench_plots.PLOTS, bench_plots.FILES[-1], broken)
    out = tmp_path / "plots"
    with pytest.raises(RuntimeError):
        bench_plots.write_plots(make_result(), str(out))
    assert not out.exists() or not os.listdir(out)


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "experiments.bench_plots", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli(tmp_path):
    good, bad = tmp_path / "bench.json", tmp_path / "bad.json"
    good.write_text(json.dumps(make_result()))
    bad.write_text("{not json")
    ok = _cli(f"--input={good}", f"--plots={tmp_path / 'out'}")  # both run at once
    fail = _cli(f"--input={bad}", f"--plots={tmp_path / 'bad_out'}")
    out, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    assert out.split() == [str(tmp_path / "out" / f) for f in bench_plots.FILES]
    for f in bench_plots.FILES:
        check_png(tmp_path / "out" / f)
    out, err = fail.communicate(timeout=120)
    assert fail.returncode == 2
    assert err.count("\n") == 1 and err.startswith("error: --input") and "not JSON" in err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "bad_out").exists()
