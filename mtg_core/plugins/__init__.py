"""Finds expert plugins through entry points, checks them, and answers every question about experts.

One broken plugin costs only itself:
- Entry points are loaded one by one rather than with pluggy's `load_setuptools_entrypoints`, so a
  plugin that fails to import or to register is reported by name and every other one still loads.
- Hooks are called plugin by plugin (`HookImpl.function`), not through `pm.hook`, so that every
  answer is checked against its plugin: hooks about one expert are asked of the plugin that
  registered it alone; a collecting hook's answer that is wrong is skipped for that plugin (logged
  once, kept in `skipped`); a trainer callback that raises is switched off for the rest of the run.
- Two claims on one name (entry point or expert): the distribution shipped with mtg_core wins and
  the other is refused; between two others neither is used until MTG_PLUGINS picks one.
- What would otherwise vanish without a word is reported: entry points in a group spelt like ours,
  MTG_PLUGINS names that match nothing, a plugin slow to import.

`check(expert)` runs, without a model, everything a command will ask of an expert's plugin, so
`mtg-train --list` shows every problem and a command refuses a broken expert before loading weights.

The job of each file:
- `registry.py`: the `Registry`: entry-point discovery, registration, name clashes, expert lookup.
- `answers.py`: what each hook must return; hooks asked plugin by plugin, every answer checked.
- `checks.py`: the model-free check of an expert (template, data files) and each plugin's report.
- `callbacks.py`: trainer callbacks guarded, so that one that raises is switched off, and timed.
- `targets.py`: an expert's LoRA target_modules checked against the base's layers.
"""

from mtg_core.plugins.answers import (ANSWERS, COLLECTING_HOOKS, HOOKS, ITEM_CHECKS, MAX_EVAL_PROMPTS, OWNED_HOOKS,
                                      Problem)
from mtg_core.plugins.checks import PROBE, ExpertCheck, PluginReport
from mtg_core.plugins.registry import (ALLOW_LIST_ENV, ENTRY_POINT_GROUP, SHIPPED, Expert, Plugin, PluginFailure,
                                       Registry)

__all__ = ["ALLOW_LIST_ENV", "ANSWERS", "COLLECTING_HOOKS", "ENTRY_POINT_GROUP", "HOOKS", "ITEM_CHECKS", "MAX_EVAL_PROMPTS",
           "OWNED_HOOKS",
           "PROBE", "SHIPPED", "Expert", "ExpertCheck", "Plugin", "PluginFailure", "PluginReport", "Problem", "Registry"]
