"""A third party's path: scaffold a new expert outside the repo, pip install it, see it listed, train it."""

import json
import logging
import subprocess
import sys
import time
from importlib.metadata import distributions

import pytest
from click.testing import CliRunner

from conftest import EXPERTS, MTG_TRAIN, ROOT, add_plugin, cli_env
from mtg_core import hookimpl
from mtg_core.commands.eval import eval_command
from mtg_core.commands.train import train_command
from mtg_core.errors import ConfigError
from mtg_core.plugins import MAX_EVAL_PROMPTS
from mtg_core.scaffold import scaffold


def pip_install(target, *packages):
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", "--target", str(target), *map(str, packages)],
        check=True,
    )


def test_expert_package_installs_with_pip_with_its_data_and_entry_point(tmp_path):
    pip_install(tmp_path, ROOT / "mtg_expert_predict")
    package = tmp_path / "mtg_expert_predict"
    assert (package / "template.txt").is_file()
    assert (package / "data" / "training" / "predict_examples.jsonl").is_file()
    assert (package / "data" / "heldout" / "predict_heldout.jsonl").is_file()
    (dist,) = [d for d in distributions(path=[str(tmp_path)]) if d.metadata["Name"] == "mtg-expert-predict"]
    assert [(ep.group, ep.name, ep.value) for ep in dist.entry_points] == [("mtg_core", "predict", "mtg_expert_predict.plugin:plugin")]


