"""Spec-Bench-style task prompts from ShareGPT-like turns (experiments/task_prompts.py)."""

import collections

import pytest

from experiments import task_prompts

ENGLISH = ("The committee met on Tuesday to discuss the budget, and it decided that the new "
           "plan is the best way to fund the schools in the region for the next five years. ")
GERMAN = "Ich habe mit der Frau über das Wetter gesprochen, und sie ist nicht zufrieden."
FRENCH = "Nous sommes dans la ville pour une semaine et le temps est agréable pour les enfants."


def _turns(n=40):
    turns = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            turns.append((f"Who wrote book number {i}?", ENGLISH * 8))  # qa / rag / summary
        elif kind == 1:
            turns.append((f"A shop sells {i} apples at $2 each. How much is the total?",
                          "It is simple."))
        elif kind == 2:
            turns.append((f"{GERMAN} Kannst du helfen {i}?", f"{FRENCH} Merci {i}."))
        elif kind == 3:
            turns.append((f"Write a poem about the sea, number {i}.", ENGLISH * 20))
        else:
            turns.append(("```python\nprint(1)\n```", "code"))
    return turns


def test_language_of_needs_stop_words_and_no_english():
    assert task_prompts.language_of(GERMAN) == "German"
    assert task_prompts.language_of(FRENCH) == "French"
    assert task_prompts.language_of(ENGLISH) is None
    assert task_prompts.language_of("Ich bin da") is None  # under 6 words
    # A foreign sentence with English stop words in it is left out (mixed text).
    assert task_prompts.language_of(GERMAN + " and the rest is English") is None


def test_translation_prompts_use_spec_bench_format_without_duplicates():
    got = task_prompts.translation_prompts([GERMAN, GERMAN, ENGLISH, FRENCH, "Kurz."])
    assert got == [f"Translate German to English: {GERMAN}",
                   f"Translate French to English: {FRENCH}"]


def test_build_rows_fills_every_group_in_spec_bench_rows():
    rows = task_prompts.build_rows(_turns(), per_group=3, seed=1)
    counts = collections.Counter(r["category"] for r in rows)
    assert set(counts) == set(task_prompts.GROUPS)
    assert all(n <= 3 for n in counts.values()) and counts["summarization"] == 3
    assert [r["question_id"] for r in rows] == list(range(len(rows)))
    by_group = collections.defaultdict(list)
    for r in rows:
        assert isinstance(r["turns"], list) and len(r["turns"]) == 1
        by_group[r["category"]].append(r["turns"][0])
    assert all(t.startswith("Summarize: ") for t in by_group["summarization"])
    assert all(t.startswith("Translate ") for t in by_group["translation"])
    assert all(t.endswith("?") and "\n" not in t for t in by_group["qa"])
    assert all("$" in t for t in by_group["math_reasoning"])
    for t in by_group["rag"]:  # passages, then the question on its own last line
        *passages, question = t.split("\n")
        assert question.startswith("Who wrote") and 2 <= len(passages) <= 3
    assert not any("```" in t for texts in by_group.values() for t in texts)
    # Deterministic given the seed; another seed picks other conversations.
    assert task_prompts.build_rows(_turns(), 3, seed=1) == rows
    assert task_prompts.build_rows(_turns(), 3, seed=2) != rows


def test_each_conversation_serves_one_prompt():
    rows = task_prompts.build_rows(_turns(), per_group=50)
    texts = [r["turns"][0] for r in rows if r["category"] in ("qa", "rag")]
    questions = [t.split("\n")[-1] for t in texts]
    assert len(questions) == len(set(questions))


@pytest.mark.parametrize("per_group,turns,match", [(0, _turns(), "at least 1"),
                                                   (2, [], "no conversations")])
def test_bad_arguments(per_group, turns, match):
    with pytest.raises(ValueError, match=match):
        task_prompts.build_rows(turns, per_group)
