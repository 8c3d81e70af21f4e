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

`check(expert)` runs, without a model, everything a command will ask of an expert's plugin, so
`mtg-train --list` shows every problem and a command refuses a broken expert before loading weights.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterator

import attrs
import pluggy

from mtg_core import hookspecs
from mtg_core.data import read_records
from mtg_core.errors import DataError, MtgError, PluginError, UnknownExpertError
from mtg_core.experts import DataFiles, ExpertInfo, FormattedExample, LoraSettings

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "mtg_core"
ALLOW_LIST_ENV = "MTG_PLUGINS"
# This repository's expert packages: when another distribution claims one of their names, they win.
SHIPPED = frozenset(f"mtg-expert-{name}" for name in ("reason", "explain", "teach", "predict", "retrospect"))
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
# A record no real data contains: what the template does with it shows where input and output go.
PROBE = {"input": "mtg-probe-question-5c1e", "output": "mtg-probe-answer-5c1e"}


def _normal(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()  # PEP 503 name normalisation


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _a(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'AEIOUaeiou' else 'a'} {name}"


def _shown(value: Any) -> str:
    return f"{_a(value)} ({_short(value)})"


def _for_experts(cases: list[tuple[str, Problem]]) -> str:
    """', for expert x (VALUE)' or ', for experts x, y, z (for x: VALUE)'."""
    (first, problem), names = cases[0], [name for name, _ in cases]
    if len(cases) == 1:
        return f", for expert {first} ({problem.detail})"
    return f", for experts {', '.join(names)} (for {first}: {problem.detail})"


def _allow_list() -> set[str] | None:
    value = os.environ.get(ALLOW_LIST_ENV)
    if value is None:
        return None
    return {_normal(name.strip()) for name in value.split(",") if name.strip()}


def _winner(distributions: list[str]) -> int | None:
    """Which of several claims on one name is used: the one shipped with mtg_core, if exactly one is."""
    shipped = [i for i, dist in enumerate(distributions) if _normal(dist) in SHIPPED]
    return shipped[0] if len(shipped) == 1 else None


def _where(exc: BaseException, module: str) -> str:
    """' at FILE:LINE' of the innermost frame in the plugin's own package, where the traceback reaches it."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    top = module.split(".")[0]
    frames = [(frame.f_code.co_filename, line) for frame, line in traceback.walk_tb(exc.__traceback__)
              if frame.f_globals.get("__name__", "").split(".")[0] == top]
    return f" at {frames[-1][0]}:{frames[-1][1]}" if frames else ""


def _import_hint(exc: BaseException, module: str, distribution: str) -> str:
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    if exc.name.split(".")[0] == module.split(".")[0]:
        return (f"; {distribution} is installed without its module {exc.name}: check `packages` in its "
                "pyproject.toml and reinstall")
    return f"; install the package that provides {exc.name!r} into this environment"


def _close_hook(name: str) -> str:
    close = difflib.get_close_matches(name, HOOKS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


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


@attrs.frozen
class PluginFailure:
    """A plugin, or one claim of it, that is not used, and why."""

    plugin: str
    distribution: str
    reason: str


@attrs.frozen
class Plugin:
    """A loaded plugin: its owner, the hooks it implements, the experts it registers, what looks wrong."""

    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]
    experts: tuple[ExpertInfo, ...]
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"plugin {self.name!r} ({self.distribution})"


@attrs.frozen
class Expert:
    """A registered expert, with its owner; `error` is set on a claim refused in a name clash."""

    info: ExpertInfo
    plugin: str
    distribution: str
    version: str
    error: str | None = None

    @property
    def name(self) -> str:
        return self.info.name


@attrs.frozen
class ExpertCheck:
    """What a model-free run of every hook and file of one expert found."""

    lora: LoraSettings | None
    files: DataFiles | None
    examples: int | None
    heldout_examples: int | None
    problems: tuple[MtgError, ...]


@attrs.frozen
class PluginReport:
    """Problems of one plugin's answers for other plugins' experts or its own: errors are skipped at run time."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]


class Registry:
    """The plugin manager plus what discovery learnt: plugins, experts, failures, and skipped answers."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        # Answers and callbacks left out at run time: {plugin, distribution, hook, expert, reason}.
        self.skipped: list[dict[str, str]] = []
        self._plugins: dict[str, Plugin] = {}
        self._warned: set[tuple[str, str]] = set()
        self._changed()

    def _changed(self) -> None:
        self._claims: tuple[dict[str, Expert], list[Expert]] | None = None
        self._checks: dict[tuple[str, str], ExpertCheck] = {}
        self._reports: dict[str, PluginReport] | None = None

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def discover(cls) -> Registry:
        """Load every allowed entry point of the `mtg_core` group (MTG_PLUGINS: entry point or distribution names)."""
        registry = cls()
        allowed = _allow_list()
        claims: dict[str, list] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            if allowed is None or _normal(ep.name) in allowed or _normal(dist) in allowed:
                claims.setdefault(ep.name, []).append(ep)
        for name in sorted(claims):
            eps = claims[name]
            dists = [ep.dist.name if ep.dist else "?" for ep in eps]
            chosen = 0 if len(eps) == 1 else _winner(dists)
            for index, dist in enumerate(dists):
                if index != chosen:
                    registry._fail(name, dist, registry._entry_point_clash(name, dists, index, chosen, set(claims)))
            if chosen is None:
                continue
            ep = eps[chosen]
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of third-party code
                where = _where(exc, ep.module)
                registry._fail(name, dists[chosen], f"import failed{where}: {type(exc).__name__}: {exc}"
                               f"{_import_hint(exc, ep.module, dists[chosen])}")
                continue
            registry.register(plugin, name, dists[chosen], ep.dist.version if ep.dist else "?")
        return registry

    @staticmethod
    def _entry_point_clash(name: str, dists: list[str], index: int, chosen: int | None, names: set[str]) -> str:
        others = [d for i, d in enumerate(dists) if i != index]
        keep = ",".join(sorted((names - {name}) | {_normal(dists[index])}))
        choose = f"to load {dists[index]}'s instead, name its distribution in ${ALLOW_LIST_ENV}, e.g. {ALLOW_LIST_ENV}={keep}"
        if chosen is not None:
            return (f"entry point {name!r} is not loaded: {dists[chosen]}, shipped with mtg_core, uses the same name "
                    f"and wins; {choose}")
        return f"entry point {name!r} is also used by {' and '.join(others)}, so none is loaded; {choose}"

    def register(self, plugin: object, name: str, distribution: str = "not installed", version: str = "?") -> bool:
        """Register one plugin object; a bad one is recorded in `failures` instead of raising."""
        self._changed()
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            hint = "; the entry point names a class: point it at an instance" if isinstance(plugin, type) else ""
            return self._fail(name, distribution, f"invalid hook implementation: {exc}{hint}")
        impls = {caller.name: impl for caller in self.pm.get_hookcallers(plugin) or []
                 for impl in caller.get_hookimpls() if impl.plugin_name == name}
        problem = None
        unknown = sorted(hook for hook in impls if hook not in HOOKS)
        if unknown:
            problem = f"unknown hook {', '.join(h + _close_hook(h) for h in unknown)}; known hooks: {', '.join(HOOKS)}"
        elif any(impl.hookwrapper or impl.wrapper for impl in impls.values()):
            problem = "hook wrappers are not supported: mtg_core calls each plugin's hooks itself, to isolate it"
        infos: tuple[ExpertInfo, ...] = ()
        if problem is None and "mtg_register_experts" in impls:
            try:
                answer = impls["mtg_register_experts"].function()
            except Exception as exc:
                problem = f"mtg_register_experts() raised {type(exc).__name__}: {exc}"
            else:
                if isinstance(answer, (list, tuple)) and all(isinstance(info, ExpertInfo) for info in answer):
                    infos = tuple(answer)
                else:
                    problem = (f"mtg_register_experts() returned {_shown(answer)}; "
                               f"it must return {ANSWERS['mtg_register_experts']}")
        if problem:
            self.pm.unregister(name=name)
            return self._fail(name, distribution, problem)
        warnings = self._unmarked(plugin)
        if not impls:
            warnings.append(f"implements no hook, so nothing of it is used; hooks are functions named as in "
                            f"mtg_core.hookspecs ({', '.join(HOOKS)}) and decorated with @hookimpl")
        self._plugins[name] = Plugin(name, distribution, version, tuple(sorted(impls)), infos, tuple(warnings))
        return True

    @staticmethod
    def _unmarked(plugin: object) -> list[str]:
        """Functions that look like hooks but lack @hookimpl: pluggy ignores them without a word."""
        warnings = []
        for attr in sorted(dir(plugin)):
            value = getattr(plugin, attr, None) if attr.startswith("mtg_") else None
            if callable(value) and not isinstance(value, type) and getattr(value, f"{hookspecs.PROJECT}_impl", None) is None:
                unknown = "" if attr in HOOKS else f", and {attr} is not a hook name{_close_hook(attr)}"
                warnings.append(f"{attr} has no @hookimpl, so it is never called (from mtg_core import hookimpl){unknown}")
        return warnings

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._plugins.pop(name, None)
        self._changed()

    def _fail(self, plugin: str, distribution: str, reason: str) -> bool:
        self.failures.append(PluginFailure(plugin, distribution, reason.replace("\n", " ")))
        return False

    def plugins(self) -> list[Plugin]:
        """Every loaded plugin, sorted by name."""
        return [self._plugins[name] for name in sorted(self._plugins)]

    # -- experts ---------------------------------------------------------------------------

    def _registrations(self) -> tuple[dict[str, Expert], list[Expert]]:
        """Experts by name, and the claims refused in a name clash (see the module docstring)."""
        if self._claims is not None:
            return self._claims
        found: dict[str, list[Expert]] = {}
        for plugin in self._plugins.values():
            for info in plugin.experts:
                found.setdefault(info.name, []).append(Expert(info, plugin.name, plugin.distribution, plugin.version))
        by_name, refused = {}, []
        for name, claims in found.items():
            chosen = 0 if len(claims) == 1 else _winner([c.distribution for c in claims])
            if chosen is not None:
                by_name[name] = claims[chosen]
            refused += [attrs.evolve(c, error=self._expert_clash(name, claims, i, chosen))
                        for i, c in enumerate(claims) if i != chosen]
        self._claims = by_name, refused
        return self._claims

    def _expert_clash(self, name: str, claims: list[Expert], index: int, chosen: int | None) -> str:
        claim = claims[index]
        rivals = {c.plugin for i, c in enumerate(claims) if i != index}
        keep = ",".join(sorted(set(self._plugins) - rivals))
        choose = (f"to use {claim.distribution}'s, leave {' and '.join(map(repr, sorted(rivals)))} out of "
                  f"${ALLOW_LIST_ENV}, e.g. {ALLOW_LIST_ENV}={keep}")
        if chosen is not None:
            winner = claims[chosen]
            return (f"expert {name!r} of {claim.distribution} (plugin {claim.plugin!r}) is not used: {winner.distribution} "
                    f"(plugin {winner.plugin!r}), shipped with mtg_core, registers it too and wins; {choose}")
        owners = " and ".join(f"{c.distribution} (plugin {c.plugin!r})" for c in claims)
        return f"expert {name!r} is registered by both {owners}, so neither is used; {choose}"

    def experts(self) -> list[Expert]:
        """Every usable-by-name expert, sorted by name (claims refused in a clash are in `refused()`)."""
        return sorted(self._registrations()[0].values(), key=lambda e: e.name)

    def refused(self) -> list[Expert]:
        """Claims on an expert name that lost a clash, each with `error` saying why and how to choose."""
        return sorted(self._registrations()[1], key=lambda e: (e.name, e.distribution))

    def expert(self, name: str) -> Expert:
        """The expert called `name` (any case), checked: a broken one raises its first problem here,
        before any command loads a model. Skipped answers of other plugins are announced."""
        by_name, refused = self._registrations()
        expert = by_name.get(name.lower())
        if expert is None:
            clash = [c for c in refused if c.name == name.lower()]
            if clash:
                raise PluginError(clash[0].error)
            raise self._missing(name, by_name)
        problems = self.check(expert).problems
        if problems:
            more = f" (and {len(problems) - 1} more problems: see mtg-train --list)" if len(problems) > 1 else ""
            raise type(problems[0])(f"{problems[0]}{more}")
        for hook in COLLECTING_HOOKS:
            for plugin, _, problem in self._answers(expert, hook):
                if problem:
                    self._skip(plugin, hook, expert.name, problem)
        return expert

    def _missing(self, name: str, by_name: dict[str, Expert]) -> MtgError:
        own = [f for f in self.failures if _normal(f.plugin) == _normal(name)]
        if own:
            return PluginError(f"expert {name!r} is not available: plugin {own[0].plugin!r} of {own[0].distribution} "
                               f"failed: {own[0].reason}")
        message = (f"no expert named {name!r} is installed (installed: {', '.join(sorted(by_name)) or 'none'}); "
                   f"install one with `pip install ./mtg_expert_<name>` or check ${ALLOW_LIST_ENV}")
        if len(self.failures) == 1:
            failure = self.failures[0]
            message += f"; plugin {failure.plugin!r} of {failure.distribution}, which may provide it, failed: {failure.reason}"
        elif self.failures:
            failed = ", ".join(f"{f.plugin!r} ({f.distribution})" for f in self.failures)
            message += f"; these plugins, which may provide it, failed (mtg-train --list says why): {failed}"
        return UnknownExpertError(message)

    # -- checks ----------------------------------------------------------------------------

    def check(self, expert: Expert) -> ExpertCheck:
        """Run every hook of `expert`'s plugin and read its data files, as training and evaluation
        will, and report every problem at once; nothing loads a model."""
        key = (expert.name, expert.plugin)
        if key not in self._checks:
            problems: list[MtgError] = []

            def attempt(step, *args):
                try:
                    return step(*args)
                except MtgError as exc:
                    problems.append(exc)
                    return None

            lora = attempt(self.lora_settings, expert)
            files = attempt(self.data_files, expert)
            formats = attempt(self._probe, expert)
            counts = {}
            for role, path in (("training", files.train), ("held-out", files.heldout)) if files else ():
                records = attempt(self._records, expert, role, path)
                counts[role] = None if records is None else len(records)
                if records and formats:
                    attempt(self._format_all, expert, path, records)
            self._checks[key] = ExpertCheck(lora, files, counts.get("training"), counts.get("held-out"), tuple(problems))
        return self._checks[key]

    def _records(self, expert: Expert, role: str, path: Path) -> list[dict[str, str]]:
        if not path.is_file():
            raise DataError(
                f"{path}: no such file, the {role} data that {expert.distribution}'s mtg_data_files gives for "
                f"{expert.name!r}; if the package was built without its data, list the file under "
                "[tool.setuptools.package-data] in its pyproject.toml and reinstall (`pip install -e` uses it in place)"
            )
        return read_records(path)

    def _probe(self, expert: Expert) -> bool:
        """Format a record no data contains and see where its input and output end up."""
        example = self.format_example(expert, PROBE)
        where = f"plugin {expert.plugin!r} ({expert.distribution}): mtg_format_example(expert={expert.name!r})"
        if PROBE["input"] not in example.prompt:
            raise PluginError(f"{where} leaves the record's input out of the prompt, so the model would never see "
                              "the question; put {input} in the template")
        if PROBE["output"] in example.prompt:
            raise PluginError(f"{where} puts the record's output into the prompt, where at inference there is none; "
                              "keep it for the completion")
        if PROBE["output"] not in example.completion:
            raise PluginError(f"{where} returns a completion without the record's output, which is what the model learns")
        return True

    def _format_all(self, expert: Expert, path: Path, records: list[dict[str, str]]) -> None:
        for number, record in enumerate(records, 1):
            try:
                self.format_example(expert, record)
            except PluginError as exc:
                raise PluginError(f"{path}: record {number}: {exc}") from None

    def plugin_report(self, name: str) -> PluginReport:
        """What is wrong with plugin `name`'s answers across every expert, without recording anything."""
        if self._reports is None:
            found: dict[str, dict[str, dict[str, list[str]]]] = {p: {"errors": {}, "warnings": {}} for p in self._plugins}
            for expert in self.experts():
                for hook in COLLECTING_HOOKS:
                    for plugin, _, problem in self._answers(expert, hook):
                        if problem:
                            found[plugin.name]["errors"].setdefault((hook, problem.summary), []).append((expert.name, problem))
                for plugin, hook, problem in self._foreign_answers(expert):
                    found[plugin.name]["warnings"].setdefault((hook, problem.summary), []).append((expert.name, problem))
            self._reports = {}
            for plugin in self._plugins.values():
                errors = [f"{hook} {summary}{_for_experts(cases)}; it must return {ANSWERS[hook]}"
                          for (hook, summary), cases in found[plugin.name]["errors"].items()]
                warnings = [*plugin.warnings, *(f"{hook} {summary}{_for_experts(cases)}: ignored, as mtg_core asks only "
                                                "the plugin that registered an expert; return None for the others"
                                                for (hook, summary), cases in found[plugin.name]["warnings"].items())]
                self._reports[plugin.name] = PluginReport(tuple(errors), tuple(warnings))
        return self._reports.get(name, PluginReport((), ()))

    def _foreign_answers(self, expert: Expert) -> Iterator[tuple[Plugin, str, Problem]]:
        """Plugins that answer a hook about an expert they did not register (mtg_core never asks them)."""
        arguments = {"expert": expert.name, "record": PROBE}
        for hook in OWNED_HOOKS:
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name == expert.plugin:
                    continue
                try:
                    answer = impl.function(*(arguments[a] for a in impl.argnames))
                except Exception as exc:
                    yield self._plugins[impl.plugin_name], hook, Problem(f"raised {type(exc).__name__}", str(exc))
                    continue
                if answer is not None:
                    yield self._plugins[impl.plugin_name], hook, Problem(f"answered with {_a(answer)}", _short(answer))

    # -- the hooks, asked -------------------------------------------------------------------

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
            raise PluginError(f"{who} failed in {hook} for expert {expert.name!r}: {type(exc).__name__}: {exc}") from exc
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
                yield plugin, [], Problem(f"raised {type(exc).__name__}", str(exc))
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
        prompts = []
        for plugin, items, problem in self._answers(expert, "mtg_eval_prompts"):
            if problem:
                self._skip(plugin, "mtg_eval_prompts", expert.name, problem)
            prompts += items
        return prompts

    def trainer_callbacks(self, expert: Expert) -> list:
        """Every plugin's callbacks for `expert`, each guarded so that one that raises is switched off."""
        callbacks = []
        for plugin, items, problem in self._answers(expert, "mtg_trainer_callbacks"):
            if problem:
                self._skip(plugin, "mtg_trainer_callbacks", expert.name, problem)
            for item in items:
                try:
                    callback = item() if isinstance(item, type) else item
                except Exception as exc:
                    self._skip(plugin, "mtg_trainer_callbacks", expert.name,
                               f"{item.__name__}() raised {type(exc).__name__}: {exc}")
                    continue
                callbacks.append(self._guarded(callback, plugin, expert.name))
        return callbacks

    def _guarded(self, callback: Any, plugin: Plugin, expert: str) -> Any:
        """Make each event method of a plugin's callback catch what it raises: the first exception is
        logged and recorded, and the callback does nothing for the rest of the run.

        The methods are replaced on the instance rather than wrapping it in another object, so that the
        callback keeps its class: transformers matches callbacks by class (duplicates, ExportableState
        saved in checkpoints and restored on resume).
        """
        from transformers import TrainerCallback

        if "_mtg_guard" in vars(callback):  # the same instance may come back for the next expert of --all
            vars(callback)["_mtg_guard"]["expert"] = expert
            return callback
        state = vars(callback)["_mtg_guard"] = {"off": False, "expert": expert}
        for event in (name for name in vars(TrainerCallback) if name.startswith("on_")):
            method = getattr(callback, event)

            def guarded(*args, _method=method, _event=event, **kwargs):
                if state["off"]:
                    return None
                try:
                    return _method(*args, **kwargs)
                except Exception as exc:
                    state["off"] = True
                    self._skip(plugin, "mtg_trainer_callbacks", state["expert"],
                               f"{type(callback).__name__}.{_event} raised {type(exc).__name__}: {exc}; "
                               "the callback is off for the rest of the run")
                    return None

            vars(callback)[event] = guarded  # vars(): a frozen dataclass callback refuses setattr
        return callback
