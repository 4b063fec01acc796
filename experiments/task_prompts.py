"""Spec-Bench-style task prompts built from ShareGPT text (never from Spec-Bench itself).

The drafters accept least on the benchmark's task groups whose text ShareGPT's first turns
rarely look like (translation, summarization, retrieval-augmented answers; WORKSPACE
"2026-11-30 (late)"), and the Spec-Bench dev file's train split holds only 210 questions. This
module writes more prompts of those shapes from ShareGPT conversations, in the benchmark's own
formats, so that the target can answer them (``build_corpus --path=regenerated``) and the
drafters can learn the text they will face:

==================  ==========================================================================
group               prompt
==================  ==========================================================================
translation         ``Translate German to English: <sentence>`` for German, French, Spanish,
                    Italian and Portuguese sentences found in ShareGPT turns (stop-word test)
summarization       ``Summarize: <text>``: an English ShareGPT answer of 1.5-4k characters
                    without code (Spec-Bench's articles: median 2.6k characters)
qa                  a one-line ShareGPT question (under 150 characters, ending in ``?``)
rag                 passages, then the question on its own line: the answer the question got
                    in ShareGPT, between one or two other answers (distractors)
math_reasoning      ShareGPT prompts with numbers that ask for an amount (how many / how much /
                    calculate / total / percent)
dialogue            any other ShareGPT first turn under 1500 characters (mt_bench-like)
==================  ==========================================================================

Rows are Spec-Bench jsonl rows (``question_id``, ``category``, ``turns``) so that
``build_corpus --source=FILE --spec_bench_split=all`` reads them. Everything is deterministic
given ``seed`` and the conversations.
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Sequence

GROUPS = ("translation", "summarization", "qa", "rag", "math_reasoning", "dialogue")

_STOP_WORDS = {
    "German": "und der die das nicht ist ich mit für auf ein eine zu von sie wir den dem sich "
              "auch",
    "French": "le la les et est des une un pour que qui dans pas sur avec ce sont nous vous au "
              "du",
    "Spanish": "el la los las y es de que en un una para por con no se del al lo como más",
    "Portuguese": "o a os as e é de que em um uma para com não se do da no na por mais",
    "Italian": "il la le e è di che un una per con non si del della sono in gli anche",
}
_STOP_WORDS = {lang: frozenset(words.split()) for lang, words in _STOP_WORDS.items()}
_ENGLISH = frozenset("the and is of to in that it for with you what do how i my your are can "
                     "this be".split())
_WORD = re.compile(r"[a-zàâçéèêëîïôûùüÿñæœäößáíóúãõ]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MATH = re.compile(r"(?i)\bhow (many|much|long|far)\b|\bcalculate\b|\btotal\b|\bpercent")


def language_of(sentence: str) -> str | None:
    """The language among :data:`_STOP_WORDS`'s whose stop words make at least a quarter of
    ``sentence``'s words (6 words or more) when no English stop word occurs; else None."""
    words = _WORD.findall(sentence.lower())
    if len(words) < 6 or any(w in _ENGLISH for w in words):
        return None
    shares = {lang: sum(w in sw for w in words) / len(words) for lang, sw in _STOP_WORDS.items()}
    best = max(shares, key=shares.get)
    return best if shares[best] >= 0.25 else None


def _plain(text: str) -> bool:
    """No code, markup or tables (what a news sentence or article would not hold)."""
    return not any(ch in text for ch in "`{}<>|#*\\")


def translation_prompts(texts: Iterable[str]) -> list[str]:
    """``Translate <Language> to English: <sentence>`` for each foreign sentence (40-300
    characters, one line, plain) in ``texts``; duplicates dropped."""
    out, seen = [], set()
    for text in texts:
        for sentence in _SENTENCE_END.split(text):
            sentence = sentence.strip()
            if not 40 <= len(sentence) <= 300 or "\n" in sentence or not _plain(sentence):
                continue
            lang = language_of(sentence)
            if lang and sentence not in seen:
                seen.add(sentence)
                out.append(f"Translate {lang} to English: {sentence}")
    return out


def _english_prose(text: str, lo: int, hi: int) -> bool:
    words = _WORD.findall(text.lower())
    return (lo <= len(text) <= hi and _plain(text) and len(words) >= 50
            and sum(w in _ENGLISH for w in words) / len(words) >= 0.1)


def build_rows(turns: Sequence[tuple[str, str]], per_group: int, seed: int = 0) -> list[dict]:
    """Up to ``per_group`` prompts of each of :data:`GROUPS` from ``turns`` (ShareGPT ``(prompt,
    response)`` first turns), as Spec-Bench jsonl rows; each conversation serves at most one
    prompt (translation sentences excepted: they come from every turn's foreign sentences).

    Raises:
      ValueError: ``per_group`` < 1 or no turns.
    """
    if per_group < 1:
        raise ValueError(f"per_group must be at least 1, got {per_group}")
    if not turns:
        raise ValueError("no conversations to build prompts from")
    rng = random.Random(seed)
    order = list(range(len(turns)))
    rng.shuffle(order)
    used: set[int] = set()
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}

    def take(group, pick):
        for i in order:
            if len(groups[group]) >= per_group:
                return
            if i in used:
                continue
            text = pick(i)
            if text:
                used.add(i)
                groups[group].append(text)

    prompt = lambda i: turns[i][0].strip()  # noqa: E731
    answer = lambda i: turns[i][1].strip()  # noqa: E731
    is_question = lambda i: (len(prompt(i)) < 150 and "\n" not in prompt(i)  # noqa: E731
                             and prompt(i).endswith("?") and _plain(prompt(i)))
    take("summarization", lambda i: _english_prose(answer(i), 1500, 4000)
         and f"Summarize: {answer(i)}")

    def rag(i):
        if not (is_question(i) and _english_prose(answer(i), 400, 2500)):
            return None
        others = [j for j in rng.sample(order, 8) if j != i and j not in used
                  and _english_prose(answer(j), 400, 2500)][:rng.choice((1, 2))]
        if not others:
            return None
        passages = [answer(j) for j in others] + [answer(i)]
        rng.shuffle(passages)
        return "\n".join(p.replace("\n", " ") for p in passages) + "\n" + prompt(i)

    take("rag", rag)
    take("qa", lambda i: is_question(i) and prompt(i))
    take("math_reasoning", lambda i: (len(prompt(i)) < 600 and re.search(r"\d", prompt(i))
                                      and _MATH.search(prompt(i)) and _plain(prompt(i))
                                      and prompt(i)))
    take("dialogue", lambda i: 20 <= len(prompt(i)) < 1500 and prompt(i))
    foreign = translation_prompts(t for pair in turns for t in pair)
    rng.shuffle(foreign)
    groups["translation"] = foreign[:per_group]
    rows = []
    for group in GROUPS:
        for text in groups[group]:
            rows.append({"question_id": len(rows), "category": group, "turns": [text]})
    return rows
