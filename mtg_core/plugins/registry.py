"""The plugin registry: entry points loaded one by one, plugins registered and checked, name clashes
settled (the distribution shipped with mtg_core wins; otherwise MTG_PLUGINS picks), experts looked up."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
import time
from importlib.metadata import entry_points

import attrs
import pluggy

from mtg_core import hookspecs
from mtg_core.errors import MtgError, PluginError, UnknownExpertError
from mtg_core.experts import ExpertInfo
from mtg_core.plugins.answers import ANSWERS, COLLECTING_HOOKS, HOOKS, HookCalls, _shown, _where
from mtg_core.plugins.callbacks import CallbackGuards
from mtg_core.plugins.checks import ExpertCheck, ExpertChecks, PluginReport

ENTRY_POINT_GROUP = "mtg_core"
ALLOW_LIST_ENV = "MTG_PLUGINS"
SLOW_IMPORT_S = 1.0  # a plugin import slower than this is named in --list: discovery runs on every command
HEAVY = frozenset({"torch", "transformers", "peft", "bitsandbytes"})  # what usually makes a plugin import slow
# This repository's expert packages: when another distribution claims one of their names, they win.
SHIPPED = frozenset(f"mtg-expert-{name}" for name in ("reason", "explain", "teach", "predict", "retrospect"))


def _normal(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()  # PEP 503 name normalisation


def _allow_list() -> set[str] | None:
    value = os.environ.get(ALLOW_LIST_ENV)
    if value is None:
        return None
    return {_normal(name.strip()) for name in value.split(",") if name.strip()}


def _winner(distributions: list[str]) -> int | None:
    """Which of several claims on one name is used: the one shipped with mtg_core, if exactly one is."""
    shipped = [i for i, dist in enumerate(distributions) if _normal(dist) in SHIPPED]
    return shipped[0] if len(shipped) == 1 else None


def _import_hint(exc: BaseException, module: str, distribution: str) -> str:
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    if exc.name.split(".")[0] == module.split(".")[0]:
        return (f"; {distribution} is installed without its module {exc.name}: check `packages` in its "
                "pyproject.toml and reinstall")
    return f"; install the package that provides {exc.name!r} into this environment"


def _group_key(group: str) -> str:
    return re.sub(r"[-_.\s]+", "", group).lower()


def _like_ours(group: str) -> bool:
    """An entry-point group spelt like ours but not ours (mtg_cores, mtg-core, mtgcore, MTG_Core): a typo."""
    return group != ENTRY_POINT_GROUP and difflib.SequenceMatcher(None, _group_key(group), _group_key(ENTRY_POINT_GROUP)).ratio() >= 0.8


def _module_hint(exc: BaseException, ep) -> str:
    """Which half of an entry point's `module:object` is wrong, when the plugin's own package imports."""
    module, _, attribute = ep.value.partition(":")
    if isinstance(exc, AttributeError) and attribute and f"has no attribute {attribute.split('.')[0]!r}" in str(exc):
        return f"; the entry point {ep.value!r} names {attribute!r}, which {module} does not define: fix the name after ':'"
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name != module.split(".")[0] and module.startswith(exc.name):
        try:
            found = importlib.util.find_spec(module.split(".")[0]) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return f"; the entry point {ep.value!r} names module {exc.name}, which does not exist: fix the module path before ':'"
    return ""


def _close_hook(name: str) -> str:
    close = difflib.get_close_matches(name, HOOKS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


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



class Registry(HookCalls, ExpertChecks, CallbackGuards):
    """The plugin manager plus what discovery learnt: plugins, experts, failures, and skipped answers.

    Asking hooks (answers.py), checking experts (checks.py) and guarding callbacks (callbacks.py) are
    its methods too, written beside the job they do."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        # Entry points in a group spelt like ours, and remarks on the settings (an allow-list naming nothing).
        self.misplaced: list[PluginFailure] = []
        self.notes: list[str] = []
        # Answers and callbacks left out at run time: {plugin, distribution, hook, expert, reason}.
        self.skipped: list[dict[str, str]] = []
        self.callback_times: list[dict] = []  # each guarded callback's time per step (callbacks.py)
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
        everything = entry_points()
        matched: set[str] = set()
        for ep in everything.select(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            if allowed is None or _normal(ep.name) in allowed or _normal(dist) in allowed:
                claims.setdefault(ep.name, []).append(ep)
                matched |= {_normal(ep.name), _normal(dist)}
        registry._misspelt_groups(everything)
        if allowed is not None and allowed - matched:
            registry.notes.append(f"${ALLOW_LIST_ENV} names {', '.join(sorted(allowed - matched))}, which match"
                                  f"{'es' if len(allowed - matched) == 1 else ''} no entry point or distribution of group "
                                  f"{ENTRY_POINT_GROUP!r}; names are entry-point names (mtg-train --list) or distribution names")
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
            started, imported = time.perf_counter(), set(sys.modules)
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of third-party code
                where = _where(exc, ep.module)
                hint = _module_hint(exc, ep) or _import_hint(exc, ep.module, dists[chosen])
                registry._fail(name, dists[chosen], f"import failed{where}: {type(exc).__name__}: {exc}{hint}")
                continue
            seconds = time.perf_counter() - started
            if registry.register(plugin, name, dists[chosen], ep.dist.version if ep.dist else "?") and seconds > SLOW_IMPORT_S:
                registry._slow(name, ep.module, seconds, sorted(HEAVY & (set(sys.modules) - imported)))
        return registry

    def _misspelt_groups(self, everything) -> None:
        """Entry points in a group spelt like ours: their plugin would vanish without a word."""
        for group in sorted(g for g in everything.groups if _like_ours(g)):
            for ep in everything.select(group=group):
                dist = ep.dist.name if ep.dist else "?"
                self.misplaced.append(PluginFailure(
                    ep.name, dist, f"entry point {ep.name!r} = {ep.value!r} of {dist} is in group {group!r}, which "
                    f"mtg_core does not read, so it is not loaded; rename the group to {ENTRY_POINT_GROUP!r} "
                    f"([project.entry-points.{ENTRY_POINT_GROUP}] in its pyproject.toml) and reinstall"))

    def _slow(self, name: str, module: str, seconds: float, heavy: list[str]) -> None:
        """A plugin slow to import makes every command slow (often a torch import at module top)."""
        plugin = self._plugins[name]
        self._plugins[name] = attrs.evolve(plugin, warnings=(*plugin.warnings, (
            f"importing {module} took {seconds:.1f} s, which every mtg-train/mtg-eval/mtg-ask run pays"
            + (f" (it imported {', '.join(heavy)})" if heavy else "")
            + "; import heavy libraries inside the hooks that need them, not at module top")))

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
        if isinstance(plugin, type):  # its hooks would be called without `self`: a TypeError at the first call
            return self._fail(name, distribution, f"the entry point names the class {plugin.__name__}, not an object: "
                              f"create one in its module (plugin = {plugin.__name__}()) and point the entry point at it")
        if self.pm.is_registered(plugin):
            return self._fail(name, distribution, f"the same object is already loaded as plugin "
                              f"{self.pm.get_name(plugin)!r}; give each entry point its own object")
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            return self._fail(name, distribution, f"invalid hook implementation: {exc}")
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
            raise type(problems[0])(f"{problems[0]}{more}") from problems[0]  # --debug shows the plugin's traceback
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
                   f"install one with `pip install ./mtg_expert_<name>` or check ${ALLOW_LIST_ENV}; "
                   f"searched the entry points of group {ENTRY_POINT_GROUP!r} in every installed distribution")
        for misplaced in self.misplaced:
            message += f"; {misplaced.reason}"
        for note in self.notes:
            message += f"; {note}"
        if len(self.failures) == 1:
            failure = self.failures[0]
            message += f"; plugin {failure.plugin!r} of {failure.distribution}, which may provide it, failed: {failure.reason}"
        elif self.failures:
            failed = ", ".join(f"{f.plugin!r} ({f.distribution})" for f in self.failures)
            message += f"; these plugins, which may provide it, failed (mtg-train --list says why): {failed}"
        return UnknownExpertError(message)
