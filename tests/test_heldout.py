"""Held-out sets measure generalisation: no held-out record or evaluation prompt restates training data.

Two guards, over the training records of every expert (a held-out record of REASON must not be a
training record of EXPLAIN either, or the cross-expert matrix rewards memory):
- cards: every record lists the cards it names (`"cards": [...]`); a card named by a held-out record
  appears in no training record's text, so each held-out scenario is built on cards the adapters never saw;
- wording: the held-out question shares few content words with any training question (Jaccard), and
  the whole record few content-word pairs with any training record (containment of bigrams).
What they cannot catch: the same rules interaction retold with other cards and other words (e.g. a
"first strike + deathtouch" block asked with two different creatures); that is left to review.
"""

import json
import re

import pytest

from conftest import EXPERTS, ROOT

STOP_WORDS = set(
    "a an the of to and or in on is it its that this these i my me you your we our with for at as by be are was were if what "
    "when does do did can could would should will from have has had into than then so not no but which their they them "
    "there how one two any all each more most only also just get gets got about after before while".split()
)
MAX_QUESTION_JACCARD = 0.35
MAX_BIGRAM_CONTAINMENT = 0.25


def records(expert: str, split: str) -> list[dict]:
    name = f"{expert}_examples.jsonl" if split == "training" else f"{expert}_heldout.jsonl"
    path = ROOT / f"mtg_expert_{expert}" / f"mtg_expert_{expert}" / "data" / split / name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9+/']+", text.lower()) if w not in STOP_WORDS]


def bigrams(text: str) -> set[tuple[str, str]]:
    w = words(text)
    return set(zip(w, w[1:]))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def containment(a: set, b: set) -> float:
    return len(a & b) / max(1, min(len(a), len(b)))


def mentions(text: str, card: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(card.lower())}(?![\w-])", text.lower()) is not None


TRAINING = [(f"{e} training {i}", r) for e in EXPERTS for i, r in enumerate(records(e, "training"), 1)]
HELDOUT = [(f"{e} held-out {i}", r) for e in EXPERTS for i, r in enumerate(records(e, "heldout"), 1)]


def closest(question: str, text: str) -> tuple[float, str, float, str]:
    q, b = set(words(question)), bigrams(text)
    qj, qwhere = max((jaccard(q, set(words(r["input"]))), where) for where, r in TRAINING)
    bc, bwhere = max((containment(b, bigrams(r["input"] + " " + r["output"])), where) for where, r in TRAINING)
    return qj, qwhere, bc, bwhere


def test_every_record_lists_the_cards_it_names():
    for where, record in TRAINING + HELDOUT:
        cards = record.get("cards")
        assert isinstance(cards, list) and all(isinstance(c, str) and c.strip() for c in cards), f"{where}: no 'cards' list"
        text = record["input"] + " " + record["output"]
        missing = [c for c in cards if not mentions(text, c)]
        assert not missing, f"{where}: lists {missing} but does not name them"


def test_heldout_scenarios_use_cards_no_training_record_names():
    seen = []
    for where, record in HELDOUT:
        for card in record["cards"]:
            seen += [f"{where} names {card!r}, as does {other}" for other, r in TRAINING if mentions(r["input"] + " " + r["output"], card)]
    assert not seen, "; ".join(seen[:10])


@pytest.mark.parametrize("where, record", HELDOUT, ids=[w for w, _ in HELDOUT])
def test_heldout_record_is_not_a_rewording_of_training(where, record):
    qj, qwhere, bc, bwhere = closest(record["input"], record["input"] + " " + record["output"])
    assert qj <= MAX_QUESTION_JACCARD, f"{where}: question shares {qj:.2f} of its words with {qwhere}"
    assert bc <= MAX_BIGRAM_CONTAINMENT, f"{where}: {bc:.2f} of its word pairs appear in {bwhere}"


def test_evaluation_prompts_are_new_questions():
    from mtg_core.plugins import Registry

    registry = Registry.discover()
    for name in EXPERTS:
        for prompt in registry.eval_prompts(registry.expert(name)):
            qj, qwhere, _, _ = closest(prompt, prompt)
            assert qj <= MAX_QUESTION_JACCARD, f"{name} evaluation prompt {prompt!r} shares {qj:.2f} of its words with {qwhere}"
