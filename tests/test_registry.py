"""Discovery through entry points, isolation of broken plugins, name clashes, the allow-list, hook contracts.

The mistakes are those a developer new to the project made writing a JUDGE mode and a cross-cutting
plugin from the docs alone (issue 13); in every one of them the shipped experts must keep working.
"""

import json
import logging
import subprocess
import sys

import pytest
from transformers import TrainerCallback

from conftest import EXPERTS, MTG_TRAIN, ToyExpert, cli_env, make_dist, write_jsonl
from mtg_core import DataFiles, ExpertInfo, FormattedExample, LoraSettings, hookimpl
from mtg_core.errors import DataError, PluginError, UnknownExpertError
from mtg_core.plugins import Registry


def list_json(env, *flags) -> list[dict]:
    result = subprocess.run([*MTG_TRAIN, "--list", "--json", *flags], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def shipped_still_work(registry: Registry) -> None:
    for name in EXPERTS:
        expert = registry.expert(name)
        assert registry.check(expert).problems == () and registry.eval_prompts(expert), name


class Full(ToyExpert):
    """A hand-written plugin answering every hook for its expert, from data written to `data_dir`."""

    def __init__(self, data_dir, name="toy", rank=4):
        super().__init__(name, rank)
        self.data = write_jsonl(data_dir / f"{name}.jsonl", [{"input": "q1", "output": "a1"}, {"input": "q2", "output": "a2"}])

    @hookimpl
    def mtg_data_files(self, expert):
        return DataFiles(train=self.data, heldout=self.data) if expert == self.name else None

    @hookimpl
    def mtg_format_example(self, expert, record):
        return FormattedExample(f"Q: {record['input']}\nA:", record["output"]) if expert == self.name else None

    @hookimpl
    def mtg_eval_prompts(self, expert):
        return ["What does the toy do?"] if expert == self.name else None


def test_the_five_installed_experts_are_discovered_with_the_seed_settings():
    registry = Registry.discover()
    found = {e.name: e for e in registry.experts()}
    assert set(EXPERTS) <= set(found)
    lora = {name: registry.lora_settings(found[name]) for name in EXPERTS}
    assert {name: s.rank for name, s in lora.items()} == {"reason": 16, "explain": 16, "teach": 8, "predict": 16, "retrospect": 8}
    assert lora["explain"].dropout > lora["reason"].dropout
    for name in EXPERTS:
        expert = found[name]
        assert expert.distribution == f"mtg-expert-{name}" and expert.version == "0.1.0" and expert.error is None
        files = registry.data_files(expert)
        assert files.train.is_file() and files.heldout.is_file()
        assert len(registry.eval_prompts(expert)) >= 3
        check = registry.check(expert)
        assert check.problems == () and check.examples > 0 and check.heldout_examples > 0
    assert registry.failures == [] and registry.skipped == []


def test_each_expert_formats_with_its_own_template():
    registry = Registry.discover()
    record = {"input": "Does deathtouch work with trample?", "output": "Yes."}
    prompts = {name: registry.format_example(registry.expert(name), record) for name in EXPERTS}
    assert len({p.prompt for p in prompts.values()}) == len(EXPERTS)
    for name, example in prompts.items():
        assert record["input"] in example.prompt and name.upper() in example.prompt
        assert example.completion == "Yes." and "Yes." not in example.prompt


def test_expert_names_are_case_insensitive_and_unknown_names_list_the_installed():
    registry = Registry.discover()
    assert registry.expert("EXPLAIN").name == "explain"
    with pytest.raises(UnknownExpertError, match="installed: explain, predict, reason, retrospect, teach"):
        registry.expert("nosuch")


# -- the trial's mistakes, installed as real distributions -----------------------------------------

TEMPLATE = "[INST] You are the JUDGE expert. Question: {input} [/INST]"
GOOD_RECORD = '{"input": "A player forgot a trigger.", "output": "Apply the missed-trigger policy."}\n'
# as many examples as --list asks of a real expert (fewer are a warning)
TRAINING = "".join(json.dumps({"input": f"Player {i} forgot a trigger.", "output": "Apply the missed-trigger policy."}) + "\n"
                   for i in range(50))
HELDOUT = "".join(json.dumps({"input": f"Player {i} drew an extra card.", "output": "Apply the hidden-card policy."}) + "\n"
                  for i in range(10))


def packaged(name, template=TEMPLATE, training=TRAINING, heldout=HELDOUT, dropout=0.05, prompts="['q']"):
    """The files of a PackagedExpert package `acme_<name>` (None leaves a file out, as a build without package-data does)."""
    files = {
        f"acme_{name}/__init__.py": "",
        f"acme_{name}/plugin.py": (
            "from mtg_core import ExpertInfo, LoraSettings, PackagedExpert\n"
            f"plugin = PackagedExpert(info=ExpertInfo({name!r}, 'Judge calls'),\n"
            f"                        lora=LoraSettings(rank=8, alpha=16, dropout={dropout}),\n"
            f"                        package='acme_{name}', eval_prompts={prompts})\n"
        ),
        f"acme_{name}/template.txt": template,
        f"acme_{name}/data/training/{name}_examples.jsonl": training,
        f"acme_{name}/data/heldout/{name}_heldout.jsonl": heldout,
    }
    return {path: text for path, text in files.items() if text is not None}


HOOK = "from mtg_core import hookimpl\n"
CROSS_CUTTING = {
    "acme_strprompts.py": HOOK + "@hookimpl\ndef mtg_eval_prompts(expert):\n    return 'What does ' + expert + ' do?'\n",
    # one object instead of a list (not a TrainerCallback either: importing transformers here would cost seconds)
    "acme_onecallback.py": HOOK + "class StopAtLoss:\n    pass\n@hookimpl\ndef mtg_trainer_callbacks(expert):\n    return StopAtLoss()\n",
    "acme_unmarked.py": "def mtg_eval_prompts(expert):\n    return ['never asked']\n",
    "acme_misspelt.py": HOOK + "@hookimpl\ndef mtg_eval_prompt(expert):\n    return ['never asked']\n",
    "acme_raising.py": HOOK + "@hookimpl\ndef mtg_eval_prompts(expert):\n    raise RuntimeError('no network')\n",
    "acme_rank0.py": "from mtg_core import LoraSettings\nSETTINGS = LoraSettings(rank=0, alpha=1, dropout=0)\n",
}
MISTAKES = {
    # entry point -> (module it points at, status, what the message must say)
    "judge_noinput": ("acme_judge_noinput.plugin:plugin", "error",
                      "template.txt: no {input} placeholder, so the question would never reach the model"),
    "judge_braces": ("acme_judge_braces.plugin:plugin", "error",
                     "template.txt:2: {card} is not a placeholder (only {input} is filled); write a literal brace doubled: {{card}}"),
    "judge_noheldout": ("acme_judge_noheldout.plugin:plugin", "error",
                        "judge_noheldout_heldout.jsonl: no such file, the held-out data that acme-mistakes's mtg_data_files gives"),
    "judge_nooutput": ("acme_judge_nooutput.plugin:plugin", "error", "judge_nooutput_examples.jsonl:2: no 'output' key"),
    "judge_dropout": ("acme_judge_dropout.plugin:plugin", "error",
                      "ValueError: LoraSettings: dropout must be a number with 0 <= dropout < 1, got 1.5"),
    "judge_strprompts": ("acme_judge_strprompts.plugin:plugin", "error",
                         "PackagedExpert: eval_prompts must be a non-empty list of non-empty strings, got 'q'"),
    "strprompts": ("acme_strprompts", "error",
                   "mtg_eval_prompts returned a str, not a list, for experts explain, judge_braces, judge_noheldout"),
    "onecallback": ("acme_onecallback", "error", "mtg_trainer_callbacks returned a StopAtLoss, not a list, for experts"),
    "raising": ("acme_raising", "error", "mtg_eval_prompts raised RuntimeError, for experts explain"),
    "unmarked": ("acme_unmarked", "warning", "mtg_eval_prompts has no @hookimpl, so it is never called"),
    "misspelt": ("acme_misspelt", "error", "unknown hook mtg_eval_prompt (did you mean mtg_eval_prompts?)"),
    "missing": ("acme_not_installed", "error", "No module named 'acme_not_installed'; acme-mistakes is installed without its module"),
    "rank0": ("acme_rank0", "error", "acme_rank0.py:2: ValueError: LoraSettings: rank must be an integer with 1 <= rank <= 1024, got 0"),
}


@pytest.fixture(scope="module")
def mistakes_site(tmp_path_factory):
    modules = {**CROSS_CUTTING, **packaged("judge_ok"), **packaged("judge_noinput", template="Judge this."),
               **packaged("judge_braces", template="Rules:\nsee {card}\n{input}"),
               **packaged("judge_noheldout", heldout=None),
               **packaged("judge_nooutput", training=GOOD_RECORD + '{"input": "Is this fine?"}\n'),
               **packaged("judge_dropout", dropout=1.5), **packaged("judge_strprompts", prompts="'q'")}
    entry_points = {name: target for name, (target, _, _) in MISTAKES.items()}
    return make_dist(tmp_path_factory.mktemp("site"), "acme-mistakes", {**entry_points, "judge_ok": "acme_judge_ok.plugin:plugin"}, modules)


def test_every_mistake_is_one_row_naming_its_cause_and_the_other_experts_stay_ok(mistakes_site):
    result = subprocess.run([*MTG_TRAIN, "--list", "--json", "--strict"], env=cli_env(mistakes_site), capture_output=True, text=True)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for name in (*EXPERTS, "judge_ok"):
        assert rows[name]["status"] == "ok" and rows[name]["errors"] == [], rows[name]
    for name, (_, status, message) in MISTAKES.items():
        assert rows[name]["status"] == status and message in " | ".join(rows[name]["errors"] + rows[name]["warnings"]), rows[name]
        assert rows[name]["distribution"] == "acme-mistakes"
    assert rows["strprompts"]["kind"] == "plugin" and rows["strprompts"]["hooks"] == ["mtg_eval_prompts"]
    assert "Attribute(" not in result.stdout and "Traceback" not in result.stderr
    bad = sum(status != "ok" for _, status, _ in MISTAKES.values())
    assert result.returncode == 2 and f"error: --strict: {bad} of {len(rows)} rows are not ok" in result.stderr
    assert "judge_braces (error)" in result.stderr and "unmarked (warning)" in result.stderr


def test_commands_refuse_a_broken_expert_at_once_and_the_others_keep_working(mistakes_site, monkeypatch, caplog):
    env = cli_env(mistakes_site)
    for name, (_, _, message) in MISTAKES.items():
        if name.startswith("judge_"):
            result = subprocess.run([*MTG_TRAIN, "--expert", name], env=env, capture_output=True, text=True, timeout=60)
            assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
    mtg_eval = [sys.executable, "-c", "from mtg_core.commands.eval import eval_command; eval_command()"]
    result = subprocess.run([*mtg_eval, "--expert", "judge_noheldout"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and MISTAKES["judge_noheldout"][2] in result.stderr and "loaded" not in result.stderr
    monkeypatch.syspath_prepend(str(mistakes_site))
    registry = Registry.discover()
    with caplog.at_level(logging.WARNING, logger="mtg_core"):
        shipped_still_work(registry)
        registry.trainer_callbacks(registry.expert("judge_ok"))
    # each collecting hook's mistake is announced once, naming the plugin, when an expert is first asked for
    warnings = sorted(r.getMessage().split(":")[0] for r in caplog.records)
    assert warnings == ["plugin 'onecallback' (acme-mistakes) skipped", "plugin 'raising' (acme-mistakes) skipped",
                        "plugin 'strprompts' (acme-mistakes) skipped"]
    assert {(s["plugin"], s["expert"]) for s in registry.skipped} == {
        (plugin, expert) for plugin in ("onecallback", "raising", "strprompts") for expert in (*EXPERTS, "judge_ok")}


def test_an_expert_whose_plugin_failed_says_so_instead_of_not_installed(mistakes_site):
    site = make_dist(mistakes_site.parent / "judge_import_site", "mtg-expert-judge", {"judge": "acme_judge_import.plugin:plugin"},
                     packaged("judge_import", dropout="'high'"))
    result = subprocess.run([*MTG_TRAIN, "--expert", "judge", "--plan"], env=cli_env(site, MTG_PLUGINS="explain,judge"),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: expert 'judge' is not available: plugin 'judge' of mtg-expert-judge failed: import failed at ")
    assert "plugin.py:3: ValueError: LoraSettings: dropout must be a number with 0 <= dropout < 1, got 'high'" in result.stderr
    other = subprocess.run([*MTG_TRAIN, "--expert", "judge"], env=cli_env(mistakes_site, MTG_PLUGINS="explain,missing"),
                           capture_output=True, text=True)
    assert other.returncode == 2 and other.stderr.startswith(
        "error: no expert named 'judge' is installed (installed: explain); install one with `pip install ./mtg_expert_<name>` "
        "or check $MTG_PLUGINS; searched the entry points of group 'mtg_core' in every installed distribution; "
        "plugin 'missing' of acme-mistakes, which may provide it, failed: import failed: ModuleNotFoundError")


def test_import_error_and_bad_hookimpl_are_isolated_and_named(tmp_path):
    site = make_dist(
        tmp_path,
        "acme-broken",
        {"brokenimport": "acme_missing_module:plugin", "badimpl": "acme_bad:plugin", "typo": "acme_typo:plugin"},
        {
            "acme_bad.py": "from mtg_core import hookimpl\nclass P:\n    @hookimpl\n    def mtg_lora_settings(self, expert, wrong_arg):\n        pass\nplugin = P()\n",
            "acme_typo.py": "from mtg_core import hookimpl\nclass P:\n    @hookimpl\n    def mtg_lora_setings(self, expert):\n        pass\nplugin = P()\n",
        },
    )
    rows = {row["name"]: row for row in list_json(cli_env(site))}
    assert all(rows[name]["status"] == "ok" for name in EXPERTS)
    assert rows["brokenimport"]["status"] == "error" and "ModuleNotFoundError" in rows["brokenimport"]["error"]
    assert rows["badimpl"]["status"] == "error" and "wrong_arg" in rows["badimpl"]["error"]
    assert rows["typo"]["status"] == "error" and "unknown hook mtg_lora_setings (did you mean mtg_lora_settings?)" in rows["typo"]["error"]
    assert {rows[n]["distribution"] for n in ("brokenimport", "badimpl", "typo")} == {"acme-broken"}


# -- name clashes ------------------------------------------------------------------------------

def test_a_third_party_expert_named_like_a_shipped_one_is_refused_and_the_allow_list_picks_it(tmp_path, monkeypatch):
    site = make_dist(tmp_path, "acme-explain", {"acme_explain": "acme_explain:plugin"},
                     {"acme_explain.py": "import conftest\nplugin = conftest.ToyExpert('explain')\n"})
    env = cli_env(site, "tests")
    rows = [row for row in list_json(env) if row["name"] == "explain"]
    assert [(row["distribution"], row["status"]) for row in rows] == [("mtg-expert-explain", "ok"), ("acme-explain", "error")]
    assert rows[1]["error"].startswith("expert 'explain' of acme-explain (plugin 'acme_explain') is not used: mtg-expert-explain "
                                       "(plugin 'explain'), shipped with mtg_core, registers it too and wins; to use acme-explain's, "
                                       "leave 'explain' out of $MTG_PLUGINS, e.g. MTG_PLUGINS=acme_explain,predict,reason,retrospect,teach")
    monkeypatch.syspath_prepend(str(site))
    assert Registry.discover().expert("explain").distribution == "mtg-expert-explain"
    chosen = [row for row in list_json(cli_env(site, "tests", MTG_PLUGINS="acme_explain,reason"))]
    assert [(row["name"], row["distribution"], row["status"]) for row in chosen] == [
        ("explain", "acme-explain", "error"), ("reason", "mtg-expert-reason", "ok")]
    assert "implements no mtg_data_files" in chosen[0]["error"]  # ToyExpert is a fragment: the chosen one is checked


def test_two_third_party_claims_on_one_name_are_both_refused_until_the_allow_list_chooses(tmp_path):
    site = make_dist(tmp_path / "a", "acme-judge", {"acme_judge": "acme_judge:plugin"},
                     {"acme_judge.py": "import conftest\nplugin = conftest.ToyExpert('judge')\n"})
    make_dist(tmp_path / "a", "other-judge", {"other_judge": "other_judge:plugin"},
              {"other_judge.py": "import conftest\nplugin = conftest.ToyExpert('judge', rank=8)\n"})
    rows = [row for row in list_json(cli_env(site, "tests")) if row["name"] == "judge"]
    assert len(rows) == 2 and all(row["status"] == "error" for row in rows)
    assert "registered by both acme-judge (plugin 'acme_judge') and other-judge (plugin 'other_judge'), so neither is used" in rows[0]["error"]
    result = subprocess.run([*MTG_TRAIN, "--expert", "judge"], env=cli_env(site, "tests"), capture_output=True, text=True)
    assert result.returncode == 2 and "registered by both" in result.stderr and "Traceback" not in result.stderr
    (chosen,) = [row for row in list_json(cli_env(site, "tests", MTG_PLUGINS="other-judge")) if row["name"] == "judge"]
    assert chosen["distribution"] == "other-judge" and chosen["rank"] == 8


def test_an_entry_point_named_like_a_shipped_one_is_not_loaded_unless_chosen_by_distribution(tmp_path):
    site = make_dist(tmp_path, "acme-teach", {"teach": "acme_teach:plugin"},
                     {"acme_teach.py": "import conftest\nplugin = conftest.ToyExpert('teach', rank=32)\n"})
    rows = [row for row in list_json(cli_env(site, "tests")) if row["name"] == "teach"]
    assert [(row["distribution"], row["status"], row["rank"]) for row in rows] == [
        ("mtg-expert-teach", "ok", 8), ("acme-teach", "error", None)]
    assert "entry point 'teach' is not loaded: mtg-expert-teach, shipped with mtg_core, uses the same name and wins" in rows[1]["error"]
    (chosen,) = list_json(cli_env(site, "tests", MTG_PLUGINS="acme_teach"))
    assert (chosen["name"], chosen["distribution"], chosen["rank"]) == ("teach", "acme-teach", 32)


def test_allow_list_limits_which_plugins_load():
    rows = list_json(cli_env(MTG_PLUGINS="teach, PREDICT"))
    assert sorted(row["name"] for row in rows) == ["predict", "teach"]
    assert [row["name"] for row in list_json(cli_env(MTG_PLUGINS="mtg-expert-reason"))] == ["reason"]
    assert list_json(cli_env(MTG_PLUGINS="")) == []


# -- every hook's answer is checked, per plugin ---------------------------------------------------

WRONG_ANSWERS = {
    # hook -> (a wrong answer, what the message says); tests/test_meta.py checks every hook is here
    "mtg_register_experts": (ExpertInfo("toy", "not in a list"), "mtg_register_experts() returned an ExpertInfo"),
    "mtg_lora_settings": ({"rank": 8}, "mtg_lora_settings(expert='toy') returned a dict ({'rank': 8}); it must return a mtg_core.LoraSettings"),
    "mtg_data_files": ("toy.jsonl", "mtg_data_files(expert='toy') returned a str ('toy.jsonl'); it must return a mtg_core.DataFiles"),
    "mtg_format_example": (("Q", "A"), "mtg_format_example(expert='toy') returned a tuple (('Q', 'A')); it must return a mtg_core.FormattedExample"),
    "mtg_eval_prompts": ("What?", "mtg_eval_prompts returned a str, not a list, for experts explain, predict, reason, retrospect, teach, toy"),
    "mtg_trainer_callbacks": (TrainerCallback(), "mtg_trainer_callbacks returned a TrainerCallback, not a list, for experts explain"),
}


@pytest.mark.parametrize("hook", WRONG_ANSWERS)
def test_a_wrong_answer_to_any_hook_is_named_and_costs_only_its_plugin(hook, tmp_path, caplog):
    wrong, message = WRONG_ANSWERS[hook]
    registry = Registry.discover()
    registry.register(Full(tmp_path), "toy")
    answer_wrongly = hookimpl(lambda **kwargs: wrong)
    if hook in ("mtg_eval_prompts", "mtg_trainer_callbacks"):  # a cross-cutting plugin adds to every expert
        plugin = type("CrossCutting", (), {hook: staticmethod(hookimpl(lambda expert: wrong))})()
        assert registry.register(plugin, "wrong")
        assert any(message in error for error in registry.plugin_report("wrong").errors), registry.plugin_report("wrong")
        with caplog.at_level(logging.WARNING, logger="mtg_core"):
            collected = getattr(registry, hook.removeprefix("mtg_"))(registry.expert("toy"))
        assert wrong not in collected and registry.skipped[0]["plugin"] == "wrong" and registry.skipped[0]["hook"] == hook
        assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
            f"plugin 'wrong' (not installed) skipped: {hook}(expert='toy') {registry.skipped[0]['reason']}; the other plugins go on"]
        assert registry.skipped_for("toy") == [registry.skipped[0]] and registry.skipped_for("reason") == []
    elif hook == "mtg_register_experts":
        plugin = type("Registers", (), {hook: staticmethod(hookimpl(lambda: wrong))})()
        assert not registry.register(plugin, "wrong")
        assert message in registry.failures[0].reason and "wrong" not in {p.name for p in registry.plugins()}
    else:  # the plugin that registered the expert answers wrongly about it
        registry.unregister("toy")
        owner = Full(tmp_path)
        setattr(owner, hook, answer_wrongly)
        registry.register(owner, "toy")
        with pytest.raises(PluginError, match="plugin 'toy'") as refused:
            registry.expert("toy")
        assert message in str(refused.value)
    shipped_still_work(registry)


def test_hooks_that_raise_are_named_with_the_plugin_and_the_hook(tmp_path):
    class Raising(Full):
        @hookimpl
        def mtg_format_example(self, expert, record):
            raise KeyError("prompt")

    registry = Registry()
    registry.register(Raising(tmp_path), "raising")
    expert = registry.experts()[0]
    # the plugin's own line, so that its author finds it without --debug
    line = f"{__file__}:{Raising.mtg_format_example.__code__.co_firstlineno + 2}"
    with pytest.raises(PluginError) as refused:
        registry.format_example(expert, {"input": "a", "output": "b"})
    assert str(refused.value) == f"plugin 'raising' (not installed) failed in mtg_format_example for expert 'toy': KeyError at {line}: 'prompt'"
    with pytest.raises(PluginError, match="failed in mtg_format_example"):
        registry.expert("toy")


def test_invalid_lora_settings_are_refused_with_field_value_and_range(tmp_path):
    for settings, message in [(dict(rank=0, alpha=1, dropout=0), "rank must be an integer with 1 <= rank <= 1024, got 0"),
                              (dict(rank=8, alpha=16, dropout=1.5), "dropout must be a number with 0 <= dropout < 1, got 1.5"),
                              (dict(rank="8", alpha=16, dropout=0), "rank must be an integer with 1 <= rank <= 1024, got '8'"),
                              (dict(rank=8, alpha=0, dropout=0), "alpha must be a number with 0 < alpha <= 4096, got 0.0"),
                              (dict(rank=8, alpha=16, dropout=0, target_modules="q_proj"),
                               "target_modules must be a non-empty list of non-empty strings, got 'q_proj'")]:
        with pytest.raises(ValueError) as refused:
            LoraSettings(**settings)
        assert str(refused.value) == f"LoraSettings: {message}"

    class Settings(Full):
        @hookimpl
        def mtg_lora_settings(self, expert):
            return LoraSettings(rank=0, alpha=1, dropout=0)

    registry = Registry()
    registry.register(Settings(tmp_path), "zero-rank")
    with pytest.raises(PluginError) as refused:
        registry.expert("toy")
    assert str(refused.value) == ("plugin 'zero-rank' (not installed) failed in mtg_lora_settings for expert 'toy': "
                                  f"ValueError at {__file__}:{Settings.mtg_lora_settings.__code__.co_firstlineno + 2}: "
                                  "LoraSettings: rank must be an integer with 1 <= rank <= 1024, got 0")


def test_a_format_that_drops_the_input_or_shows_the_output_is_caught(tmp_path):
    class NoInput(Full):
        @hookimpl
        def mtg_format_example(self, expert, record):
            return FormattedExample("Answer the question.", record["output"])

    class ShowsAnswer(Full):
        @hookimpl
        def mtg_format_example(self, expert, record):
            return FormattedExample(f"{record['input']} (hint: {record['output']})", record["output"])

    for plugin, message in [(NoInput(tmp_path), "leaves the record's input out of the prompt"),
                            (ShowsAnswer(tmp_path), "puts the record's output into the prompt")]:
        registry = Registry()
        registry.register(plugin, "toy")
        with pytest.raises(PluginError, match=message):
            registry.expert("toy")


def test_a_missing_data_file_names_the_package_data_fix(tmp_path):
    class Missing(Full):
        @hookimpl
        def mtg_data_files(self, expert):
            return DataFiles(train=self.data, heldout=tmp_path / "gone.jsonl")

    registry = Registry()
    registry.register(Missing(tmp_path), "toy")
    with pytest.raises(DataError, match=r"gone.jsonl: no such file, the held-out data .* list the file under "
                                        r"\[tool.setuptools.package-data\] in its pyproject.toml and reinstall"):
        registry.expert("toy")


def test_a_raising_callback_is_switched_off_once_and_training_callbacks_keep_their_class(caplog):
    class Raises(TrainerCallback):
        calls = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            Raises.calls += 1
            raise ValueError(f"no loss in {sorted(logs)}")

    class Plugin:
        @hookimpl
        def mtg_trainer_callbacks(self, expert):
            return [Raises, TrainerCallback()]

    registry = Registry.discover()
    registry.register(Plugin(), "raises")
    callbacks = registry.trainer_callbacks(registry.expert("teach"))
    assert [type(c) for c in callbacks] == [Raises, TrainerCallback]
    with caplog.at_level(logging.WARNING, logger="mtg_core"):
        for _ in range(3):
            assert callbacks[0].on_log(None, None, None, logs={"train_runtime": 1.0}) is None
    assert Raises.calls == 1
    assert registry.skipped == [{"plugin": "raises", "distribution": "not installed", "hook": "mtg_trainer_callbacks",
                                 "expert": "teach", "reason": "Raises.on_log raised ValueError: no loss in ['train_runtime']; "
                                                              "the callback is off for the rest of the run"}]
    assert len([r for r in caplog.records if "Raises.on_log" in r.getMessage()]) == 1
    assert callbacks[1].on_step_end(None, None, None) is None  # the healthy one is untouched


def test_a_plugin_without_any_hookimpl_gets_a_warning_row(tmp_path):
    class Forgot:
        def mtg_eval_prompts(self, expert):
            return ["never asked"]

    registry = Registry.discover()
    assert registry.register(Forgot(), "forgot")
    (warning_about_function, no_hook) = registry.plugin_report("forgot").warnings
    assert warning_about_function.startswith("mtg_eval_prompts has no @hookimpl, so it is never called")
    assert no_hook.startswith("implements no hook, so nothing of it is used")
    assert "never asked" not in registry.eval_prompts(registry.expert("reason"))


def test_cross_cutting_plugin_adds_prompts_and_callbacks_to_every_expert(tmp_path):
    class Everywhere:
        @hookimpl
        def mtg_eval_prompts(self, expert):
            return [f"What is the {expert} expert for?"]

        @hookimpl
        def mtg_trainer_callbacks(self, expert):
            return [TrainerCallback()]

    registry = Registry.discover()
    base = {name: registry.eval_prompts(registry.expert(name)) for name in EXPERTS}
    assert all(registry.trainer_callbacks(registry.expert(name)) == [] for name in EXPERTS)
    registry.register(Everywhere(), "everywhere")
    assert registry.plugin_report("everywhere").errors == ()
    assert {p.name: p.hooks for p in registry.plugins()}["everywhere"] == ("mtg_eval_prompts", "mtg_trainer_callbacks")
    for name in EXPERTS:
        expert = registry.expert(name)
        assert sorted(registry.eval_prompts(expert)) == sorted([*base[name], f"What is the {name} expert for?"])
        assert len(registry.trainer_callbacks(expert)) == 1
    registry.unregister("everywhere")
    assert registry.eval_prompts(registry.expert("reason")) == base["reason"]


def test_healthy_cross_cutting_plugins_are_listed_with_their_hooks(tmp_path):
    site = make_dist(tmp_path, "acme-extra", {"extra": "acme_extra"},
                     {"acme_extra.py": HOOK + "@hookimpl\ndef mtg_eval_prompts(expert):\n    return ['One more question?']\n"})
    (row,) = [row for row in list_json(cli_env(site)) if row["name"] == "extra"]
    assert row == {**row, "kind": "plugin", "status": "ok", "distribution": "acme-extra", "hooks": ["mtg_eval_prompts"],
                   "description": "registers no expert; implements mtg_eval_prompts"}
    table = subprocess.run([*MTG_TRAIN, "--list", "--strict"], env=cli_env(site), capture_output=True, text=True)
    assert table.returncode == 0 and "    registers no expert; implements mtg_eval_prompts" in table.stdout


def test_a_hand_written_plugin_answers_every_owned_hook(tmp_path):
    registry = Registry()
    registry.register(Full(tmp_path), "full")
    expert = registry.expert("toy")
    assert registry.lora_settings(expert) == LoraSettings(4, 8, 0.0)
    assert registry.data_files(expert).train == tmp_path / "toy.jsonl"
    assert registry.format_example(expert, {"input": "q", "output": "a"}) == FormattedExample("Q: q\nA:", "a")
    assert registry.eval_prompts(expert) == ["What does the toy do?"] and registry.trainer_callbacks(expert) == []
    assert registry.check(expert).examples == 2
