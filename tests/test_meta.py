"""Meta-tests (as datasette does): every hookspec is documented and exercised by a test."""

import inspect
from pathlib import Path

from mtg_core import hookspecs

SPECS = [name for name, fn in vars(hookspecs).items() if name.startswith("mtg_") and inspect.isfunction(fn)]
TESTS = "".join(p.read_text() for p in Path(__file__).parent.glob("*.py") if p.name != "test_meta.py")
GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "third-party-experts.md").read_text()


def test_there_are_hookspecs():
    assert len(SPECS) == 6


def test_every_hookspec_has_a_one_line_docstring_and_is_in_the_guide():
    for name in SPECS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc.splitlines()) == 1, name
        assert f"`{name}" in GUIDE, f"{name} is not documented in docs/third-party-experts.md"


def test_every_hookspec_is_exercised_by_a_test():
    for name in SPECS:
        short = name.removeprefix("mtg_")
        assert name in TESTS or f"registry.{short}(" in TESTS, f"no test exercises {name}"
