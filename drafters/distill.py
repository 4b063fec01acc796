"""Self-distillation data for trained drafters: the target's own responses and hidden states.

1. Prompts: token ids (``experiments/spec_bench.py`` reads and encodes prompt files).
2. The target answers them greedily, in batches, with :func:`specjax.decode.generate`.
3. One teacher-forced forward over prompt + response records the target's FINAL-NORM hidden
   state at every position (what ``DraftContext.pending_hidden`` holds during decoding) and the
   tokens.

On disk (``out_dir``): ``shard-00000.npz`` ... each with ``tokens int32[n, W]``,
``lengths int32[n]`` (prompt + response), ``prompt_lengths int32[n]`` and ``hidden [n, W, E]``
(bf16 stored as its uint16 bit pattern, or float32), every file written atomically (temporary
file + rename), then ``manifest.json`` (written last: a directory without one is incomplete).
Meanwhile ``progress.json`` lists the complete shards and a fingerprint of the prompts and
settings: an interrupted run resumes from its last complete shard when restarted with them.

Reading: :func:`load_records` (validated against a target), :func:`split_records`, and for
head drafters :func:`position_dataset` (one example per response position). Other drafters
(e.g. EAGLE-style) can read the full sequences of :class:`Records`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drafters import shards as shard_io
from drafters.shards import complete_shards, concat_padded, read_shard, save_npz_atomic
from specjax import masks
from specjax.decode import DecodeConfig, generate
from specjax.files import write_text_atomic

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT = "specjax-distill-v1"
DTYPES = ("bfloat16", "float32")


class DistillDataError(ValueError):
    """Distillation data that is missing, incomplete, damaged or made with another target."""


# Generation + hidden states ----------------------------------------------------------------------


def _forward_hidden(model, params, tokens):
    b, w = tokens.shape
    cache = model.init_cache(b, w)
    positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    out = model.forward(params, tokens, positions, cache,
                        masks.causal_mask(cache.lengths, w, w),
                        logits_at=jnp.zeros((b, 1), jnp.int32))
    return out.hidden


_forward_hidden_jit = jax.jit(_forward_hidden, static_argnames=("model",))


def teacher_forced_hidden(model, params, tokens: np.ndarray) -> jax.Array:
    """Final-norm hidden states ``[B, W, E]`` of a causal forward over ``tokens int32[B, W]``."""
    return _forward_hidden_jit(model, params, jnp.asarray(tokens, jnp.int32))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def distill(model, params, prompts: Sequence[Sequence[int]], out_dir: str, *,
            max_new_tokens: int = 128, batch_size: int = 16, eos_ids: Sequence[int] = (),
            dtype: str = "bfloat16", shard_size: int = 64, max_prompt_len: Optional[int] = None,
            model_name: str = "", source: str = "", progress: bool = False,
            responses: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """Generates greedy responses to ``prompts`` and writes self-distillation shards.

    Prompts longer than ``max_prompt_len`` tokens are skipped (counted in the manifest). Rows
    are processed in length order (less padding); each ``generate`` call has ``batch_size``
    rows (the last batch is padded with a repeated prompt, whose output is dropped).
    ``responses`` (one per prompt): the target's own greedy answers, already decoded (e.g. a
    regenerated corpus's, :mod:`drafters.corpus`): nothing is generated, only the forward runs.

    Returns:
      the manifest (also written to ``out_dir/manifest.json``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1 or shard_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size, shard_size and max_new_tokens must be >= 1")
    prompts = [list(map(int, p)) for p in prompts]
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts")
    given = None if responses is None else {}
    kept = []
    for i, p in enumerate(prompts):
        if max_prompt_len is None or len(p) <= max_prompt_len:
            if given is not None:
                given[len(kept)] = list(map(int, responses[i]))
            kept.append(p)
    if not kept:
        raise ValueError(f"every prompt is longer than max_prompt_len={max_prompt_len}")
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise FileExistsError(f"{out_dir} already holds distillation data: pick a new directory")
    order = sorted(range(len(kept)), key=lambda i: len(kept[i]))
    config = DecodeConfig(max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids))
    fingerprint = hashlib.sha256(json.dumps([kept, max_new_tokens, list(config.eos_ids), dtype,
                                             shard_size, model.hidden_size, model.vocab_size]
                                            + ([] if given is None else [given])
                                            ).encode()).hexdigest()[:32]
    # The complete shards of an interrupted run.
    shards = complete_shards(out_dir, fingerprint, DistillDataError, "run")
    total = sum(s["num_records"] for s in shards)
    pending: list[tuple[list[int], list[int], np.ndarray]] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(kept), initial=total, unit="prompt", desc="distill",
                   dynamic_ncols=True)

    def flush(rows):
        nonlocal total
        width = max(len(p) + len(r) for p, r, _ in rows)
        n, e = len(rows), rows[0][2].shape[-1]
        tokens = np.zeros((n, width), np.int32)
        hidden = np.zeros((n, width, e), np.float32)
        for i, (p, r, h) in enumerate(rows):
            seq = p + r
            tokens[i, :len(seq)] = seq
            hidden[i, :len(seq)] = h[:len(seq)]
        if dtype == "bfloat16":
            hidden_out = hidden.astype(jnp.bfloat16).view(np.uint16)
        else:
            hidden_out = hidden
        name = f"shard-{len(shards):05d}.npz"
        save_npz_atomic(os.path.join(out_dir, name), tokens=tokens, hidden=hidden_out,
                         lengths=np.array([len(p) + len(r) for p, r, _ in rows], np.int32),
                         prompt_lengths=np.array([len(p) for p, _, _ in rows], np.int32))
        shards.append({"file": name, "num_records": n, "width": width})
        total += n
        _write_json_atomic(os.path.join(out_dir, PROGRESS),
                           {"fingerprint": fingerprint, "shards": shards})

    try:
        for start in range(total, len(order), batch_size):  # rows enter shards in this order
            chunk = order[start:start + batch_size]
            if given is None:
                rows = _respond(model, params, [kept[i] for i in chunk], config, batch_size)
            else:
                rows = _with_hidden(model, params, [kept[i] for i in chunk],
                                    [given[i] for i in chunk], batch_size)
            pending += rows
            while len(pending) >= shard_size:
                flush(pending[:shard_size])
                pending = pending[shard_size:]
            if bar is not None:
                bar.update(len(rows))
        if pending:
            flush(pending)
    finally:  # an interrupted run ends the bar's line (the next run resumes from progress.json)
        if bar is not None:
            bar.close()
    manifest = {"format": FORMAT, "model": model_name, "hidden_size": int(model.hidden_size),
                "vocab_size": int(model.vocab_size), "dtype": dtype,
                "max_new_tokens": max_new_tokens, "eos_ids": list(map(int, eos_ids)),
                "num_records": total, "skipped_long_prompts": len(prompts) - len(kept),
                "max_prompt_len": max_prompt_len, "source": source, "shards": shards}
    _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    os.unlink(os.path.join(out_dir, PROGRESS))
    return manifest


