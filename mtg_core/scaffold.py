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
