"""Finds expert plugins through entry points and answers every question about experts.

Entry points are loaded one by one rather than with pluggy's `load_setuptools_entrypoints`, so that
one broken plugin is reported by name while every other expert keeps working, and so that two
distributions claiming one name are caught (pluggy silently skips the second).
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from typing import Any

import attrs
import pluggy

from mtg_core import hookspecs
from mtg_core.errors import PluginError, UnknownExpertError
from mtg_core.experts import DataFiles, ExpertInfo, FormattedExample, LoraSettings

ENTRY_POINT_GROUP = "mtg_core"
ALLOW_LIST_ENV = "MTG_PLUGINS"


@attrs.frozen
class PluginFailure:
    """A plugin that could not be used, and why."""

    plugin: str
    distribution: str
    reason: str


@attrs.frozen
class Expert:
    """A registered expert, with its owner and everything the trainer asks of its plugin."""

    info: ExpertInfo
    plugin: str
    distribution: str
    version: str
    error: str | None = None

    @property
    def name(self) -> str:
        return self.info.name


def _allow_list() -> set[str] | None:
    value = os.environ.get(ALLOW_LIST_ENV)
    if value is None:
        return None
    return {name.strip().lower() for name in value.split(",") if name.strip()}


class Registry:
    """The plugin manager plus what discovery learnt: experts, their owners, and failures."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._distributions: dict[str, tuple[str, str]] = {}
        self._experts: dict[str, list[Expert]] | None = None

    @classmethod
    def discover(cls) -> Registry:
        """Load every allowed entry point of the `mtg_core` group."""
        registry = cls()
        allowed = _allow_list()
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            if allowed is not None and ep.name.lower() not in allowed:
                continue
            if ep.name in registry._distributions:
                other = registry._distributions[ep.name][0]
                registry._fail(ep.name, dist, f"entry point name {ep.name!r} is also used by {other}: rename one")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of third-party code
                registry._fail(ep.name, dist, f"import failed: {type(exc).__name__}: {exc}")
                continue
            registry.register(plugin, ep.name, dist, version)
        return registry

    def register(self, plugin: object, name: str, distribution: str = "(not installed)", version: str = "?") -> bool:
        """Register one plugin object; a bad one is recorded as a failure instead of raising."""
        self._experts = None
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._fail(name, distribution, f"invalid hook implementation: {exc}")
            return False
        unknown = [
            impl.function.__name__
            for caller in vars(self.pm.hook).values()
            if isinstance(caller, pluggy.HookCaller) and not caller.has_spec()
            for impl in caller.get_hookimpls()
            if impl.plugin_name == name
        ]
        if unknown:
            self.pm.unregister(name=name)
            known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("mtg_")))
            self._fail(name, distribution, f"unknown hook {', '.join(unknown)} (known hooks: {known})")
            return False
        self._distributions[name] = (distribution, version)
        return True

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._distributions.pop(name, None)
        self._experts = None

    def _fail(self, plugin: str, distribution: str, reason: str) -> None:
        self.failures.append(PluginFailure(plugin, distribution, reason.replace("\n", " ")))

    # -- experts ---------------------------------------------------------------------------

    def _registrations(self) -> dict[str, list[Expert]]:
        if self._experts is not None:
            return self._experts
        found: dict[str, list[Expert]] = {}
        for impl in self.pm.hook.mtg_register_experts.get_hookimpls():
            dist, version = self._distributions[impl.plugin_name]
            try:
                infos = impl.function()
                if not isinstance(infos, (list, tuple)) or not all(isinstance(i, ExpertInfo) for i in infos):
                    raise TypeError(f"returned {infos!r}; return a list of mtg_core.ExpertInfo")
            except Exception as exc:
                self._fail(impl.plugin_name, dist, f"mtg_register_experts failed: {type(exc).__name__}: {exc}")
                continue
            for info in infos:
                found.setdefault(info.name, []).append(Expert(info, impl.plugin_name, dist, version))
        for name, claims in found.items():
            if len(claims) > 1:
                owners = " and ".join(f"{c.distribution} (plugin {c.plugin!r})" for c in claims)
                error = f"expert {name!r} is registered by both {owners}: uninstall one of them"
                found[name] = [attrs.evolve(c, error=error) for c in claims]
        self._experts = found
        return found

    def experts(self) -> list[Expert]:
        """Every registered expert, sorted by name; clashing registrations appear with `error` set."""
        return sorted((e for claims in self._registrations().values() for e in claims), key=lambda e: (e.name, e.distribution))

    def expert(self, name: str) -> Expert:
        """The expert called `name` (any case), or a clear error."""
        claims = self._registrations().get(name.lower())
        if not claims:
            installed = ", ".join(sorted(self._registrations())) or "none"
            raise UnknownExpertError(
                f"no expert named {name!r} is installed (installed: {installed}); "
                f"install one with `pip install ./mtg_expert_<name>` or check ${ALLOW_LIST_ENV}"
            )
        if claims[0].error:
            raise PluginError(claims[0].error)
        return claims[0]

    def _ask(self, expert: Expert, hook: str, expected: type, **kwargs: Any) -> Any:
        try:
            answer = getattr(self.pm.hook, hook)(expert=expert.name, **kwargs)
        except Exception as exc:
            raise PluginError(
                f"plugin {expert.plugin!r} ({expert.distribution}) failed in {hook} for expert "
                f"{expert.name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(answer, expected):
            raise PluginError(
                f"plugin {expert.plugin!r} ({expert.distribution}): {hook}(expert={expert.name!r}) returned "
                f"{type(answer).__name__}, expected mtg_core.{expected.__name__}"
            )
        return answer

    def lora_settings(self, expert: Expert) -> LoraSettings:
        return self._ask(expert, "mtg_lora_settings", LoraSettings)

    def data_files(self, expert: Expert) -> DataFiles:
        return self._ask(expert, "mtg_data_files", DataFiles)

    def format_example(self, expert: Expert, record: dict[str, Any]) -> FormattedExample:
        return self._ask(expert, "mtg_format_example", FormattedExample, record=record)

    def _collect(self, expert: Expert, hook: str, check, what: str) -> list:
        collected = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                items = impl.function(**{k: expert.name for k in impl.argnames})
            except Exception as exc:
                raise PluginError(f"plugin {impl.plugin_name!r} failed in {hook}: {type(exc).__name__}: {exc}") from exc
            if items is None:
                continue
            if not isinstance(items, (list, tuple)) or not all(check(i) for i in items):
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook} returned {items!r}, expected a list of {what}")
            collected.extend(items)
        return collected

    def eval_prompts(self, expert: Expert) -> list[str]:
        return self._collect(expert, "mtg_eval_prompts", lambda p: isinstance(p, str) and p.strip(), "non-empty strings")

    def trainer_callbacks(self, expert: Expert) -> list:
        from transformers import TrainerCallback

        return self._collect(
            expert,
            "mtg_trainer_callbacks",
            lambda c: isinstance(c, TrainerCallback) or (isinstance(c, type) and issubclass(c, TrainerCallback)),
            "transformers.TrainerCallback",
        )