def _respond(model, params, batch, config: DecodeConfig, batch_size: int) -> list:
    """``(prompt, response, hidden [W, E])`` of each prompt of ``batch``: greedy responses, then
    one teacher-forced forward (the last batch is padded with a repeated prompt)."""
    real = len(batch)
    batch = batch + [batch[-1]] * (batch_size - real)
    out = generate(model, params, batch, config)
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    responses = [toks[i, :lens[i]].tolist() for i in range(real)]
    return _with_hidden(model, params, batch[:real], responses, batch_size)


def _with_hidden(model, params, batch, responses, batch_size: int) -> list:
    """``(prompt, response, hidden [W, E])`` of each row: one teacher-forced forward over
    prompt + response (rows padded to ``batch_size`` with the last one)."""
    real = len(batch)
    batch = batch + [batch[-1]] * (batch_size - real)
    responses = list(responses) + [responses[-1]] * (batch_size - real)
    width = _round_up(max(len(p) + len(r) for p, r in zip(batch, responses)), 64)
    seq = np.zeros((batch_size, width), np.int32)
    for i, (p, r) in enumerate(zip(batch, responses)):
        seq[i, :len(p) + len(r)] = p + r
    hidden = np.asarray(teacher_forced_hidden(model, params, seq), np.float32)
    return [(batch[i], responses[i], hidden[i]) for i in range(real)]


