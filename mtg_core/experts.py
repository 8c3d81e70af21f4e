"""Plain data exchanged between plugins and the trainer, validated on construction."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import attrs

from mtg_core.hookspecs import hookimpl

EXPERT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# All of Mixtral's Linear layers: attention and the per-expert MLPs (see mtg_core.moe).
MIXTRAL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")


def _check_name(instance, attribute, value):
    if not EXPERT_NAME.match(value):
        raise ValueError(
            f"expert name {value!r} is invalid: use 1-40 lowercase letters, digits or '_', starting with a letter"
        )


def _one_line(instance, attribute, value):
    if not value.strip() or "\n" in value:
        raise ValueError(f"{attribute.name} must be one non-empty line, got {value!r}")


@attrs.frozen
class ExpertInfo:
    """What `mtg_register_experts` returns: an expert's name and a one-line description."""

    name: str = attrs.field(validator=[attrs.validators.instance_of(str), _check_name])
    description: str = attrs.field(validator=[attrs.validators.instance_of(str), _one_line])


@attrs.frozen
class LoraSettings:
    """An expert's LoRA hyper-parameters (peft's LoraConfig fields of the same meaning)."""

    rank: int = attrs.field(validator=[attrs.validators.instance_of(int), attrs.validators.in_(range(1, 1025))])
    alpha: float = attrs.field(
        converter=float, validator=[attrs.validators.gt(0.0), attrs.validators.le(4096.0)]
    )
    dropout: float = attrs.field(
        converter=float, validator=[attrs.validators.ge(0.0), attrs.validators.lt(1.0)]
    )
    target_modules: tuple[str, ...] = attrs.field(
        default=MIXTRAL_LINEAR_MODULES,
        converter=tuple,
        validator=attrs.validators.min_len(1),
    )


@attrs.frozen
class DataFiles:
    """Where an expert's JSONL data lives: `train` for training, `heldout` for evaluation only."""

    train: Path = attrs.field(converter=Path)
    heldout: Path = attrs.field(converter=Path)


@attrs.frozen
class FormattedExample:
    """One record rendered by an expert's template: the model sees `prompt` and learns `completion`."""

    prompt: str = attrs.field(validator=attrs.validators.instance_of(str))
    completion: str = attrs.field(validator=attrs.validators.instance_of(str))


@attrs.frozen
class PackagedExpert:
    """An expert whose template and data ship inside its Python package, laid out as:

    <package>/template.txt                      with an {input} placeholder
    <package>/data/training/<name>_examples.jsonl
    <package>/data/heldout/<name>_heldout.jsonl

    An instance is a pluggy plugin: point the package's entry point at it. Plugins with other needs
    implement the hooks in mtg_core.hookspecs directly.
    """

    info: ExpertInfo
    lora: LoraSettings
    package: str
    eval_prompts: tuple[str, ...] = attrs.field(converter=tuple)

    @property
    def root(self) -> Path:
        return Path(str(files(self.package)))

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
        template = (self.root / "template.txt").read_text(encoding="utf-8").rstrip()
        return FormattedExample(prompt=template.format(input=record["input"].strip()), completion=record["output"].strip())

    @hookimpl
    def mtg_eval_prompts(self, expert: str) -> list[str]:
        return list(self.eval_prompts) if expert == self.info.name else []
