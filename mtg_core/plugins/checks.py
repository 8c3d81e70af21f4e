"""`check(expert)`: everything a command will ask of an expert's plugin, run without a model (its
template probed, its data files read and formatted), and each plugin's report for `mtg-train --list`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import attrs
import pluggy

from mtg_core.data import read_records
from mtg_core.errors import DataError, MtgError, PluginError
from mtg_core.experts import DataFiles, LoraSettings
from mtg_core.plugins.answers import ANSWERS, COLLECTING_HOOKS, OWNED_HOOKS, Problem, _a, _short

if TYPE_CHECKING:
    from mtg_core.plugins.registry import Expert, Plugin

# Fewer examples than this pass every check yet cannot teach or measure a mode: --list warns (--strict fails).
MIN_TRAINING_EXAMPLES, MIN_HELDOUT_EXAMPLES = 50, 10
# A record no real data contains: what the template does with it shows where input and output go.
PROBE = {"input": "mtg-probe-question-5c1e", "output": "mtg-probe-answer-5c1e"}


def _for_experts(cases: list[tuple[str, Problem]]) -> str:
    """', for expert x (VALUE)' or ', for experts x, y, z (for x: VALUE)'."""
    (first, problem), names = cases[0], [name for name, _ in cases]
    if len(cases) == 1:
        return f", for expert {first} ({problem.detail})"
    return f", for experts {', '.join(names)} (for {first}: {problem.detail})"


def _data_warnings(files: DataFiles | None, counts: dict[str, int | None]) -> tuple[str, ...]:
    """What passes every check yet is a mistake: a relative path found here by chance, too few examples."""
    paths = (("training", files.train), ("held-out", files.heldout)) if files else ()
    relative = [f"{role} data path {path} is relative, so it resolves against the current directory: found here, "
                "missing wherever else the command runs; build it from the package (Path(__file__).parent / \"data\" / ...)"
                for role, path in paths if not path.is_absolute() and path.is_file()]
    few = [f"only {count} {role} example{'s' if count != 1 else ''}: enough to test the plumbing, not to {purpose}; a real "
           f"expert needs at least {least} varied ones (each shipped expert has over 100 training and 20 held-out examples, "
           "written apart so that none restates another)"
           for role, least, purpose in (("training", MIN_TRAINING_EXAMPLES, "teach a mode"),
                                        ("held-out", MIN_HELDOUT_EXAMPLES, "measure one"))
           for count in [counts.get(role)] if count is not None and 0 < count < least]
    return (*relative, *few)


@attrs.frozen
class ExpertCheck:
    """What a model-free run of every hook and file of one expert found."""

    lora: LoraSettings | None
    files: DataFiles | None
    examples: int | None
    heldout_examples: int | None
    problems: tuple[MtgError, ...]
    warnings: tuple[str, ...] = ()


@attrs.frozen
class PluginReport:
    """Problems of one plugin's answers for other plugins' experts or its own: errors are skipped at run time."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]


class ExpertChecks:
    """The checks: part of `Registry`, whose plugin manager, plugins and hook calls they use."""

    pm: pluggy.PluginManager
    _plugins: dict[str, Plugin]
    _checks: dict[tuple[str, str], ExpertCheck]
    _reports: dict[str, PluginReport] | None

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
            self._checks[key] = ExpertCheck(lora, files, counts.get("training"), counts.get("held-out"), tuple(problems),
                                            _data_warnings(files, counts))
        return self._checks[key]

    def _records(self, expert: Expert, role: str, path: Path) -> list[dict[str, str]]:
        if not path.is_file() and not path.is_absolute():
            raise DataError(
                f"{path}: no such file in the current directory {Path.cwd()}: the {role} path that "
                f"{expert.distribution}'s mtg_data_files gives for {expert.name!r} is relative, so it resolves against "
                "wherever the command runs; build it from the package, e.g. Path(__file__).parent / \"data\" / ..."
            )
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
