"""`mtg-new-expert`: scaffold a new expert package (mtg_core.scaffold writes it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from mtg_core.commands.exits import OneLineCommand, reported_errors
from mtg_core.errors import ConfigError
from mtg_core.options import TEXT, ShellPath


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", type=TEXT)
@click.option("--description", "-d", type=TEXT, required=True, help="One line: what the expert does.")
@click.option("--dest", type=ShellPath(file_okay=False), default=".", show_default=True, help="Folder to create it in.")
def new_expert_command(name, description, dest):
    """Create mtg_expert_NAME/, a new expert package to edit, test and `pip install`."""
    from mtg_core.scaffold import clash_warning, next_steps, scaffold

    with reported_errors():
        target = Path(dest) / f"mtg_expert_{name}"
        existed = target.exists()
        try:
            root = scaffold(name, description, Path(dest))
        except OSError as exc:
            if not existed:
                shutil.rmtree(target, ignore_errors=True)  # no half-written package left behind
            raise ConfigError(f"--dest {dest}: cannot create {target} there ({exc.strerror}); choose a writable folder") from None
    click.echo(next_steps(root))
    if clash_warning(name):
        click.echo(f"warning: {clash_warning(name)}", err=True)
