"""An expert's LoRA `target_modules` checked against the base's layers before any weights load.

peft trains whatever matches and says nothing about a target that matches no layer: a Llama-style
`["q_proj", "gate_proj"]` on Mixtral trains q_proj alone. So every target must match a layer.
"""

from __future__ import annotations

import os

from mtg_core.errors import PluginError

# The layers LoRA can wrap in the Mixtral architecture every preset shares (tiny-mixtral, mixtral-8x7b,
# mixtral-8x7b-instruct), by their last name part. Written out so that `mtg-train --list` checks targets
# without importing torch to build the model; tests/test_targets.py checks it against the meta-device model.
MIXTRAL_LAYERS = ("k_proj", "lm_head", "o_proj", "q_proj", "v_proj", "w1", "w2", "w3")


def linear_names(model) -> list[str]:
    """Full names of the layers peft can put LoRA on (nn.Linear) in a (meta-device) model."""
    from torch import nn

    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def unmatched(targets, names) -> list[str]:
    """Targets that match no layer, by peft's rule: a full name equal to the target or ending in '.' + target."""
    return [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]


def target_problem(targets, names, base: str) -> str | None:
    """The message for targets that match no layer of `base`, or None when every one matches."""
    bad = unmatched(targets, names)
    if not bad:
        return None
    layers = sorted({name.rsplit(".", 1)[-1] for name in names} - {"lm_head"})
    kept = [t for t in targets if t not in bad]
    trains = f"peft would train {', '.join(kept)} alone, without a word" if kept else "peft would refuse to start"
    return (f"LoraSettings.target_modules {', '.join(map(repr, bad))} match{'es' if len(bad) == 1 else ''} no layer of "
            f"{base} ({trains}); its layers are {', '.join(layers)}: name those in mtg_lora_settings")


def check_targets(targets, model, base: str, who: str = "") -> None:
    """Refuse targets that match no layer of `model` (the meta-device model the memory plan builds); `who` begins the message."""
    problem = target_problem(targets, linear_names(model), base)
    if problem:
        raise PluginError(who + problem)


def default_base_problem(targets) -> str | None:
    """--list: the targets checked against the default base, torch-free when it is a preset (all are Mixtral).

    A $MTG_BASE_MODEL folder or hub id is checked against its own config (its meta model needs torch);
    one whose config cannot be read raises its MtgError."""
    from mtg_core.base_models import BASE_MODEL_ENV, PRESETS, TINY

    name = os.environ.get(BASE_MODEL_ENV) or None
    if name is None or name in PRESETS:
        return target_problem(targets, MIXTRAL_LAYERS, name or f"the default base ({TINY} or mixtral-8x7b)")
    from mtg_core.base_models import base_config, choose_base
    from mtg_core.plan import meta_model

    model = meta_model(base_config(choose_base(name, reason=f"set by ${BASE_MODEL_ENV}")))
    return target_problem(targets, linear_names(model), name)
