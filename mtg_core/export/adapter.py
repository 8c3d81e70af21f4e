"""A trained adapter read from ADAPTERS/NAME and checked: a plain LoRA whose every matrix fits its
Mixtral base. Every export format starts from it."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from mtg_core.errors import MtgError
from mtg_core.evaluate import ATTENTION, EXPERT, LORA_KEY, MIXTRAL_TYPES, check_lora_fits, lora_modules
from mtg_core.experts import EXPERT_NAME

TRAINED_BLOCK, HUB_BLOCK = ".mlp.experts.", ".block_sparse_moe.experts."
EXPERT_MATRICES = ("w1", "w2", "w3")
# adapter_config.json settings that change what the A/B matrices mean (DoRA magnitudes, rsLoRA scaling,
# per-module ranks or alphas, biases, fully trained extra modules): no export format can carry them.
PLAIN_LORA = {"peft_type": "LORA", "use_dora": False, "use_rslora": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "bias": "none", "lora_bias": False, "fan_in_fan_out": False}


class ExportError(MtgError):
    """An adapter, base model or output folder that an export cannot use."""


@attrs.frozen
class Adapter:
    """One trained adapter, read and checked against the transformers config of its base."""

    name: str
    folder: Path
    config: dict
    choice: object  # base_models.BaseChoice
    base: object  # the base's transformers config
    modules: dict  # peft module name -> (lora_A [r, in], lora_B [out, r])

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def serve_id(self) -> str:
        """What a server loads the base from: the hub id of a preset, else its folder or hub id."""
        from mtg_core.base_models import PRESETS

        return PRESETS.get(self.choice.name) or self.choice.location


def adapter_names(adapters: Path, name: str | None, all_experts: bool) -> list[str]:
    if bool(name) == bool(all_experts):
        raise ExportError("give --expert NAME or --all")
    if name:
        if not EXPERT_NAME.match(name.lower()):
            raise ExportError(f"--expert {name!r}: not an expert name (1-40 lowercase letters, digits or '_', starting with a letter)")
        return [name.lower()]
    found = sorted(p.parent.name for p in adapters.glob("*/adapter_config.json") if not p.parent.name.startswith("."))
    if not found:
        raise ExportError(f"no adapters in {adapters} (no */adapter_config.json); train one with mtg-train --expert NAME")
    return found


def load_adapter(adapters: Path, name: str, base_model: str | None) -> Adapter:
    """Read ADAPTERS/NAME and check it is a plain LoRA whose every matrix fits its base."""
    from mtg_core.base_models import base_config

    from mtg_core.evaluate import check_adapter_files

    folder = check_adapter_files(adapters, name)
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{config_path}: not a readable JSON file ({exc}); retrain the adapter") from None
    if not isinstance(config, dict) or not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise ExportError(f"{config_path}: not a peft LoRA config (no integer r and numeric lora_alpha); retrain the adapter")
    for key, plain in PLAIN_LORA.items():
        if (config.get(key, plain) or None) != (plain or None):
            raise ExportError(f"{config_path}: {key} is {config[key]!r}; mtg-export converts plain LoRA adapters "
                              f"({key} {plain!r}), as mtg-train writes them")
    choice = _base_choice(folder, config, base_model)
    base = base_config(choice)
    if base.model_type not in MIXTRAL_TYPES:
        raise ExportError(f"{choice.name} is a {base.model_type!r} model; mtg-export converts adapters of Mixtral models")
    modules = lora_modules(folder)
    check_lora_fits(folder, config, modules, base, choice.name)
    return Adapter(name, folder, config, choice, base, modules)


def _base_choice(folder: Path, config: dict, base_model: str | None):
    """--base-model, else the base training_meta.json names, else adapter_config.json's."""
    from mtg_core.base_models import choose_base
    from mtg_core.evaluate import recorded_base

    if base_model:
        return choose_base(base_model)
    recorded = recorded_base(folder)
    if recorded is not None:
        return recorded
    if config.get("base_model_name_or_path"):
        return choose_base(config["base_model_name_or_path"], reason="adapter_config.json's base_model_name_or_path",
                           given_as=f"{folder / 'adapter_config.json'}: base_model_name_or_path {config['base_model_name_or_path']}")
    raise ExportError(f"{folder}: neither training_meta.json nor adapter_config.json names the base model; pass --base-model")


def _first_missing_expert(adapter: Adapter, whole_triplets: bool) -> str | None:
    """The first expert matrix a layer lacks: of w1/w2/w3 (whole_triplets), or of the matrices the layer adapts."""
    present: dict[int, set] = {}
    for module in adapter.modules:
        if match := EXPERT.fullmatch(module):
            present.setdefault(int(match[1]), set()).add((int(match[2]), match[3]))
    for layer, have in sorted(present.items()):
        matrices = EXPERT_MATRICES if whole_triplets else sorted({w for _, w in have})
        for expert in range(adapter.base.num_local_experts):
            for matrix in matrices:
                if (expert, matrix) not in have:
                    return f"model.layers.{layer}.mlp.experts.{expert}.{matrix}"
    return None
