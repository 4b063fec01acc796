"""Prompts: Spec-Bench questions for the benchmarks (the jsonl, task groups, encoding) and the
prompt files of self-distillation (:func:`read_prompt_texts`, :func:`encode_prompts`)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Optional, Sequence

from experiments import common

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
            "humanities")
GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
BYTE_PROMPT_LEN = 48  # one bucket (64): one compile per method




@dataclasses.dataclass
class Prompt:
    question_id: object
    group: str
    category: str
    text: str
    ids: list = dataclasses.field(default_factory=list)


def group_of(category: str) -> str:
    return "mt_bench" if category in MT_BENCH else category


def read_prompts(path: str, per_category: int,
                 categories: Optional[Sequence[str]] = None) -> list[Prompt]:
    """``per_category`` first-turn prompts per task group, groups in :data:`GROUPS` order (then
    any other group in file order); within a group, round-robin over its original categories.

    Raises:
      UserError: missing/malformed file, unknown category names, nothing selected.
    """
    if not os.path.isfile(path):
        raise common.UserError(f"--prompts {path!r} does not exist (Spec-Bench question jsonl)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["turns"][0]
                cat = str(row["category"])
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise common.UserError(f"{path}:{n}: not a Spec-Bench question (needs "
                                       f"'category' and a non-empty 'turns' list): {e}") from None
            if not isinstance(text, str) or not text.strip():
                raise common.UserError(f"{path}:{n}: the first turn is empty")
            rows.append(Prompt(row.get("question_id", n), group_of(cat), cat, text))
    if not rows:
        raise common.UserError(f"--prompts {path!r} holds no questions")
    wanted = None
    if categories:
        known = {r.group for r in rows} | {r.category for r in rows}
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise common.UserError(f"unknown --categories {unknown}; the file has "
                                   f"{', '.join(sorted(known))}")
        wanted = set(categories)
        rows = [r for r in rows if r.group in wanted or r.category in wanted]
    by_group: dict[str, dict[str, list[Prompt]]] = collections.OrderedDict()
    for r in rows:
        by_group.setdefault(r.group, collections.OrderedDict()).setdefault(r.category, []).append(r)
    order = [g for g in GROUPS if g in by_group] + [g for g in by_group if g not in GROUPS]
    selected = []
    for g in order:
        queues = [collections.deque(v) for v in by_group[g].values()]
        picked = []
        while len(picked) < per_category and any(queues):
            for q in queues:
                if q and len(picked) < per_category:
                    picked.append(q.popleft())
        selected.extend(picked)
    return selected


def encode_prompt(tokenizer, text: str, vocab_size: int, chat: bool = True) -> list[int]:
    """Chat-templated ids (first user turn) when ``chat`` and the tokenizer has a template,
    else the text's own ids (a raw completion prompt, special tokens such as BOS added); byte
    ids for models without a tokenizer."""
    if tokenizer is None:
        return [b % vocab_size for b in text.encode("utf-8")[:BYTE_PROMPT_LEN]]
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def split_texts(path: str, eval_per_category: int, split: str) -> list[str]:
    """First-turn texts of a Spec-Bench jsonl, split by the benchmark's own selection: ``eval``
    is exactly what ``experiments.benchmark --per_category=eval_per_category`` measures (and so
    every smaller ``--per_category``), ``train`` every other question, ``all`` both; grouped in
    :data:`GROUPS` order like :func:`read_prompts`.

    Raises:
      UserError: as :func:`read_prompts`; an unknown ``split``.
    """
    if split not in ("train", "eval", "all"):
        raise common.UserError(f"split {split!r}: give train, eval or all")
    everything = read_prompts(path, 10 ** 9)
    held = ({(r.question_id, r.text) for r in read_prompts(path, eval_per_category)}
            if eval_per_category > 0 else set())
    if split != "all":
        everything = [r for r in everything
                      if ((r.question_id, r.text) in held) == (split == "eval")]
    return [r.text for r in everything]


def define_split_flags(fv=None) -> None:
    """``--spec_bench_split`` and ``--spec_bench_eval_per_category`` in ``fv`` (default absl's
    global flags): how a binary that trains on a Spec-Bench jsonl keeps the benchmark's own
    questions out (:func:`split_texts`)."""
    from absl import flags
    fv = flags.FLAGS if fv is None else fv
    flags.DEFINE_enum("spec_bench_split", "train", ["train", "eval", "all"],
                      "A Spec-Bench jsonl of prompts: train = every question the benchmark does "
                      "not measure at --per_category=--spec_bench_eval_per_category; eval = "
                      "exactly those; all = both.", flag_values=fv)
    flags.DEFINE_integer("spec_bench_eval_per_category", 5, "The questions per task group held "
                         "out of a Spec-Bench train split (experiments.benchmark's "
                         "--per_category default).", lower_bound=0, flag_values=fv)


def training_texts(path: str, limit: Optional[int], offset: int, fv) -> tuple[list[str], str]:
    """``(texts, description)`` of a prompt file for training or distillation: a Spec-Bench
    jsonl through its ``--spec_bench_split`` (flags of :func:`define_split_flags` in ``fv``),
    any other file as :func:`read_prompt_texts`; then ``[offset:offset + limit]``.

    Raises:
      UserError: as :func:`read_prompts`; OSError / ValueError: as :func:`read_prompt_texts`.
    """
    if not path.endswith(".jsonl"):
        return read_prompt_texts(path, limit, offset), path
    texts = split_texts(path, fv.spec_bench_eval_per_category, fv.spec_bench_split)
    end = None if limit is None else offset + limit
    described = (f"{path} ({fv.spec_bench_split} split, {fv.spec_bench_eval_per_category} per "
                 "group held out)")
    if not texts[offset:end]:
        raise ValueError(f"{described} gave no prompts (offset={offset}, limit={limit})")
    return texts[offset:end], described


# Prompt files for self-distillation ------------------------------------------------------------


def read_prompt_texts(path: str, limit: Optional[int] = None, offset: int = 0) -> list[str]:
    """Prompt texts from a Spec-Bench jsonl (first turn of each question) or a text file (one
    prompt per non-empty line; any file not ending in ``.jsonl``).

    Args:
      limit: keep at most this many (after ``offset``).
      offset: skip this many first.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    text = json.loads(line)["turns"][0]
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a Spec-Bench question (needs a "
                                     f"non-empty 'turns' list): {e}") from None
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{path}:{n}: the first turn is empty")
                texts.append(text)
            else:
                texts.append(line.rstrip("\n"))
    texts = texts[offset:]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ValueError(f"prompt file {path!r} gave no prompts (offset={offset}, limit={limit})")
    return texts


def encode_prompts(tokenizer, texts: Sequence[str], chat: bool = True) -> list[list[int]]:
    """Token ids of ``texts``: through the chat template (a single user turn, generation
    prompt added) when ``chat`` and the tokenizer has one, else plain ``encode``."""
    out = []
    for text in texts:
        if chat and tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True)
            out.append(tokenizer.encode(rendered, add_special_tokens=False))
        else:
            out.append(tokenizer.encode(text))
    return out
