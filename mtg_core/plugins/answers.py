"""What each hook must return, and the hooks asked plugin by plugin with every answer checked: a wrong
answer to a hook about one expert is an error; one to a collecting hook is skipped for its plugin only."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import TYPE_CHECKING, Any, Iterator

import attrs
import pluggy

from mtg_core import hookspecs
from mtg_core.errors import PluginError
from mtg_core.experts import DataFiles, FormattedExample, LoraSettings

if TYPE_CHECKING:
    from mtg_core.plugins.registry import Expert, Plugin, PluginFailure

log = logging.getLogger(__package__)  # mtg_core.plugins: one logger for the package, whichever file logs

HOOKS = tuple(sorted(name for name in vars(hookspecs) if name.startswith("mtg_")))
# What each hook must return: every message says it, and tests/test_meta.py checks the guide does too.
ANSWERS = {
    "mtg_register_experts": "a list of mtg_core.ExpertInfo",
    "mtg_lora_settings": "a mtg_core.LoraSettings for its own experts and None for the others",
    "mtg_data_files": "a mtg_core.DataFiles for its own experts and None for the others",
    "mtg_format_example": "a mtg_core.FormattedExample for its own experts and None for the others",
    "mtg_eval_prompts": "a list of non-empty strings, or None",
    "mtg_trainer_callbacks": "a list of transformers.TrainerCallback instances or classes, or None",
}
OWNED_HOOKS = ("mtg_lora_settings", "mtg_data_files", "mtg_format_example")
COLLECTING_HOOKS = ("mtg_eval_prompts", "mtg_trainer_callbacks")
MAX_EVAL_PROMPTS = 16  # per plugin and expert: each prompt costs two greedy generations in mtg-eval


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _a(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'AEIOUaeiou' else 'a'} {name}"


def _shown(value: Any) -> str:
    return f"{_a(value)} ({_short(value)})"


def _where(exc: BaseException, module: str) -> str:
    """' at FILE:LINE' of the innermost frame in the plugin's own package, where the traceback reaches it."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    top = module.split(".")[0]
    frames = [(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(exc.__traceback__)
              if frame.f_globals.get("__name__", "").split(".")[0] == top]
    return f" at {frames[-1][0]}:{frames[-1][1]}" if frames else ""


def _raised(exc: BaseException, function: Any) -> str:
    """'ValueError at FILE:LINE': where in the hook's own module (or package) it raised."""
    return f"{type(exc).__name__}{_where(exc, getattr(function, '__module__', None) or '')}"


def _is_callback(item: Any) -> bool:
    # Looked up, not imported: importing transformers pulls torch, and --list must stay fast. No object
    # can be a TrainerCallback unless transformers.trainer_callback is imported already, so this is exact.
    base = getattr(sys.modules.get("transformers.trainer_callback"), "TrainerCallback", None)
    return base is not None and (isinstance(item, base) or (isinstance(item, type) and issubclass(item, base)))


ITEM_CHECKS = {
    "mtg_eval_prompts": ("a non-empty string", lambda item: isinstance(item, str) and bool(item.strip())),
    "mtg_trainer_callbacks": ("a transformers.TrainerCallback", _is_callback),
}


@attrs.frozen
class Problem:
    """A wrong answer: `summary` says what kind (the same for every expert it happens to), `detail` the value."""

    summary: str
    detail: str

    def __str__(self) -> str:
        return f"{self.summary}: {self.detail}"


def _collection_problem(hook: str, answer: Any) -> Problem | None:
    if answer is None:
        return None
    if not isinstance(answer, (list, tuple)):
        return Problem(f"returned {_a(answer)}, not a list", _short(answer))
    wanted, ok = ITEM_CHECKS[hook]
    for index, item in enumerate(answer):
        if not ok(item):
            return Problem(f"returned a list whose item {index} is {_a(item)}, not {wanted}", _short(item))
    return None


class HookCalls:
    """The hooks, asked: part of `Registry`, whose plugin manager, plugins and skipped answers it uses."""

    pm: pluggy.PluginManager
    skipped: list[dict[str, str]]
    failures: list[PluginFailure]
    _plugins: dict[str, Plugin]
    _warned: set[tuple[str, str]]

    def _ask(self, expert: Expert, hook: str, expected: type, **kwargs: Any) -> Any:
        """Ask the plugin that registered `expert`, alone, and check the type of its answer."""
        who = f"plugin {expert.plugin!r} ({expert.distribution})"
        impl = next((i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin_name == expert.plugin), None)
        if impl is None:
            raise PluginError(f"{who} registers expert {expert.name!r} but implements no {hook}; add it "
                              f"(with @hookimpl), returning {ANSWERS[hook]}")
        arguments = {"expert": expert.name, **kwargs}
        try:
            answer = impl.function(*(arguments[a] for a in impl.argnames))
        except Exception as exc:
            raise PluginError(f"{who} failed in {hook} for expert {expert.name!r}: {_raised(exc, impl.function)}: {exc}") from exc
        if not isinstance(answer, expected):
            raise PluginError(f"{who}: {hook}(expert={expert.name!r}) returned {_shown(answer)}; it must return {ANSWERS[hook]}")
        return answer

    def lora_settings(self, expert: Expert) -> LoraSettings:
        return self._ask(expert, "mtg_lora_settings", LoraSettings)

    def data_files(self, expert: Expert) -> DataFiles:
        return self._ask(expert, "mtg_data_files", DataFiles)

    def format_example(self, expert: Expert, record: dict[str, Any]) -> FormattedExample:
        return self._ask(expert, "mtg_format_example", FormattedExample, record=record)

    def _answers(self, expert: Expert, hook: str) -> Iterator[tuple[Plugin, list, Problem | None]]:
        """Each plugin's answer to a collecting hook: (plugin, items, None), or (plugin, [], problem)."""
        arguments = {"expert": expert.name}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            plugin = self._plugins[impl.plugin_name]
            try:
                answer = impl.function(*(arguments[a] for a in impl.argnames))
            except Exception as exc:
                yield plugin, [], Problem(f"raised {type(exc).__name__}", f"{exc}{_where(exc, getattr(impl.function, '__module__', None) or '')}")
                continue
            problem = _collection_problem(hook, answer)
            yield plugin, ([] if problem else list(answer or [])), problem

    def _skip(self, plugin: Plugin, hook: str, expert: str, problem: Problem | str) -> None:
        """Leave one plugin's answer out, say so once per plugin and hook, and keep it for the run's records."""
        entry = {"plugin": plugin.name, "distribution": plugin.distribution, "hook": hook, "expert": expert,
                 "reason": str(problem).replace("\n", " ")}
        if entry in self.skipped:
            return
        self.skipped.append(entry)
        if (plugin.name, hook) not in self._warned:
            self._warned.add((plugin.name, hook))
            log.warning("%s skipped: %s(expert=%r) %s; the other plugins go on", plugin, hook, expert, entry["reason"])

    def skipped_for(self, expert: str) -> list[dict[str, str | None]]:
        """For a run's record: plugins that did not load, and answers left out for `expert` so far."""
        failed = [{"plugin": f.plugin, "distribution": f.distribution, "hook": None, "expert": None, "reason": f.reason}
                  for f in self.failures]
        return [*failed, *(entry for entry in self.skipped if entry["expert"] == expert)]

    def eval_prompts(self, expert: Expert) -> list[str]:
        return [prompt for prompt, _ in self.eval_prompts_by_plugin(expert)]

    def eval_prompts_by_plugin(self, expert: Expert) -> list[tuple[str, str]]:
        """(prompt, plugin that added it), at most MAX_EVAL_PROMPTS of each plugin: each costs two generations."""
        prompts = []
        for plugin, items, problem in self._answers(expert, "mtg_eval_prompts"):
            if problem:
                self._skip(plugin, "mtg_eval_prompts", expert.name, problem)
            if len(items) > MAX_EVAL_PROMPTS:
                self._skip(plugin, "mtg_eval_prompts", expert.name,
                           f"returned {len(items)} prompts; the first {MAX_EVAL_PROMPTS} are asked and "
                           f"{len(items) - MAX_EVAL_PROMPTS} dropped (each costs a base and an adapter answer)")
            prompts += [(item, plugin.name) for item in items[:MAX_EVAL_PROMPTS]]
        return prompts

    def cross_cutting(self, expert: Expert) -> list[dict[str, Any]]:
        """For a run's record: the other plugins that add evaluation prompts or trainer callbacks to `expert`."""
        hooks: dict[str, list[str]] = {}
        for hook in COLLECTING_HOOKS:
            for plugin, items, _ in self._answers(expert, hook):
                if items and plugin.name != expert.plugin:
                    hooks.setdefault(plugin.name, []).append(hook)
        return [{"plugin": name, "distribution": self._plugins[name].distribution, "version": self._plugins[name].version,
                 "hooks": added} for name, added in hooks.items()]
