"""Discovery through entry points, isolation of broken plugins, duplicates, the allow-list, hook contracts."""

import json
import subprocess

import pytest
from transformers import TrainerCallback

from conftest import EXPERTS, MTG_TRAIN, ToyExpert, cli_env, make_dist, write_jsonl
from mtg_core import DataFiles, FormattedExample, LoraSettings, hookimpl
from mtg_core.errors import PluginError, UnknownExpertError
from mtg_core.plugins import Registry


def list_json(env) -> list[dict]:
    result = subprocess.run([*MTG_TRAIN, "--list", "--json"], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


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
    assert rows["typo"]["status"] == "error" and "unknown hook mtg_lora_setings" in rows["typo"]["error"]
    assert {rows[n]["distribution"] for n in ("brokenimport", "badimpl", "typo")} == {"acme-broken"}


def test_two_distributions_claiming_one_expert_name_is_an_error_naming_both(tmp_path):
    site = make_dist(
        tmp_path,
        "acme-explain",
        {"acme_explain": "acme_explain:plugin"},
        {"acme_explain.py": "import conftest\nplugin = conftest.ToyExpert('explain')\n"},
    )
    rows = [row for row in list_json(cli_env(site, "tests")) if row["name"] == "explain"]
    assert len(rows) == 2 and all(row["status"] == "error" for row in rows)
    assert "mtg-expert-explain" in rows[0]["error"] and "acme-explain" in rows[0]["error"]
    result = subprocess.run([*MTG_TRAIN, "--expert", "explain"], env=cli_env(site, "tests"), capture_output=True, text=True)
    assert result.returncode != 0 and "registered by both" in result.stderr and "Traceback" not in result.stderr


def test_allow_list_limits_which_plugins_load():
    rows = list_json(cli_env(MTG_PLUGINS="teach, PREDICT"))
    assert sorted(row["name"] for row in rows) == ["predict", "teach"]
    assert list_json(cli_env(MTG_PLUGINS="")) == []


def test_wrong_return_types_and_raising_hooks_are_reported_by_plugin():
    class WrongTypes(ToyExpert):
        @hookimpl
        def mtg_data_files(self, expert):
            return "data.jsonl" if expert == self.name else None

        @hookimpl
        def mtg_format_example(self, expert, record):
            raise KeyError("prompt")

    registry = Registry()
    assert registry.register(WrongTypes(), "wrongtypes")
    expert = registry.expert("toy")
    with pytest.raises(PluginError, match=r"mtg_data_files\(expert='toy'\) returned str, expected mtg_core.DataFiles"):
        registry.data_files(expert)
    with pytest.raises(PluginError, match="plugin 'wrongtypes'.*mtg_format_example.*KeyError"):
        registry.format_example(expert, {"input": "a", "output": "b"})


def test_invalid_lora_settings_from_a_plugin_are_refused():
    registry = Registry()
    registry.register(ToyExpert(rank=0), "zero-rank")
    with pytest.raises(PluginError, match="zero-rank.*mtg_lora_settings.*rank"):
        registry.lora_settings(registry.expert("toy"))


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
    for name in EXPERTS:
        expert = registry.expert(name)
        assert sorted(registry.eval_prompts(expert)) == sorted([*base[name], f"What is the {name} expert for?"])
        assert len(registry.trainer_callbacks(expert)) == 1
    registry.unregister("everywhere")
    assert registry.eval_prompts(registry.expert("reason")) == base["reason"]


def test_a_hand_written_plugin_answers_every_owned_hook(tmp_path):
    data = write_jsonl(tmp_path / "toy.jsonl", [{"input": "q", "output": "a"}])

    class Full(ToyExpert):
        @hookimpl
        def mtg_data_files(self, expert):
            return DataFiles(train=data, heldout=data) if expert == self.name else None

        @hookimpl
        def mtg_format_example(self, expert, record):
            return FormattedExample(f"Q: {record['input']}\nA:", record["output"]) if expert == self.name else None

    registry = Registry()
    registry.register(Full(), "full")
    expert = registry.expert("toy")
    assert registry.lora_settings(expert) == LoraSettings(4, 8, 0.0)
    assert registry.data_files(expert).train == data
    assert registry.format_example(expert, {"input": "q", "output": "a"}) == FormattedExample("Q: q\nA:", "a")
    assert registry.eval_prompts(expert) == [] and registry.trainer_callbacks(expert) == []
