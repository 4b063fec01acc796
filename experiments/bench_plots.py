"""Plots of a benchmark result: the dict ``python -m experiments.benchmark`` writes with
``--output_json``.

  python -m experiments.bench_plots --input=/tmp/bench.json --plots=/tmp/plots

writes three PNGs (``FIGSIZE`` inches at ``DPI``, so ``PIXELS`` pixels each):

  * ``speedup_tau.png``: grouped bars per task group (``result["groups"]`` order) and overall;
    top panel speedup, bottom panel tau (new tokens per target forward pass). One bar per
    speculative method; ``ar`` is not a bar but the dashed line at 1.0, since its speedup and
    tau are 1.0 by definition. The transformers peer's modes (hatched bars, "HF <mode>") have
    their speedup relative to HF plain, so HF plain is the same 1.0 line; its speed relative
    to specjax ``ar`` is given in the footnote. Lossy methods say "(lossy)" in the legend.
  * ``accept_by_depth.png``: per method, the fraction of rounds whose draft token at depth d was
    accepted, d = 1..D (methods without ``accept_rate_by_depth``, such as ``ar``, are skipped).
  * ``round_cost.png``: per method, the cost of one speculative round in plain decoding steps,
    tau / speedup (overall), as horizontal bars with the method's tau marked; speedup = tau /
    round cost, so a method beats plain decoding exactly when its bar ends left of its tau.
    Each row is labelled with its overall round cost, tau and speedup.

Every figure's title names the model and the number of prompts; its footnote is the command
that produced the result. The files are written atomically, after all three are rendered.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import matplotlib
import numpy as np
from absl import app, flags
# Figures are drawn on matplotlib.figure.Figure, never through pyplot: no display is needed and
# the process's backend is left alone (a notebook that imports this keeps its inline plots).
from matplotlib.figure import Figure

from experiments import common
from specjax.files import write_atomic

FIGSIZE = (12.0, 7.5)  # inches
DPI = 100
PIXELS = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))  # (width, height) of every PNG
FILES = ("speedup_tau.png", "accept_by_depth.png", "round_cost.png")
MAX_COMMAND_CHARS = 150
_HINT = "pass the --output_json file of python -m experiments.benchmark"


@dataclasses.dataclass
class Series:
    """One bar/line series: a specjax method or a peer mode (``peer``), with its metrics per
    task group and ``"overall"``, and its colour (the same in every plot)."""
    label: str
    metrics: dict
    peer: bool
    color: tuple = (0.0, 0.0, 0.0)

    def value(self, where: str, key: str) -> float:
        """``key`` of group ``where`` (or ``"overall"``); NaN when absent."""
        v = self.metrics.get(where, {}).get(key)
        return float("nan") if v is None else float(v)


def check_result(result) -> None:
    """Raises ValueError (one line, with what to do) unless ``result`` is a benchmark result."""
    if not isinstance(result, dict):
        raise ValueError(f"not a benchmark result (a JSON object is expected, got "
                         f"{type(result).__name__}): {_HINT}")
    methods = result.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"not a benchmark result (no 'methods'): {_HINT}")
    for name, m in methods.items():
        if not isinstance(m, dict) or not isinstance(m.get("overall"), dict):
            raise ValueError(f"not a benchmark result (method {name!r} has no 'overall' "
                             f"metrics): {_HINT}")
    if not isinstance(result.get("groups"), list):
        raise ValueError(f"not a benchmark result (no 'groups' list): {_HINT}")
    modes = _peer_modes(result)
    if not isinstance(modes, dict) or not all(isinstance(m, dict) for m in modes.values()):
        raise ValueError(f"not a benchmark result ('peer' 'modes' is not an object of modes): "
                         f"{_HINT}")


def series(result: dict) -> list[Series]:
    """The specjax methods but ``ar``, then the peer's modes but plain (1.0 by definition)."""
    out = []
    for name, m in result["methods"].items():
        if name != "ar":
            label = name if m.get("lossless", True) else f"{name} (lossy)"
            out.append(Series(label, {"overall": m["overall"], **m.get("by_category", {})},
                              peer=False))
    for mode, m in _peer_modes(result).items():
        if mode != "plain":
            out.append(Series(f"HF {mode} (vs HF plain)",
                              {"overall": m.get("overall", {}), **m.get("by_category", {})},
                              peer=True))
    colors = matplotlib.colormaps["tab20"].colors  # dark shades first, then their light pairs
    colors = colors[0::2] + colors[1::2]
    for i, s in enumerate(out):
        s.color = colors[i % len(colors)]
    return out


