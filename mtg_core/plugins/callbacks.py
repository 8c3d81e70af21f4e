"""Trainer callbacks from plugins, each guarded: one that raises is logged, recorded and switched off
for the rest of the run, and training goes on; one that takes a noticeable share of each step is named."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtg_core.plugins.registry import Expert, Plugin

log = logging.getLogger(__package__)
# A callback is reported when its events take this share of a step's wall time, and at least this long.
SLOW_SHARE, SLOW_SECONDS = 0.1, 0.05


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
            # already in callback_times, whose record of the last expert has been written by now
            vars(callback)["_mtg_guard"].update(expert=expert, spent=0.0, mark=None, steps=0, step_s=0.0, callback_s=0.0,
                                                reported=False)
            return callback
        state = vars(callback)["_mtg_guard"] = {"off": False, "expert": expert, "plugin": plugin.name,
                                                "callback": type(callback).__name__, "spent": 0.0, "mark": None,
                                                "steps": 0, "step_s": 0.0, "callback_s": 0.0, "reported": False}
        self.callback_times.append(state)
        for event in (name for name in vars(TrainerCallback) if name.startswith("on_")):
            method = getattr(callback, event)

            def guarded(*args, _method=method, _event=event, **kwargs):
                if state["off"]:
                    return None
                started = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                except Exception as exc:
                    state["off"] = True
                    self._skip(plugin, "mtg_trainer_callbacks", state["expert"],
                               f"{type(callback).__name__}.{_event} raised {type(exc).__name__}: {exc}; "
                               "the callback is off for the rest of the run")
                    return None
                finally:
                    self._timed(state, _event, started)

            vars(callback)[event] = guarded  # vars(): a frozen dataclass callback refuses setattr
        return callback

    def _timed(self, state: dict, event: str, started: float) -> None:
        """Add an event's time to its step; at each step's end, name a callback that takes a noticeable share."""
        now = time.perf_counter()
        state["spent"] += now - started
        if event == "on_train_begin" or state["mark"] is None:
            state["mark"], state["spent"] = now, 0.0
        elif event == "on_step_end":
            step = now - state["mark"]
            state["steps"] += 1
            state["step_s"] += step
            state["callback_s"] += state["spent"]
            if not state["reported"] and state["spent"] >= SLOW_SECONDS and state["spent"] >= SLOW_SHARE * step:
                state["reported"] = True
                log.warning("plugin %r: callback %s took %.2f s of a %.2f s step (%.0f%%) training %s; "
                            "training_meta.json records its time per step", state["plugin"], state["callback"],
                            state["spent"], step, 100 * state["spent"] / step, state["expert"])
            state["mark"], state["spent"] = now, 0.0

    def callback_seconds(self, expert: str) -> list[dict[str, Any]]:
        """For a run's record: each plugin callback's mean seconds per step while training `expert`."""
        return [{"plugin": s["plugin"], "callback": s["callback"], "steps": s["steps"],
                 "seconds_per_step": round(s["callback_s"] / s["steps"], 4) if s["steps"] else None,
                 "share_of_step": round(s["callback_s"] / s["step_s"], 4) if s["step_s"] else None}
                for s in self.callback_times if s["expert"] == expert]