def test_scaffolded_expert_is_discovered_tested_and_trained(tmp_path):
    root = scaffold("judge", "Tournament judge calls", tmp_path / "src")
    site = tmp_path / "site"
    pip_install(site, root)
    env = cli_env(site)
    rows = json.loads(subprocess.run([*MTG_TRAIN, "--list", "--json"], env=env, capture_output=True, text=True, check=True).stdout)
    (judge,) = [row for row in rows if row["name"] == "judge"]
    assert judge == {**judge, "distribution": "mtg-expert-judge", "status": "warning", "rank": 8, "examples": 2, "heldout_examples": 1,
                     "errors": []}
    assert [w.split(":")[0] for w in judge["warnings"]] == ["only 2 training examples", "only 1 held-out example"]
    # the test file the template ships passes against the installed package, calling every owned hook
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                           env=env, capture_output=True, text=True, cwd=tmp_path)
    assert tests.returncode == 0 and "1 passed" in tests.stdout, tests.stdout + tests.stderr
    out = tmp_path / "adapters"
    trained = subprocess.run([*MTG_TRAIN, "--expert", "judge", "--max-steps", "1", "--output-dir", str(out)],
                             env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((out / "judge" / "training_meta.json").read_text())["plugin"]["distribution"] == "mtg-expert-judge"


def test_scaffold_refuses_bad_names_and_existing_folders(tmp_path):
    with pytest.raises(ConfigError, match="expert name 'Bad-Name' is invalid"):
        scaffold("Bad-Name", "x", tmp_path)
    scaffold("ok", "fine", tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        scaffold("ok", "fine", tmp_path)
    with pytest.raises(ConfigError, match="without quotes"):
        scaffold("other", 'say "hi"', tmp_path)
    with pytest.raises(ConfigError, match="or braces"):
        scaffold("other", "cards like {card}", tmp_path)


def test_a_package_built_without_its_data_is_listed_with_the_package_data_fix(tmp_path):
    root = scaffold("judge", "Tournament judge calls", tmp_path / "src")
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().split("[tool.setuptools.package-data]")[0])
    site = tmp_path / "site"
    pip_install(site, root)
    rows = {row["name"]: row for row in json.loads(subprocess.run([*MTG_TRAIN, "--list", "--json"], env=cli_env(site),
                                                                  capture_output=True, text=True, check=True).stdout)}
    assert all(rows[name]["status"] == "ok" for name in EXPERTS)
    assert rows["judge"]["status"] == "error"
    assert "template.txt: no such file; if the package was installed without it, add \"template.txt\" to " \
           "[tool.setuptools.package-data] mtg_expert_judge in its pyproject.toml" in rows["judge"]["error"]
    assert "judge_examples.jsonl: no such file, the training data" in rows["judge"]["error"]
    trained = subprocess.run([*MTG_TRAIN, "--expert", "judge"], env=cli_env(site), capture_output=True, text=True)
    assert trained.returncode == 2 and "[tool.setuptools.package-data]" in trained.stderr and "reinstall" in trained.stderr
    assert "(and 2 more problems: see mtg-train --list)" in trained.stderr and "Traceback" not in trained.stderr


def test_a_cross_cutting_plugin_full_of_mistakes_costs_only_itself_in_training_and_evaluation(tmp_path, monkeypatch, caplog):
    from transformers import TrainerCallback

    class StopAtLoss(TrainerCallback):
        """The trial's callback: on_log fires once more at the end without "loss", and this raises KeyError there."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs["loss"] < 0.5:
                control.should_training_stop = True

    class Mistakes:
        @hookimpl
        def mtg_trainer_callbacks(self, expert):
            return [StopAtLoss()]

    class OneObject:
        @hookimpl
        def mtg_trainer_callbacks(self, expert):
            return TrainerCallback()

    class OnePrompt:
        @hookimpl
        def mtg_eval_prompts(self, expert):
            return "What does this expert do?"

    class SlowStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(1.0)

    class Busy:
        """The trial's stall: a callback that sleeps through each step, and thousands of evaluation prompts."""

        @hookimpl
        def mtg_trainer_callbacks(self, expert):
            return [SlowStep]

        @hookimpl
        def mtg_eval_prompts(self, expert):
            return [f"Question {i}?" for i in range(5000)]

    for plugin, name in [(Mistakes(), "stop-at-loss"), (OneObject(), "one-object"), (OnePrompt(), "one-prompt"), (Busy(), "busy")]:
        add_plugin(monkeypatch, plugin, name)
    out = tmp_path / "adapters"
    with caplog.at_level(logging.WARNING, logger="mtg_core"):
        trained = CliRunner().invoke(train_command, ["--expert", "explain", "--max-steps", "1", "--max-samples", "4", "--batch-size", "4",
                                                     "--grad-accum", "1", "--seq-len", "256", "--output-dir", str(out)])
        assert trained.exit_code == 0, trained.output
        evaluated = CliRunner().invoke(eval_command, ["--expert", "explain", "--adapters", str(out), "--no-fail", "--max-new-tokens", "4"])
        assert evaluated.exit_code == 0, evaluated.output
    assert (out / "explain" / "adapter_model.safetensors").is_file()
    skips = [r.getMessage() for r in caplog.records if " skipped: " in r.getMessage()]
    assert "plugin 'stop-at-loss' (not installed) skipped: mtg_trainer_callbacks(expert='explain') " + (
           "StopAtLoss.on_log raised KeyError: 'loss'; the callback is off for the rest of the run") + "; the other plugins go on" in skips
    assert sum("plugin 'stop-at-loss'" in line for line in skips) == 1
    assert any(line.startswith("plugin 'one-object' (not installed) skipped: mtg_trainer_callbacks(expert='explain') returned "
                               "a TrainerCallback, not a list") for line in skips)
    assert any(line.startswith("plugin 'one-prompt' (not installed) skipped: mtg_eval_prompts(expert='explain') returned "
                               "a str, not a list: 'What does this expert do?'") for line in skips)
    evaluation = json.loads((out / "explain" / "eval.json").read_text())
    samples = evaluation["samples"]
    assert [s["plugin"] for s in samples] == ["explain"] * 3 + ["busy"] * MAX_EVAL_PROMPTS
    assert "What does this expert do?" not in [s["prompt"] for s in samples]
    assert f"busy' (not installed) skipped: mtg_eval_prompts(expert='explain') returned 5000 prompts; the first " \
           f"{MAX_EVAL_PROMPTS} are asked and {5000 - MAX_EVAL_PROMPTS} dropped" in " ".join(skips)
    assert f"  explain: adapter answer {3 + MAX_EVAL_PROMPTS}/{3 + MAX_EVAL_PROMPTS} (" in evaluated.output  # progress
    meta = json.loads((out / "explain" / "training_meta.json").read_text())
    for record in (evaluation, meta):
        assert {p["plugin"]: p["hooks"] for p in record["cross_cutting_plugins"]} == {
            "busy": ["mtg_eval_prompts", "mtg_trainer_callbacks"], "stop-at-loss": ["mtg_trainer_callbacks"]}
    (slow,) = [c for c in meta["plugin_callbacks"] if c["callback"] == "SlowStep"]
    assert slow["plugin"] == "busy" and slow["steps"] == 1 and slow["seconds_per_step"] >= 1.0 and slow["share_of_step"] > 0.1
    (timed,) = [r.getMessage() for r in caplog.records if "callback SlowStep took" in r.getMessage()]
    assert timed.startswith("plugin 'busy': callback SlowStep took 1.") and "training explain" in timed
    recorded = {"training_meta.json": ("stop-at-loss", "one-object"), "eval.json": ("one-prompt",)}
    for file, plugins in recorded.items():
        skipped = json.loads((out / "explain" / file).read_text())["skipped_plugins"]
        assert {s["plugin"] for s in skipped} >= set(plugins), (file, skipped)
        assert all(s["expert"] == "explain" and s["reason"] for s in skipped)


def test_new_expert_hint_installs_the_folder_and_a_shipped_name_is_warned_about(tmp_path, monkeypatch):
    from mtg_core.commands.new_expert import new_expert_command

    monkeypatch.chdir(tmp_path)
    made = CliRunner().invoke(new_expert_command, ["judge", "-d", "Tournament judge calls"])
    assert made.exit_code == 0 and made.stderr == ""
    assert "`pip install ./mtg_expert_judge`" in made.stdout  # a bare name would go to the package index
    assert "a real expert needs at least 50 and 10" in made.stdout
    clash = CliRunner().invoke(new_expert_command, ["explain", "-d", "Rules explained my way"])
    assert clash.exit_code == 0 and (tmp_path / "mtg_expert_explain").is_dir()
    assert clash.stderr.strip() == ("warning: 'explain' is a shipped expert: this package is also called mtg-expert-explain, "
                                    "so installing it replaces the shipped one (and reinstalling mtg_core's experts replaces "
                                    "yours); choose another name unless you mean to replace it")
