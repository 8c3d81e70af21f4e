"""Meta-tests (as datasette does): every hookspec is documented, checked and exercised by a test, and
every message the guide quotes comes out of a test."""

import inspect
import re
from pathlib import Path

from mtg_core import hookspecs
from mtg_core.plugins import ANSWERS, HOOKS

SPECS = [name for name, fn in vars(hookspecs).items() if name.startswith("mtg_") and inspect.isfunction(fn)]
TESTS = "".join(p.read_text() for p in Path(__file__).parent.glob("*.py") if p.name != "test_meta.py")
GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "third-party-experts.md").read_text()


def test_there_are_hookspecs():
    assert len(SPECS) == 6 and sorted(SPECS) == list(HOOKS)


def test_every_hookspec_has_a_one_line_docstring_and_is_in_the_guide():
    for name in SPECS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc.splitlines()) == 1, name
        assert f"`{name}" in GUIDE, f"{name} is not documented in docs/third-party-experts.md"


def test_every_hookspec_is_exercised_by_a_test():
    for name in SPECS:
        short = name.removeprefix("mtg_")
        assert name in TESTS or f"registry.{short}(" in TESTS, f"no test exercises {name}"


def test_every_hook_answer_is_checked_and_the_guide_says_what_it_must_be():
    assert set(ANSWERS) == set(SPECS)
    rows = {line.split("|")[1].strip(): line for line in GUIDE.splitlines() if line.startswith("| `mtg_")}
    for name in SPECS:
        (row,) = [line for cell, line in rows.items() if cell.startswith(f"`{name}(")]
        assert ANSWERS[name] in row, f"the guide's table does not say {name} must return {ANSWERS[name]}"


def test_every_hook_has_a_wrong_answer_case():
    from test_registry import WRONG_ANSWERS

    assert set(WRONG_ANSWERS) == set(SPECS)


def test_every_message_the_guide_quotes_is_asserted_by_a_test():
    table = GUIDE.split("The mistakes the tests reproduce")[1].split("\n## ")[0]
    quoted = [text for line in table.splitlines() if line.startswith("| `") for text in re.findall(r"`([^`]+)`", line.split("|")[1])]
    assert len(quoted) >= 14
    for text in quoted:
        assert text in TESTS, f"the guide quotes {text!r}, which no test asserts"