def _peer_modes(result: dict) -> dict:
    peer = result.get("peer")
    return (peer.get("modes") or {}) if isinstance(peer, dict) else {}


def _shorten(text: str, limit: int = MAX_COMMAND_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _figure(result: dict, what: str, nrows: int = 1):
    cfg = result.get("config", {})
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    axes = fig.subplots(nrows, 1, squeeze=False)
    fig.suptitle(f"{what}: {cfg.get('model', '?')}, {result.get('num_prompts', '?')} prompts, "
                 f"max_new_tokens={cfg.get('max_new_tokens', '?')}", fontsize=13)
    note = _shorten(result.get("command", ""))
    hf_plain = _peer_modes(result).get("plain", {}).get("overall", {}).get("vs_specjax_ar")
    if hf_plain is not None:
        note += f"\nHF plain: {hf_plain:.2f}x specjax ar's tokens/s"
    fig.text(0.01, 0.01, note, fontsize=7.5, color="0.35", va="bottom", family="monospace")
    return fig, axes[:, 0]


def plot_speedup_tau(result: dict):
    """Speedup (top) and tau (bottom) per task group and overall, one bar per series."""
    where = list(result["groups"]) + ["overall"]
    fig, (top, bottom) = _figure(result, "Speedup and tau by task group", nrows=2)
    fig.subplots_adjust(left=0.06, right=0.76, top=0.92, bottom=0.11, hspace=0.15)
    ss = series(result)
    x = np.arange(len(where))
    width = 0.8 / max(1, len(ss))
    for ax, key, ylabel in ((top, "speedup", "speedup vs plain decoding"),
                            (bottom, "tau", "tau (tokens / target pass)")):
        for i, s in enumerate(ss):
            ys = np.array([s.value(w, key) for w in where])
            ok = ~np.isnan(ys)
            ax.bar(x[ok] - 0.4 + (i + 0.5) * width, ys[ok], width, color=s.color,
                   hatch="//" if s.peer else None, edgecolor="white", linewidth=0.3,
                   label=s.label)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1,
                   label="1.0 = ar" + ("; for HF bars, HF plain" if _peer_modes(result) else ""))
        ax.axvline(len(where) - 1.5, color="0.6", linewidth=0.8)  # groups | overall
        ax.set_ylabel(ylabel)
        ax.set_xticks(x, where if ax is bottom else [])
        ax.set_xlim(-0.5, len(where) - 0.5)
        ax.set_ylim(0, np.nanmax([s.value(w, key) for s in ss for w in where] + [1.0]) * 1.12)
        ax.grid(axis="y", alpha=0.3)
    if not ss:
        top.text(0.5, 0.5, "only ar in this result", transform=top.transAxes, ha="center")
    handles, labels = top.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.77, 0.92), fontsize=9,
               frameon=False)
    return fig


def plot_accept_by_depth(result: dict):
    """Acceptance rate at each draft depth, one line per method that reports it."""
    fig, (ax,) = _figure(result, "Acceptance rate by draft depth")
    fig.subplots_adjust(left=0.07, right=0.76, top=0.92, bottom=0.14)
    depth = 0
    for s in series(result):
        rates = s.metrics["overall"].get("accept_rate_by_depth")
        if rates:
            ax.plot(range(1, len(rates) + 1), rates, marker="o", color=s.color, label=s.label)
            depth = max(depth, len(rates))
    if depth:
        ax.set_xticks(range(1, depth + 1))
        ax.set_xlim(0.7, depth + 0.3)
        fig.legend(loc="upper left", bbox_to_anchor=(0.77, 0.92), fontsize=9, frameon=False)
    else:
        ax.text(0.5, 0.5, "no method in this result reports acceptance by depth",
                transform=ax.transAxes, ha="center")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("draft depth d")
    ax.set_ylabel("rounds whose depth-d draft token was accepted")
    ax.grid(alpha=0.3)
    return fig


