"""Hook specifications: everything an expert plugin can tell mtg_core.

Hooks that describe one expert take its name (a str) and are `firstresult`: mtg_core asks them of
the plugin that registered the expert alone; every other plugin returns None. Hooks that collect
(evaluation prompts, trainer callbacks) are called on every plugin, so a cross-cutting plugin can add
to every expert; a wrong answer skips that plugin only (mtg_core.plugins checks every answer), at most
16 evaluation prompts of each plugin are asked per expert, and a callback that takes a noticeable share
of a training step is named with its time. Implementations need `@hookimpl`; the objects they return
(ExpertInfo, LoraSettings, DataFiles, FormattedExample) are described field by field in
docs/third-party-experts.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from mtg_core.experts import DataFiles, ExpertInfo, FormattedExample, LoraSettings

PROJECT = "mtg"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mtg_register_experts() -> list[ExpertInfo]:
    """Return the experts this plugin provides (name and one-line description)."""


@hookspec(firstresult=True)
def mtg_lora_settings(expert: str) -> LoraSettings | None:
    """Return the LoRA rank, alpha, dropout and target modules of `expert`, or None if it is not yours."""


@hookspec(firstresult=True)
def mtg_data_files(expert: str) -> DataFiles | None:
    """Return the training and held-out JSONL files of `expert`, or None if it is not yours."""


@hookspec(firstresult=True)
def mtg_format_example(expert: str, record: dict[str, Any]) -> FormattedExample | None:
    """Turn an {"input", "output"} record into prompt and completion with `expert`'s template (prompt must not use "output")."""


@hookspec
def mtg_eval_prompts(expert: str) -> list[str]:
    """Return questions to ask `expert` when verifying its adapter; every plugin may add some."""


@hookspec
def mtg_trainer_callbacks(expert: str) -> list[TrainerCallback]:
    """Return transformers TrainerCallbacks to attach while training `expert`; every plugin may add some."""
