"""Plain data exchanged between plugins and the trainer, validated on construction.

Validation messages name the class, the field, the value and what is allowed, nothing else: attrs'
own validators raise with the `Attribute` repr in the exception's arguments, which a plugin author
would read as noise, so the few checks here are written out.
"""

from __future__ import annotations

import re
import string
from importlib.resources import files
from pathlib import Path
from typing import Any

import attrs

from mtg_core.hookspecs import hookimpl

EXPERT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# All of Mixtral's Linear layers: attention and the per-expert MLPs (see mtg_core.moe).
MIXTRAL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
TEMPLATE_FIELD = "input"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(instance, attribute, wanted: str, value: Any) -> None:
    raise ValueError(f"{type(instance).__name__}: {attribute.name} must be {wanted}, got {_shown(value)}")


def _number(low: float, high: float, *, integer: bool = False, low_open: bool = False, high_open: bool = False):
    """A validator for low <= value <= high (or < where open); bools and NaN are refused."""
    kinds = (int,) if integer else (int, float)

    def check(instance, attribute, value):
        above = isinstance(value, kinds) and (low < value if low_open else low <= value)
        below = isinstance(value, kinds) and (value < high if high_open else value <= high)
        if isinstance(value, bool) or not (above and below):
            bounds = f"{low:g} {'<' if low_open else '<='} {attribute.name} {'<' if high_open else '<='} {high:g}"
            _refuse(instance, attribute, f"{'an integer' if integer else 'a number'} with {bounds}", value)

    return check


def _float(value: Any) -> Any:
    """Numbers become floats; anything else is left for the validator to refuse by name."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _tuple(value: Any) -> Any:
    """Lists become tuples; a str is left alone so that it is refused, not split into characters."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _path(value: Any) -> Any:
    return Path(value) if isinstance(value, (str, Path)) else value


def _expert_name(instance, attribute, value):
    if not isinstance(value, str) or not EXPERT_NAME.match(value):
        _refuse(instance, attribute, "1-40 lowercase letters, digits or '_', starting with a letter", value)


def _one_line(instance, attribute, value):
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        _refuse(instance, attribute, "one non-empty line of text", value)


def _text(instance, attribute, value):
    if not isinstance(value, str):
        _refuse(instance, attribute, "a str", value)


def _strings(instance, attribute, value):
    if not isinstance(value, tuple) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        _refuse(instance, attribute, "a non-empty list of non-empty strings", value)


def _a_path(instance, attribute, value):
    if not isinstance(value, Path):
        _refuse(instance, attribute, "a path (str or pathlib.Path)", value)


def _instance(kind: type):
    def check(instance, attribute, value):
        if not isinstance(value, kind):
            _refuse(instance, attribute, f"a mtg_core.{kind.__name__}", value)

    return check


@attrs.frozen
class ExpertInfo:
    """What `mtg_register_experts` returns: an expert's name and a one-line description."""

    name: str = attrs.field(validator=_expert_name)
    description: str = attrs.field(validator=_one_line)


@attrs.frozen
class LoraSettings:
    """An expert's LoRA hyper-parameters (peft's LoraConfig fields of the same meaning)."""

    rank: int = attrs.field(validator=_number(1, 1024, integer=True))
    alpha: float = attrs.field(converter=_float, validator=_number(0, 4096, low_open=True))
    dropout: float = attrs.field(converter=_float, validator=_number(0, 1, high_open=True))
    target_modules: tuple[str, ...] = attrs.field(default=MIXTRAL_LINEAR_MODULES, converter=_tuple, validator=_strings)


@attrs.frozen
class DataFiles:
    """Where an expert's JSONL data lives: `train` for training, `heldout` for evaluation only."""

    train: Path = attrs.field(converter=_path, validator=_a_path)
    heldout: Path = attrs.field(converter=_path, validator=_a_path)


@attrs.frozen
class FormattedExample:
    """One record rendered by an expert's template: the model sees `prompt` and learns `completion`."""

    prompt: str = attrs.field(validator=_text)
    completion: str = attrs.field(validator=_text)


