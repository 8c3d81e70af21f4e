"""What every command accepts, checked before anything loads: click types for numbers, paths and text, and the
--config file. How a command reports a usage mistake in one line: mtg_core.commands.exits."""

from __future__ import annotations

import math
import os
import re
import tomllib
from pathlib import Path

import click

from mtg_core.plan import OFFLOAD_CHOICES

# Steps, samples, tokens: far beyond any real run, and within every int the libraries take (Trainer, torch, numpy).
MAX_COUNT = 10**9
SEED_MAX = 2**32 - 1  # numpy's seed range; transformers' set_seed seeds numpy, torch and random with it
VARIABLE = re.compile(r"\$(?:\{([^}]*)\}|(\w+))")  # what os.path.expandvars replaces


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (a range check lets nan through: every comparison is false)."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def count(low: int = 1, high: int = MAX_COUNT) -> click.IntRange:
    return click.IntRange(low, high)


SEED = click.IntRange(0, SEED_MAX)


def expand(value: str) -> str:
    """~ and $VARS expanded as a shell would: a TOML value or a quoted '~' never met a shell.

    An unset variable is refused rather than kept literally (a folder named '$HOME' is never meant)."""
    for braced, plain in VARIABLE.findall(value):
        name = braced or plain
        if name not in os.environ:
            raise click.BadParameter(f"{value}: ${name} is not set; set it or write the path out")
    expanded = os.path.expanduser(os.path.expandvars(value))
    if expanded.startswith("~"):
        raise click.BadParameter(f"{value}: cannot expand {expanded.split('/')[0]} (no such user); write the path out")
    return expanded


class ShellPath(click.Path):
    """Every path option: expanded (see `expand`), then click.Path's checks."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not (self.allow_dash and value == "-"):
            value = expand(value)
        return super().convert(value, param, ctx)


class BaseModelName(click.ParamType):
    """--base-model: a preset, a hub id or a folder; a folder is expanded like every path."""

    name = "name"

    def convert(self, value, param, ctx):
        return expand(value) if isinstance(value, str) else value


class Text(click.types.StringParamType):
    """A name, description or question: it must be text. Linux hands over arguments as bytes, and Python keeps
    those that are not UTF-8 as lone surrogates, which a tokenizer or a file name cannot take."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raw = value.encode("utf-8", "surrogateescape")[: exc.start + 1]
            self.fail(f"is not UTF-8 text (byte 0x{raw[-1]:02x} at character {exc.start + 1}); pass it as UTF-8", param, ctx)
        return value


TEXT = Text()


def _config_options(command: click.Command) -> dict[str, click.Option]:
    """Config-file keys: every long option of the command, spelt with '_' or '-' (not --config itself)."""
    keys = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "config":
            for opt in param.opts:
                if opt.startswith("--"):
                    keys[opt[2:].replace("-", "_")] = param
    return keys


def _config_value(param: click.Option, value, ctx: click.Context):
    """A TOML value for `param`, checked as strictly as the command line would (no bool for a number, no float for an int)."""
    kind = param.type
    if param.is_flag:
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(kind, click.types.IntParamType):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(kind, click.types.FloatParamType):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise click.BadParameter(f"{value!r} is not {expected}")
    return kind.convert(value, param, ctx)


def read_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE: a TOML table of the same options; the command line wins (click's default_map)."""
    if value is None:
        return None
    try:
        # utf-8-sig: a BOM (Windows editors write one) is accepted, as in data files
        settings = tomllib.loads(Path(value).read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise click.BadParameter(f"{value}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{value}: not valid TOML ({exc})") from None
    options = _config_options(ctx.command)
    defaults, keys = {}, {}
    for key, setting in settings.items():
        option = options.get(key.replace("-", "_"))
        if option is None:
            raise click.BadParameter(f"{value}: unknown option {key!r}; allowed: {', '.join(sorted(options))}")
        if option.name in keys:
            raise click.BadParameter(f"{value}: {keys[option.name]} and {key} set the same option; keep one")
        keys[option.name] = key
        try:
            defaults[option.name] = _config_value(option, setting, ctx)
        except click.BadParameter as exc:
            raise click.BadParameter(f"{value}: {key} = {exc.message}") from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["mtg_config"] = value  # for messages about what the file set
    return value


def inference_memory_options(command):
    """--quant, --offload-experts, --gpu-memory and --host-memory as mtg-eval and mtg-ask take them (as mtg-train does)."""
    options = [
        click.option("--quant", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True),
        click.option("--offload-experts", type=click.Choice(OFFLOAD_CHOICES), default="auto", show_default=True, help="As for mtg-train."),
        click.option("--gpu-memory", type=FiniteFloat(min=0, min_open=True), metavar="GIB", help="As for mtg-train."),
        click.option("--host-memory", type=FiniteFloat(min=0, min_open=True), metavar="GIB", help="As for mtg-train."),
    ]
    for option in reversed(options):  # as if stacked as decorators, in this order
        command = option(command)
    return command
