"""`mtg-new-expert`: write a new expert package from mtg_core/expert_template, ready to pip install."""

from __future__ import annotations

import string
from pathlib import Path

from mtg_core.errors import ConfigError
from mtg_core.experts import EXPERT_NAME

TEMPLATE_DIR = Path(__file__).parent / "expert_template"
# destination (relative to the new package folder) -> template file
FILES = {
    "pyproject.toml": "pyproject.toml.in",
    "$package/__init__.py": "__init__.py.in",
    "$package/plugin.py": "plugin.py.in",
    "$package/template.txt": "template.txt.in",
    "$package/data/training/${name}_examples.jsonl": "examples.jsonl.in",
    "$package/data/heldout/${name}_heldout.jsonl": "heldout.jsonl.in",
    "tests/test_${name}.py": "test_plugin.py.in",
}


def clash_warning(name: str) -> str | None:
    """A name a shipped expert uses: the package would share its distribution name, so `pip install` replaces it."""
    from mtg_core.plugins import SHIPPED

    if f"mtg-expert-{name}" not in SHIPPED:
        return None
    return (f"{name!r} is a shipped expert: this package is also called mtg-expert-{name}, so installing it replaces "
            f"the shipped one (and reinstalling mtg_core's experts replaces yours); choose another name unless you mean to "
            "replace it")


def next_steps(root: Path) -> str:
    """What to do with the new package; `./` keeps pip from looking the name up on the package index."""
    from mtg_core.plugins.checks import MIN_HELDOUT_EXAMPLES, MIN_TRAINING_EXAMPLES

    where = str(root) if root.is_absolute() or str(root).startswith(".") else f"./{root}"
    return (f"created {root}\nnext: write its data (it ships 2 training and 1 held-out example to show the format; "
            f"a real expert needs at least {MIN_TRAINING_EXAMPLES} and {MIN_HELDOUT_EXAMPLES}: docs/third-party-experts.md), "
            f"edit template.txt and plugin.py, then `pip install {where}` and `mtg-train --list --strict`")


def scaffold(name: str, description: str, parent: Path) -> Path:
    """Create parent/mtg_expert_<name>/ and return it; refuses to touch an existing folder."""
    if not EXPERT_NAME.match(name):
        raise ConfigError(f"expert name {name!r} is invalid: use 1-40 lowercase letters, digits or '_', starting with a letter")
    # it is pasted into pyproject.toml, plugin.py and template.txt (filled with str.format): no quoting there
    if not description.strip() or any(c in description for c in '\n"\\${}'):
        raise ConfigError("--description must be one non-empty line without quotes, backslashes, '$' or braces")
    values = {"name": name, "NAME": name.upper(), "package": f"mtg_expert_{name}", "description": description.strip()}
    root = Path(parent) / values["package"]
    if root.exists():
        raise ConfigError(f"{root} already exists; choose another name or --dest")
    for destination, source in FILES.items():
        path = root / string.Template(destination).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = (TEMPLATE_DIR / source).read_text(encoding="utf-8")
        path.write_text(string.Template(text).safe_substitute(values), encoding="utf-8")
    return root
