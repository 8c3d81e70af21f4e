"""Trainer callbacks from plugins, each guarded: one that raises is logged, recorded and switched off
for the rest of the run, and training goes on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtg_core.plugins.registry import Expert, Plugin


class CallbackGuards:
    """Trainer callbacks: part of `Registry`, whose hook calls (`_answers`, `_skip`) they use."""

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