def plot_round_cost(result: dict):
    """Round cost = tau / speedup (overall) in plain decoding steps, with each method's tau."""
    fig, (ax,) = _figure(result, "Cost of one round in plain decoding steps")
    fig.subplots_adjust(left=0.25, right=0.95, top=0.92, bottom=0.17)
    rows = [(s, s.value("overall", "tau"), s.value("overall", "speedup")) for s in series(result)]
    rows = [(s, tau, sp) for s, tau, sp in rows if tau > 0 and sp > 0]  # NaN compares False
    y = np.arange(len(rows))
    for i, (s, tau, sp) in enumerate(rows):
        ax.barh(i, tau / sp, color=s.color, hatch="//" if s.peer else None, edgecolor="white")
        ax.plot(tau, i, marker="D", color="black", markersize=6)
        ax.annotate(f"{tau / sp:.2f} steps (tau {tau:.2f}, {sp:.2f}x)",
                    (max(tau, tau / sp), i), xytext=(9, 0), textcoords="offset points",
                    va="center", fontsize=8.5)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y, [s.label for s, _, _ in rows])
    ax.invert_yaxis()
    top = max([max(tau, tau / sp) for _, tau, sp in rows] + [1.0])
    ax.set_xlim(0, top * 1.35)
    ax.set_xlabel("plain decoding steps per round (tau / speedup); dashed: 1.0 = one plain step; "
                  "black diamond: tau")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("speedup = tau / round cost: speculation pays where the bar ends left of the "
                 "diamond (cost below tau)", fontsize=10)
    if not rows:
        ax.text(0.5, 0.5, "no method with a speedup in this result", transform=ax.transAxes,
                ha="center")
    return fig


PLOTS = dict(zip(FILES, (plot_speedup_tau, plot_accept_by_depth, plot_round_cost)))


def write_plots(result: dict, out_dir: str) -> list[str]:
    """Renders the three plots of ``result`` and writes them into ``out_dir`` (created if
    missing) as ``FILES``; returns their paths. Raises ValueError for a dict that is not a
    benchmark result or an ``out_dir`` that is not a directory, before writing anything."""
    check_result(result)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"plots directory {out_dir!r} is an existing file: pass a directory")
    images = {}
    for name, plot in PLOTS.items():  # render all first: a failure writes nothing
        buf = io.BytesIO()
        plot(result).savefig(buf, format="png", dpi=DPI)
        images[name] = buf.getvalue()
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create plots directory {out_dir!r}: {e.strerror}") from None
    paths = []
    for name, data in images.items():
        def write(tmp, data=data):
            with open(tmp, "wb") as f:
                f.write(data)
        paths.append(write_atomic(os.path.join(out_dir, name), write))
    return paths


def read_result(path: str) -> dict:
    """The JSON at ``path``; UserError for a missing or non-JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise common.UserError(f"--input {path!r} does not exist") from None
    except IsADirectoryError:
        raise common.UserError(f"--input {path!r} is a directory: {_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise common.UserError(f"--input {path!r} is not JSON ({e}): {_HINT}") from None


def define_flags() -> None:
    """The CLI's flags (defined by ``__main__`` only: benchmark.py imports this module)."""
    flags.DEFINE_string("input", None, "Benchmark result: the --output_json file of "
                        "python -m experiments.benchmark.")
    flags.DEFINE_string("plots", None, "Directory for the PNGs (created if missing).")


def main(argv):
    common.start(argv, quiet=False)
    FLAGS = flags.FLAGS
    with common.user_errors():
        if not FLAGS.input or not FLAGS.plots:
            raise common.UserError("--input=RESULT.json and --plots=DIR are both required")
        for path in write_plots(read_result(FLAGS.input), FLAGS.plots):
            print(path)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_flags)