# Reading -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Records:
    """Self-distilled sequences (numpy, right-padded to a common width ``W``).

    Attributes:
      tokens: int32[N, W] prompt + response. lengths: int32[N]. prompt_lengths: int32[N].
      hidden: float32[N, W, E] final-norm hidden state at every position (0 past lengths).
      manifest: the data set's manifest.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    hidden: np.ndarray
    manifest: dict

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def subset(self, idx) -> "Records":
        return Records(self.tokens[idx], self.lengths[idx], self.prompt_lengths[idx],
                       self.hidden[idx], self.manifest)


def read_manifest(data_dir: str) -> dict:
    return shard_io.read_manifest(data_dir, FORMAT, DistillDataError,
                                "not a (complete) distillation data directory; generate it "
                                "with experiments/train_drafter.py --prompts=...")


def load_records(data_dir: str, target=None) -> Records:
    """All shards of ``data_dir`` (float32 hidden states).

    Raises:
      DistillDataError: no manifest, a missing / damaged shard, or (when ``target`` is given)
        data made with a target of another hidden size or vocabulary.
    """
    manifest = read_manifest(data_dir)
    if target is not None and (manifest["hidden_size"] != target.hidden_size
                               or manifest["vocab_size"] != target.vocab_size):
        raise DistillDataError(
            f"{data_dir} was made with a target of hidden size {manifest['hidden_size']} / "
            f"vocabulary {manifest['vocab_size']} ({manifest.get('model') or 'unknown'}), this "
            f"target has {target.hidden_size} / {target.vocab_size}")
    parts = []
    for shard in manifest["shards"]:
        path = os.path.join(data_dir, shard["file"])
        part = read_shard(path, ("tokens", "hidden", "lengths", "prompt_lengths"),
                          DistillDataError, "regenerate the data")
        if manifest["dtype"] == "bfloat16":
            part["hidden"] = part["hidden"].view(jnp.bfloat16).astype(np.float32)
        if part["tokens"].shape[0] != shard["num_records"]:
            raise DistillDataError(f"shard {path} has {part['tokens'].shape[0]} records, the "
                                   f"manifest says {shard['num_records']}")
        parts.append(part)
    if not parts:
        raise DistillDataError(f"{data_dir} holds no records")
    return Records(**{k: concat_padded([p[k] for p in parts]) for k in
                      ("tokens", "lengths", "prompt_lengths", "hidden")}, manifest=manifest)


def concat_records(parts: Sequence[Records]) -> Records:
    """Several data sets as one (right-padded to the widest); the first one's manifest, with
    ``sources`` listing every part's. Raises ``DistillDataError`` when their hidden sizes or
    vocabularies differ."""
    if not parts:
        raise DistillDataError("no data sets to concatenate")
    first = parts[0].manifest
    for r in parts[1:]:
        if (r.manifest["hidden_size"], r.manifest["vocab_size"]) != (first["hidden_size"],
                                                                   first["vocab_size"]):
            raise DistillDataError("data sets made with different targets cannot be combined: "
                                   f"{r.manifest.get('model')} vs {first.get('model')}")
    manifest = dict(first, sources=[r.manifest.get("source") for r in parts])
    return Records(**{k: concat_padded([getattr(r, k) for r in parts]) for k in
                      ("tokens", "lengths", "prompt_lengths", "hidden")}, manifest=manifest)


def split_records(records: Records, eval_fraction: float, seed: int = 0
                  ) -> tuple[Records, Records]:
    """``(train, held_out)`` by whole sequences (a seeded shuffle; at least one of each when
    there are two or more records)."""
    n = len(records)
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = int(round(n * eval_fraction))
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    return records.subset(np.sort(perm[n_eval:])), records.subset(np.sort(perm[:n_eval]))


def position_dataset(records: Records, num_future: int, response_only: bool = True) -> dict:
    """One example per position ``t`` whose next token is known, for head training.

    Example ``(row, t)``: ``hidden = hidden[row, t]``, ``tokens = tokens[row, t+1 : t+2+K]``
    (``K = num_future``; entry 0 is the target's next token, entry ``1 + k`` head ``k``'s
    label) and ``mask[k]`` whether label ``k`` exists. With ``response_only`` (default) only
    positions from ``prompt_length - 1`` on are used: their next tokens are the target's own
    greedy choices. Positions without any label are dropped.

    Returns:
      ``{"hidden": float32[M, E], "tokens": int32[M, K + 1], "mask": bool[M, K]}``.
    """
    rows, cols = [], []
    for r in range(len(records)):
        start = int(records.prompt_lengths[r]) - 1 if response_only else 0
        stop = int(records.lengths[r]) - 2  # t + 2 < length: head 0 has a label
        for t in range(max(start, 0), stop):
            rows.append(r)
            cols.append(t)
    rows, cols = np.array(rows, np.int64), np.array(cols, np.int64)
    offs = cols[:, None] + 1 + np.arange(num_future + 1)[None, :]
    width = records.tokens.shape[1]
    tokens = records.tokens[rows[:, None], np.minimum(offs, width - 1)]
    present = offs < records.lengths[rows][:, None]
    tokens = np.where(present, tokens, 0).astype(np.int32)
    return {"hidden": records.hidden[rows, cols].astype(np.float32), "tokens": tokens,
            "mask": present[:, 1:]}