class TemplateError(ValueError):
    """A prompt template that str.format would fill wrongly or not at all."""


def check_template(text: str, source: str) -> None:
    """Refuse a template that lacks {input} or has braces str.format would misread, naming the line."""
    parts = string.Formatter().parse(text)  # lazy: an error surfaces at the part that holds it
    position, has_input = 0, False
    while True:
        try:
            literal, field, spec, conversion = next(parts)
        except StopIteration:
            break
        except ValueError as exc:  # a lone "{" or "}"
            brace = min((i for i in (text.find("{", position), text.find("}", position)) if i >= 0), default=position)
            raise TemplateError(
                f"{source}:{text.count(chr(10), 0, brace) + 1}: {exc}; write a literal brace doubled ({{{{ or }}}})"
            ) from None
        # the literal comes back with "{{" and "}}" collapsed to one brace: count them twice
        position += len(literal) + literal.count("{") + literal.count("}")
        if field is None:
            continue
        if field != TEMPLATE_FIELD:
            raise TemplateError(
                f"{source}:{text.count(chr(10), 0, position) + 1}: {{{field}}} is not a placeholder (only "
                f"{{{TEMPLATE_FIELD}}} is filled); write a literal brace doubled: {{{{{field}}}}}"
            )
        has_input = True
        position += 2 + len(field) + (len(spec) + 1 if spec else 0) + (len(conversion) + 1 if conversion else 0)
    if not has_input:
        raise TemplateError(
            f"{source}: no {{{TEMPLATE_FIELD}}} placeholder, so the question would never reach the model; "
            f"add {{{TEMPLATE_FIELD}}} where the question goes"
        )


@attrs.frozen
class PackagedExpert:
    """An expert whose template and data ship inside its Python package, laid out as:

    <package>/template.txt                      filled with str.format: {input} is the question
    <package>/data/training/<name>_examples.jsonl
    <package>/data/heldout/<name>_heldout.jsonl

    An instance is a pluggy plugin: point the package's entry point at it. Plugins with other needs
    implement the hooks in mtg_core.hookspecs directly.
    """

    info: ExpertInfo = attrs.field(validator=_instance(ExpertInfo))
    lora: LoraSettings = attrs.field(validator=_instance(LoraSettings))
    package: str = attrs.field(validator=_one_line)
    eval_prompts: tuple[str, ...] = attrs.field(converter=_tuple, validator=_strings)

    @property
    def root(self) -> Path:
        return Path(str(files(self.package)))

    def template(self) -> str:
        path = self.root / "template.txt"
        try:
            text = path.read_text(encoding="utf-8").rstrip()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no such file; if the package was installed without it, add \"template.txt\" to "
                f"[tool.setuptools.package-data] {self.package} in its pyproject.toml and reinstall"
            ) from None
        check_template(text, str(path))
        return text

    @hookimpl
    def mtg_register_experts(self) -> list[ExpertInfo]:
        return [self.info]

    @hookimpl
    def mtg_lora_settings(self, expert: str) -> LoraSettings | None:
        return self.lora if expert == self.info.name else None

    @hookimpl
    def mtg_data_files(self, expert: str) -> DataFiles | None:
        if expert != self.info.name:
            return None
        data = self.root / "data"
        return DataFiles(
            train=data / "training" / f"{expert}_examples.jsonl",
            heldout=data / "heldout" / f"{expert}_heldout.jsonl",
        )

    @hookimpl
    def mtg_format_example(self, expert: str, record: dict[str, Any]) -> FormattedExample | None:
        if expert != self.info.name:
            return None
        prompt = self.template().format(input=record["input"].strip())
        return FormattedExample(prompt=prompt, completion=record["output"].strip())

    @hookimpl
    def mtg_eval_prompts(self, expert: str) -> list[str]:
        return list(self.eval_prompts) if expert == self.info.name else []
