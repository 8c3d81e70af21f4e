"""`mtg-train --list`: one row per expert, per plugin that registers none, per plugin not loaded (an entry
point in a misspelt group included), and one for an allow-list that names nothing.

Each expert row comes from `Registry.check`, which runs every hook and reads every data file the
way a command would, so a plugin author sees every problem at once; building the rows imports no torch.
"""

from __future__ import annotations

import click

from mtg_core.errors import MtgError, PluginError
from mtg_core.plugins import ALLOW_LIST_ENV, Registry
from mtg_core.plugins.targets import default_base_problem

COLUMNS = ["name", "distribution", "version", "rank", "alpha", "dropout", "examples", "status"]


def _row(name: str, kind: str, distribution: str, version: str | None, errors: list[str], warnings: list[str],
         **fields) -> dict:
    row = {"name": name, "kind": kind, "description": None, "plugin": None, "hooks": [], "distribution": distribution,
           "version": version, "rank": None, "alpha": None, "dropout": None, "examples": None, "heldout_examples": None,
           **fields}
    row.update(status="error" if errors else "warning" if warnings else "ok", errors=errors, warnings=warnings,
               error="; ".join(errors) or None)
    return row


def _target_problems(lora) -> list[str]:
    """target_modules against the default base (training checks them again against the base it loads)."""
    if lora is None:
        return []
    try:
        problem = default_base_problem(lora.target_modules)
    except MtgError as exc:
        problem = f"target_modules not checked: {exc}"
    return [problem] if problem else []


def expert_rows(registry: Registry) -> list[dict]:
    rows = []
    plugins = {plugin.name: plugin for plugin in registry.plugins()}
    for expert in registry.experts():
        check, report, plugin = registry.check(expert), registry.plugin_report(expert.plugin), plugins[expert.plugin]
        lora = check.lora
        targets = _target_problems(lora)
        rows.append(_row(expert.name, "expert", expert.distribution, expert.version,
                         [*map(str, check.problems), *targets, *report.errors], [*check.warnings, *report.warnings],
                         description=expert.info.description, plugin=expert.plugin, hooks=list(plugin.hooks),
                         rank=lora.rank if lora else None, alpha=lora.alpha if lora else None,
                         dropout=lora.dropout if lora else None,
                         examples=check.examples, heldout_examples=check.heldout_examples))
    for expert in registry.refused():
        rows.append(_row(expert.name, "expert", expert.distribution, expert.version, [expert.error], [],
                         description=expert.info.description, plugin=expert.plugin,
                         hooks=list(plugins[expert.plugin].hooks)))
    for plugin in plugins.values():
        if plugin.experts:
            continue
        report = registry.plugin_report(plugin.name)
        adds = [hook for hook in plugin.hooks if hook != "mtg_register_experts"]
        rows.append(_row(plugin.name, "plugin", plugin.distribution, plugin.version, list(report.errors),
                         list(report.warnings), plugin=plugin.name, hooks=list(plugin.hooks),
                         description=f"registers no expert; implements {', '.join(adds)}" if adds else None))
    for failure in registry.failures:
        rows.append(_row(failure.plugin, "plugin", failure.distribution, None, [failure.reason], [], plugin=failure.plugin))
    for misplaced in registry.misplaced:
        rows.append(_row(misplaced.plugin, "plugin", misplaced.distribution, None, [], [misplaced.reason], plugin=misplaced.plugin))
    for note in registry.notes:
        rows.append(_row(ALLOW_LIST_ENV, "setting", "-", None, [], [note]))
    return rows


def print_table(rows: list[dict]) -> None:
    cells = [[("-" if row[c] is None else str(row[c])) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(COLUMNS, widths)).rstrip())
    for row, line in zip(rows, cells):
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
        if row["kind"] == "plugin" and row["description"]:
            click.echo(f"    {row['description']}")
        for error in row["errors"]:
            click.echo(f"    {error}")
        for warning in row["warnings"]:
            click.echo(f"    warning: {warning}")
    if not rows:
        click.echo(f"no experts installed (pip install ./mtg_expert_<name>; ${ALLOW_LIST_ENV} may be filtering)")


def refuse_problems(rows: list[dict]) -> None:
    """--strict: a plugin author's CI fails on any row that is not ok (errors and warnings alike)."""
    bad = [f"{row['name']} ({row['status']})" for row in rows if row["status"] != "ok"]
    if bad:
        raise PluginError(f"--strict: {len(bad)} of {len(rows)} rows are not ok: {', '.join(bad)}; "
                          "the errors and warnings listed with them say why")
