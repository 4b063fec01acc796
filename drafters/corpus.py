"""A distillation corpus of the target's own predictions and layer features, built on the device.

Each record is one token sequence (prompt + response) with, at every position ``t``:

* ``labels[t]``: the target's greedy next token after ``tokens[: t + 1]`` (what verification
  accepts), so a drafter learns the target's choices, not the data set's words;
* ``features[t]``: the target's residual stream after each of ``layers`` (e.g. EAGLE-3's low,
  middle and high taps), concatenated: ``[n * E]``, stored as bfloat16.

Two ways to get the sequences (both batched forwards of the target, see
``experiments/build_corpus.py``):

* **teacher-forced**: a data set's own prompt + response, one forward each (hundreds of
  positions per second on a 2-core CPU); the responses are not the target's, the labels are.
* **regenerated**: the target answers the prompts greedily (:func:`specjax.decode.generate`),
  then one forward over prompt + answer; there ``labels[t] == tokens[t + 1]`` inside the answer.

On disk (``out_dir``): ``shard-00000.npz`` ... (``tokens``, ``labels`` int32[n, W], ``lengths``,
``prompt_lengths`` int32[n], ``features`` uint16[n, W, n_layers * E]: bf16 bits), one per
``shard_size`` input sequences, atomically; ``progress.json`` (complete shards, a fingerprint of
the inputs: a rerun with the same inputs resumes) and last ``manifest.json`` (counts, timing,
the command; a directory without one is incomplete).

Axis glossary: N records, B batch, W sequence width, E target width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax import masks
from specjax.decode import DecodeConfig, generate
from specjax.drafter import features_of
from drafters import shards as shard_io
from specjax.files import write_text_atomic

FORMAT = "specjax-corpus-v1"
MANIFEST, PROGRESS = shard_io.MANIFEST, shard_io.PROGRESS
PATHS = ("teacher_forced", "regenerated")
FIELDS = ("tokens", "labels", "lengths", "prompt_lengths", "features")  # of a shard
# Positions per forward call: the batch is ``POSITIONS_PER_CALL // W`` rows of width ``W``.
POSITIONS_PER_CALL = 2048
WIDTH_STEP = 64


class CorpusError(ValueError):
    """A corpus directory that is missing, incomplete, damaged or made with another target."""


def default_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high taps (0-based: the output of layer ``i``):
    ``(2, L // 2, L - 3)``; ``(0, L // 2, L - 1)`` below 4 layers, all of them below 3."""
    if num_layers < 3:
        return tuple(range(num_layers))
    return (0, num_layers // 2, num_layers - 1) if num_layers < 4 else \
        (2, num_layers // 2, num_layers - 3)


def parse_layers(value) -> tuple:
    """``feature_layers`` from a sequence of ints or text such as ``"2:15:27"`` (``,`` ``:``
    ``/`` or spaces between)."""
    if isinstance(value, str):
        try:
            return tuple(int(x) for x in re.split(r"[,:/ ]+", value.strip()) if x)
        except ValueError:
            raise ValueError(f"feature_layers: expected integers such as 2:15:27, got {value!r}"
                             ) from None
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(i) for i in value)


# The forward -------------------------------------------------------------------------------


def _labels_and_features(model, params, tokens, layers):
    b, w = tokens.shape
    cache = model.init_cache(b, w)
    positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    out = model.forward(params, tokens, positions, cache, masks.causal_mask(cache.lengths, w, w),
                        hidden_layers=layers)
    labels = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
    feats = features_of(out, layers)
    return labels, feats.astype(jnp.bfloat16)


_labels_and_features_jit = jax.jit(_labels_and_features, static_argnames=("model", "layers"))


def labels_and_features(model, params, tokens: np.ndarray, layers: Sequence[int]):
    """``(labels int32[B, W], features bf16[B, W, n * E])`` of one causal forward over
    ``tokens int32[B, W]`` (the target's greedy next token and its taps at every position)."""
    return _labels_and_features_jit(model, params, jnp.asarray(tokens, jnp.int32),
                                    tuple(int(i) for i in layers))


def _width(n: int) -> int:
    return max(WIDTH_STEP, -(-n // WIDTH_STEP) * WIDTH_STEP)


def _forward_rows(model, params, seqs: list[list[int]], layers) -> list:
    """``(labels, features)`` numpy arrays for each sequence (length order inside, so rows of a
    call share a width; returned in input order)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list = [None] * len(seqs)
    i = 0
    while i < len(order):
        w = _width(len(seqs[order[i]]))
        rows = max(1, POSITIONS_PER_CALL // w)
        group = [j for j in order[i:i + rows] if _width(len(seqs[j])) <= w] or [order[i]]
        w = _width(max(len(seqs[j]) for j in group))
        toks = np.zeros((rows, w), np.int32)
        for r, j in enumerate(group):
            toks[r, :len(seqs[j])] = seqs[j]
        labels, feats = labels_and_features(model, params, toks, layers)
        labels, feats = np.asarray(labels), np.asarray(feats).view(np.uint16)
        for r, j in enumerate(group):
            n = len(seqs[j])
            out[j] = (labels[r, :n], feats[r, :n])
        i += len(group)
    return out


def _respond(model, params, prompts: list[list[int]], max_new_tokens: int, eos_ids,
             batch_size: int) -> list[list[int]]:
    """Greedy responses (rows padded to ``batch_size`` with a repeated prompt)."""
    config = DecodeConfig(max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids))
    answers = []
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        real = len(batch)
        batch = batch + [batch[-1]] * (batch_size - real)
        out = generate(model, params, batch, config)
        toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
        answers += [toks[i, :lens[i]].tolist() for i in range(real)]
    return answers


# Building ----------------------------------------------------------------------------------


def build(model, params, examples: Sequence[tuple[Sequence[int], Sequence[int]]], out_dir: str,
          *, path: str = "teacher_forced", layers: Optional[Sequence[int]] = None,
          max_len: int = 512, shard_size: int = 64, max_new_tokens: int = 256,
          eos_ids: Sequence[int] = (), gen_batch_size: int = 16, model_name: str = "",
          source: str = "", command: str = "", progress: bool = False) -> dict:
    """Writes a corpus of ``examples`` (``(prompt ids, response ids)``; responses are ignored
    on the ``regenerated`` path) to ``out_dir`` and returns its manifest.

    Sequences are cut to ``max_len`` tokens; examples whose prompt alone reaches ``max_len`` are
    skipped (counted). Resumes an interrupted run with the same inputs.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if max_len < 2 or shard_size < 1 or gen_batch_size < 1 or max_new_tokens < 1:
        raise ValueError("max_len must be >= 2 and shard_size, gen_batch_size, max_new_tokens "
                         ">= 1")
    layers = tuple(int(i) for i in (layers if layers is not None
                                    else default_layers(model.num_layers)))
    if not layers or any(not 0 <= i < model.num_layers for i in layers):
        raise ValueError(f"layers must be in 0..{model.num_layers - 1}, got {layers}")
    kept = [(list(map(int, p)), list(map(int, r))) for p, r in examples if len(p) < max_len]
    if not kept:
        raise ValueError(f"every prompt has max_len={max_len} tokens or more")
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise FileExistsError(f"{out_dir} already holds a corpus: pick a new directory")
    os.makedirs(out_dir, exist_ok=True)
    digest = hashlib.sha256()
    for p, r in kept:
        digest.update(json.dumps([p, r if path == "teacher_forced" else []]).encode())
    digest.update(json.dumps([path, layers, max_len, shard_size, max_new_tokens,
                              list(map(int, eos_ids)), model.hidden_size,
                              model.vocab_size]).encode())
    fingerprint = digest.hexdigest()[:32]
    done = shard_io.complete_shards(out_dir, fingerprint, CorpusError, "corpus")
    chunks = range(len(done) * shard_size, len(kept), shard_size)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(kept), initial=min(len(done) * shard_size, len(kept)),
                   unit="seq", desc=f"corpus ({path})", dynamic_ncols=True)
    try:
        for start in chunks:
            t0 = time.time()
            part = kept[start:start + shard_size]
            prompts = [p for p, _ in part]
            if path == "regenerated":
                answers = _respond(model, params, prompts, max_new_tokens, eos_ids,
                                   gen_batch_size)
            else:
                answers = [r for _, r in part]
            seqs = [(p + a)[:max_len] for p, a in zip(prompts, answers)]
            gen_s = time.time() - t0
            rows = _forward_rows(model, params, seqs, layers)
            width = _width(max(len(s) for s in seqs))
            n, fw = len(seqs), rows[0][1].shape[-1]
            tokens = np.zeros((n, width), np.int32)
            labels = np.zeros((n, width), np.int32)
            feats = np.zeros((n, width, fw), np.uint16)
            for i, (s, (lab, f)) in enumerate(zip(seqs, rows)):
                tokens[i, :len(s)], labels[i, :len(s)], feats[i, :len(s)] = s, lab, f
            lengths = np.array([len(s) for s in seqs], np.int32)
            name = f"shard-{len(done):05d}.npz"
            shard_io.save_npz_atomic(os.path.join(out_dir, name), tokens=tokens, labels=labels,
                             features=feats, lengths=lengths,
                             prompt_lengths=np.array([min(len(p), len(s)) for p, s in
                                                      zip(prompts, seqs)], np.int32))
            done.append({"file": name, "num_records": n, "width": width,
                           "positions": int(lengths.sum()),
                           "response_positions": int(sum(len(s) - len(p) for p, s in
                                                         zip(prompts, seqs))),
                           "generate_s": round(gen_s, 2),
                           "forward_s": round(time.time() - t0 - gen_s, 2)})
            write_text_atomic(os.path.join(out_dir, PROGRESS), json.dumps(
                {"fingerprint": fingerprint, "shards": done}, indent=1) + "\n")
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    positions = sum(s["positions"] for s in done)
    forward_s = sum(s["forward_s"] for s in done)
    gen_s = sum(s["generate_s"] for s in done)
    manifest = {
        "format": FORMAT, "model": model_name, "hidden_size": int(model.hidden_size),
        "vocab_size": int(model.vocab_size), "num_layers": int(model.num_layers),
        "layers": list(layers), "path": path, "max_len": max_len,
        "max_new_tokens": max_new_tokens if path == "regenerated" else None,
        "num_records": sum(s["num_records"] for s in done), "positions": positions,
        "response_positions": sum(s["response_positions"] for s in done),
        "skipped_long_prompts": len(examples) - len(kept),
        "forward_positions_per_s": round(positions / max(forward_s, 1e-9), 1),
        "generated_tokens_per_s": (round(sum(s["response_positions"] for s in done)
                                         / max(gen_s, 1e-9), 1) if path == "regenerated"
                                   else None),
        "source": source, "command": command, "shards": done}
    write_text_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    os.unlink(os.path.join(out_dir, PROGRESS))
    return manifest


# Reading -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    """Records in memory (numpy, right-padded to the widest ``W``).

    Attributes:
      tokens, labels: int32[N, W]; lengths, prompt_lengths: int32[N];
      features: uint16[N, W, F] (bf16 bit patterns; :meth:`batch` converts);
      manifest: the first directory's manifest (``sources`` lists every directory's).
    """

    tokens: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    features: np.ndarray
    manifest: dict
    origin: Optional[np.ndarray] = None  # int32[N]: index of the directory each record came from

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def layers(self) -> tuple:
        return tuple(self.manifest["layers"])

    def subset(self, idx) -> "Corpus":
        return Corpus(self.tokens[idx], self.labels[idx], self.lengths[idx],
                      self.prompt_lengths[idx], self.features[idx], self.manifest,
                      None if self.origin is None else self.origin[idx])

    def split(self, eval_fraction: float, seed: int = 0) -> tuple["Corpus", "Corpus"]:
        """``(train, held_out)`` by whole records (a seeded shuffle; one of each at least)."""
        n = len(self)
        perm = np.random.default_rng(seed).permutation(n)
        n_eval = min(max(int(round(n * eval_fraction)), 1), n - 1) if n >= 2 else 0
        return self.subset(np.sort(perm[n_eval:])), self.subset(np.sort(perm[:n_eval]))

    def windows(self, seq_len: int, response_only: bool = True) -> np.ndarray:
        """``int64[M, 2]`` (record, start) of every window of ``seq_len`` positions, non-
        overlapping, that holds at least one labelled position (response positions when
        ``response_only``); a window may run past the record's end (masked in :meth:`batch`)."""
        out = []
        for r in range(len(self)):
            first = max(int(self.prompt_lengths[r]) - 1, 0) if response_only else 0
            last = int(self.lengths[r]) - 1
            for s in range(0, last, seq_len):
                if s + seq_len > first:
                    out.append((r, s))
        return np.asarray(out, np.int64).reshape(-1, 2)

    def batch(self, windows: np.ndarray, seq_len: int, response_only: bool = True) -> dict:
        """Windows as arrays: ``tokens int32[B, L + 1]`` (``tokens[:, s]`` sits at position
        ``start + s``), ``labels int32[B, L]`` (the target's next token after position
        ``start + s``), ``features float32[B, L, F]``, ``positions int32[B, L]``, ``valid
        bool[B, L]`` (inside the record) and ``label_mask bool[B, L]`` (valid, and a response
        position when ``response_only``)."""
        w = self.tokens.shape[1]
        idx = windows[:, 1:2] + np.arange(seq_len + 1)[None, :]  # [B, L+1]
        rows = windows[:, :1]
        inside = idx < self.lengths[rows]
        safe = np.minimum(idx, w - 1)
        tokens = np.where(inside, self.tokens[rows, safe], 0).astype(np.int32)
        valid = inside[:, :seq_len]
        labels = np.where(valid, self.labels[rows, safe[:, :seq_len]], 0).astype(np.int32)
        feats = self.features[rows, safe[:, :seq_len]]
        feats = np.where(valid[..., None], feats, 0).view(jnp.bfloat16).astype(np.float32)
        label_mask = valid.copy()
        if response_only:
            label_mask &= idx[:, :seq_len] >= self.prompt_lengths[rows] - 1
        return {"tokens": tokens, "labels": labels, "features": feats,
                "positions": idx[:, :seq_len].astype(np.int32), "valid": valid,
                "label_mask": label_mask}


def read_manifest(corpus_dir: str) -> dict:
    return shard_io.read_manifest(corpus_dir, FORMAT, CorpusError, "not a (complete) corpus; "
                                "build it with python -m experiments.build_corpus")


def read_answers(corpus_dir: str) -> tuple[list, list, dict]:
    """``(prompts, responses, manifest)`` of a REGENERATED corpus: token ids of each record's
    prompt and of the target's own greedy answer (features are not read); CorpusError for a
    teacher-forced corpus, whose responses are a data set's words, not the target's."""
    m = read_manifest(corpus_dir)
    if m.get("path") != "regenerated":
        raise CorpusError(f"{corpus_dir} is a {m.get('path')} corpus: its responses are not "
                          "the target's own; use a regenerated one (build_corpus "
                          "--path=regenerated)")
    prompts, responses = [], []
    for s in m["shards"]:
        part = shard_io.read_shard(os.path.join(corpus_dir, s["file"]),
                                   ("tokens", "lengths", "prompt_lengths"), CorpusError,
                                   "rebuild the corpus")
        for row, n, p in zip(part["tokens"], part["lengths"], part["prompt_lengths"]):
            prompts.append(row[:p].tolist())
            responses.append(row[p:n].tolist())
    return prompts, responses, m


def crop_left(part: dict, max_len: int) -> dict:
    """A shard's records cut to their last ``max_len`` positions (the start of a long prompt
    dropped; what is kept was computed with the whole context, so its labels and features are
    unchanged), arrays narrowed to ``max_len``; ``prompt_lengths`` shift with the cut (at least
    0: a cut into the response keeps its tail)."""
    lengths = np.asarray(part["lengths"])
    drop = np.maximum(lengths - max_len, 0)
    if not drop.any():  # nothing to cut: only narrow the padding
        return {k: (part[k][:, :max_len] if k in ("tokens", "labels", "features") else part[k])
                for k in FIELDS}
    out = {k: np.asarray(part[k]) for k in FIELDS}
    for key in ("tokens", "labels", "features"):
        arr = out[key]
        width = min(arr.shape[1], max_len)
        cut = np.zeros((arr.shape[0], width) + arr.shape[2:], arr.dtype)
        for r in range(arr.shape[0]):
            kept = arr[r, drop[r]:drop[r] + width]
            cut[r, :kept.shape[0]] = kept
        out[key] = cut
    out["lengths"] = (lengths - drop).astype(lengths.dtype)
    out["prompt_lengths"] = np.maximum(np.asarray(part["prompt_lengths"]) - drop, 0).astype(
        lengths.dtype)
    return out


def load(corpus_dirs: Sequence[str], target=None, layers: Optional[Sequence[int]] = None,
         max_len: Optional[int] = None) -> Corpus:
    """Every shard of every directory, checked against ``target`` (sizes) and ``layers``;
    ``origin`` numbers each record's directory (0, 1, ... in ``corpus_dirs`` order). Records
    are padded to the widest one, so ``max_len`` (:func:`crop_left`) keeps a corpus of long
    prompts from widening every other directory's records in memory."""
    if isinstance(corpus_dirs, str):
        corpus_dirs = [corpus_dirs]
    if max_len is not None and max_len < 2:
        raise CorpusError(f"max_len={max_len}: keep at least 2 positions per record")
    parts, manifests, origin = [], [], []
    for number, d in enumerate(corpus_dirs):
        m = read_manifest(d)
        if target is not None and (m["hidden_size"], m["vocab_size"]) != (
                target.hidden_size, target.vocab_size):
            raise CorpusError(f"{d} was made with a target of hidden size {m['hidden_size']} / "
                              f"vocabulary {m['vocab_size']}, this target has "
                              f"{target.hidden_size} / {target.vocab_size}")
        if layers is not None and tuple(m["layers"]) != tuple(layers):
            raise CorpusError(f"{d} holds the features of layers {m['layers']}, the drafter "
                              f"reads {list(layers)}: rebuild the corpus with --layers")
        if manifests and tuple(m["layers"]) != tuple(manifests[0]["layers"]):
            raise CorpusError(f"{d} and {corpus_dirs[0]} hold features of different layers")
        for s in m["shards"]:
            part = shard_io.read_shard(os.path.join(d, s["file"]), FIELDS, CorpusError,
                                       "rebuild the corpus")
            if max_len is not None:
                part = crop_left(part, max_len)
            parts.append(part)
            origin.append(np.full((len(part["lengths"]),), number, np.int32))
        manifests.append(m)
    if not parts:
        raise CorpusError("the corpus holds no records")
    manifest = dict(manifests[0], sources=[m.get("source") for m in manifests],
                    paths=[m.get("path") for m in manifests])
    return Corpus(**{k: shard_io.concat_padded([p[k] for p in parts]) for k in FIELDS},
                  manifest=manifest, origin=np.concatenate(origin))
