"""Round two of a newcomer's plugin mistakes (issue 20): each is named with its cause and its fix, and
the shipped experts keep working. Mistakes about packaging are real wheels built and installed by pip."""

import json
import subprocess
import sys

import pytest

from conftest import EXPERTS, MTG_TRAIN, cli_env, make_dist
from mtg_core import hookimpl
from mtg_core.plugins import MAX_EVAL_PROMPTS, Registry
from mtg_core.plugins.targets import MIXTRAL_LAYERS, linear_names
from test_registry import HELDOUT, HOOK, TRAINING, list_json, packaged


def pip_wheel_install(site, source):
    """Build `source` into a wheel and install it into `site`, as `pip install ./pkg` does (offline: no isolation)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(source)], check=True)
    return site


def package(root, dist, entry_points: dict[str, dict[str, str]], files: dict[str, str]):
    """A source package: pyproject.toml with entry points by group, and its files (package data included)."""
    groups = "".join(f"\n[project.entry-points.{group!r}]\n" + "".join(f"{name} = {target!r}\n" for name, target in eps.items())
                     for group, eps in entry_points.items())
    (root / "pyproject.toml").parent.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{dist}"\nversion = "0.1.0"\n{groups}'
        '[tool.setuptools.packages.find]\ninclude = ["acme*"]\n'
        '[tool.setuptools.package-data]\n"*" = ["template.txt", "data/*/*.jsonl"]\n')
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


# -- target_modules ----------------------------------------------------------------------------

def test_the_static_mixtral_layer_list_is_the_meta_model_of_every_preset():
    from mtg_core.base_models import PRESETS, base_config, choose_base
    from mtg_core.plan import meta_model

    for preset in PRESETS:
        names = linear_names(meta_model(base_config(choose_base(preset))))
        assert sorted({name.rsplit(".", 1)[-1] for name in names}) == sorted(MIXTRAL_LAYERS), preset


def test_target_modules_that_match_no_layer_are_refused_before_weights_load(tmp_path):
    llama = packaged("judge_llama")
    llama["acme_judge_llama/plugin.py"] = llama["acme_judge_llama/plugin.py"].replace(
        "dropout=0.05)", "dropout=0.05, target_modules=['q_proj', 'gate_proj'])")
    site = make_dist(tmp_path, "acme-llama", {"judge_llama": "acme_judge_llama.plugin:plugin"}, llama)
    listed = subprocess.run([*MTG_TRAIN, "--list", "--json", "--strict"], env=cli_env(site), capture_output=True, text=True)
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    message = ("LoraSettings.target_modules 'gate_proj' matches no layer of tiny-mixtral "  # $MTG_BASE_MODEL (conftest)
               "(peft would train q_proj alone, without a word); its layers are k_proj, o_proj, q_proj, v_proj, w1, w2, w3: "
               "name those in mtg_lora_settings")
    assert rows["judge_llama"]["status"] == "error" and rows["judge_llama"]["errors"] == [message]
    assert all(rows[name]["status"] == "ok" for name in EXPERTS)
    assert listed.returncode == 2 and "judge_llama (error)" in listed.stderr
    # --plan and training check against the base they use, from its meta-device model, before any weights load
    for flags in (["--plan"], ["--max-steps", "1", "--output-dir", str(tmp_path / "adapters")]):
        run = subprocess.run([*MTG_TRAIN, "--expert", "judge_llama", "--base-model", "tiny-mixtral", *flags],
                             env=cli_env(site), capture_output=True, text=True)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        quoted = "LoraSettings.target_modules 'gate_proj' matches no layer of tiny-mixtral (peft would train q_proj alone"
        assert f"plugin 'judge_llama' (acme-llama), expert 'judge_llama': {quoted}" in run.stderr  # names whose settings
        assert "loading" not in run.stderr.lower()
    assert not (tmp_path / "adapters" / "judge_llama").exists()


# -- packaging mistakes, as wheels ----------------------------------------------------------------

@pytest.fixture(scope="module")
def wheels_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "acme_round_two"
    plugin = ("from mtg_core import ExpertInfo, LoraSettings, PackagedExpert, hookimpl\n"
              "def expert(name):\n"
              "    return PackagedExpert(info=ExpertInfo(name, 'Judge calls'), lora=LoraSettings(rank=8, alpha=16, dropout=0.05),\n"
              "                          package='acme_round_two', eval_prompts=['q'])\n"
              "plugin = expert('judge')\n"
              "judge_ok = expert('judge_ok')\n"
              "class JudgeClass:\n"
              "    @hookimpl\n"
              "    def mtg_register_experts(self):\n"
              "        return [ExpertInfo('judge_class', 'Judge calls')]\n")
    files = {"acme_round_two/__init__.py": "", "acme_round_two/plugin.py": plugin,
             "acme_round_two/template.txt": "[INST] Judge this: {input} [/INST]"}
    for name in ("judge", "judge_ok"):
        files[f"acme_round_two/data/training/{name}_examples.jsonl"] = TRAINING
        files[f"acme_round_two/data/heldout/{name}_heldout.jsonl"] = HELDOUT
    package(root, "acme-round-two", {
        "mtg_cores": {"judge": "acme_round_two.plugin:plugin"},  # the group misspelt
        "mtg_core": {"judge_ok": "acme_round_two.plugin:judge_ok",
                     "judge_twice": "acme_round_two.plugin:judge_ok",  # the same object again
                     "judge_class": "acme_round_two.plugin:JudgeClass",
                     "judge_module": "acme_round_two.plugn:plugin",
                     "judge_object": "acme_round_two.plugin:plugn"},
    }, files)
    return pip_wheel_install(tmp_path_factory.mktemp("site"), root)


def test_packaging_mistakes_are_named_with_their_fix_and_strict_fails(wheels_site):
    result = subprocess.run([*MTG_TRAIN, "--list", "--json", "--strict"], env=cli_env(wheels_site), capture_output=True, text=True)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert all(rows[name]["status"] == "ok" for name in (*EXPERTS, "judge_ok"))
    problems = {name: " | ".join(rows[name]["errors"] + rows[name]["warnings"]) for name in rows}
    assert rows["judge"]["status"] == "warning" and problems["judge"] == (
        "entry point 'judge' = 'acme_round_two.plugin:plugin' of acme-round-two "
        "is in group 'mtg_cores', which mtg_core does not read, "
        "so it is not loaded; rename the group to 'mtg_core' ([project.entry-points.mtg_core] in its pyproject.toml) and reinstall")
    assert problems["judge_twice"] == ("the same object is already loaded as plugin 'judge_ok'; give each entry point its "
                                       "own object")
    assert problems["judge_class"] == ("the entry point names the class JudgeClass, not an object: create one in its module "
                                       "(plugin = JudgeClass()) and point the entry point at it")
    assert "the entry point 'acme_round_two.plugn:plugin' " \
           "names module acme_round_two.plugn, which does not exist: fix the module path before ':'" in problems["judge_module"]
    assert "packages" not in problems["judge_module"]
    assert "the entry point 'acme_round_two.plugin:plugn' names 'plugn', which acme_round_two.plugin does not define: fix " \
           "the name after ':'" in problems["judge_object"]
    assert result.returncode == 2 and "judge (warning)" in result.stderr and "Traceback" not in result.stderr
    missing = subprocess.run([*MTG_TRAIN, "--expert", "judge", "--plan"], env=cli_env(wheels_site), capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no expert named 'judge' is installed")
    assert "searched the entry points of group 'mtg_core' in every installed distribution; entry point 'judge' = " \
           "'acme_round_two.plugin:plugin' of acme-round-two is in group 'mtg_cores'" in missing.stderr


def test_an_allow_list_name_that_matches_nothing_is_named(wheels_site):
    rows = list_json(cli_env(wheels_site, MTG_PLUGINS="explain,judge_ok,acme-round-to"))
    assert [row["name"] for row in rows if row["kind"] == "expert"] == ["explain", "judge_ok"]
    (setting,) = [row for row in rows if row["kind"] == "setting"]
    assert setting["name"] == "MTG_PLUGINS" and setting["warnings"] == [
        "$MTG_PLUGINS names acme-round-to, which matches no entry point or distribution of group 'mtg_core'; names are "
        "entry-point names (mtg-train --list) or distribution names"]


def test_a_slow_plugin_import_is_named_with_its_time(tmp_path):
    site = make_dist(tmp_path, "acme-slow", {"slow": "acme_slow"},
                     {"acme_slow.py": "import time\ntime.sleep(1.2)\n" + HOOK + "@hookimpl\ndef mtg_eval_prompts(expert):\n    return None\n"})
    (row,) = [row for row in list_json(cli_env(site)) if row["name"] == "slow"]
    (warning,) = row["warnings"]
    assert row["status"] == "warning" and warning.startswith("importing acme_slow took 1.")
    assert warning.endswith("which every mtg-train/mtg-eval/mtg-ask run pays; import heavy libraries inside the hooks "
                            "that need them, not at module top")


# -- hooks that raise, relative paths ------------------------------------------------------------

def test_a_hook_that_raises_names_its_own_line_and_debug_shows_the_traceback(tmp_path):
    raising = packaged("judge_raise")
    raising["acme_judge_raise/plugin.py"] += ("class Raising(type(plugin)):\n"
                                              "    def mtg_format_example(self, expert, record):\n"
                                              "        return record['question']\n"
                                              "plugin = Raising(plugin.info, plugin.lora, plugin.package, plugin.eval_prompts)\n")
    raising["acme_judge_raise/plugin.py"] = raising["acme_judge_raise/plugin.py"].replace(
        "from mtg_core import", "from mtg_core import hookimpl\nfrom mtg_core import").replace(
        "    def mtg_format_example", "    @hookimpl\n    def mtg_format_example")
    site = make_dist(tmp_path, "acme-raise", {"judge_raise": "acme_judge_raise.plugin:plugin"}, raising)
    source = (site / "acme_judge_raise" / "plugin.py").read_text().splitlines()
    line = source.index("        return record['question']") + 1
    run = subprocess.run([*MTG_TRAIN, "--expert", "judge_raise", "--plan"], env=cli_env(site), capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert (f"failed in mtg_format_example for expert 'judge_raise': KeyError at {site / 'acme_judge_raise' / 'plugin.py'}:"
            f"{line}: 'question'") in run.stderr
    debug = subprocess.run([*MTG_TRAIN, "--expert", "judge_raise", "--plan", "--debug"], env=cli_env(site), capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert f'plugin.py", line {line}, in mtg_format_example' in debug.stderr


RELATIVE = (HOOK + "from mtg_core import DataFiles, ExpertInfo, FormattedExample, LoraSettings\n"
            "@hookimpl\ndef mtg_register_experts():\n    return [ExpertInfo('judge_rel', 'Judge calls')]\n"
            "@hookimpl\ndef mtg_lora_settings(expert):\n    return LoraSettings(8, 16, 0.0) if expert == 'judge_rel' else None\n"
            "@hookimpl\ndef mtg_data_files(expert):\n"
            "    return DataFiles('data/train.jsonl', 'data/heldout.jsonl') if expert == 'judge_rel' else None\n"
            "@hookimpl\ndef mtg_format_example(expert, record):\n"
            "    return FormattedExample('Q: ' + record['input'], record['output']) if expert == 'judge_rel' else None\n")


def test_a_relative_data_path_is_said_to_resolve_against_the_current_directory(tmp_path):
    site = make_dist(tmp_path / "site", "acme-rel", {"judge_rel": "acme_rel"}, {"acme_rel.py": RELATIVE})
    author = tmp_path / "author"
    (author / "data").mkdir(parents=True)
    (author / "data" / "train.jsonl").write_text(TRAINING)
    (author / "data" / "heldout.jsonl").write_text(HELDOUT)

    def row(cwd):
        result = subprocess.run([*MTG_TRAIN, "--list", "--json"], env=cli_env(site), cwd=cwd, capture_output=True, text=True)
        return {r["name"]: r for r in json.loads(result.stdout)}["judge_rel"]

    elsewhere = row(tmp_path)
    assert elsewhere["status"] == "error" and elsewhere["errors"][0] == (
        f"data/train.jsonl: no such file in the current directory {tmp_path}: the training path that acme-rel's "
        "mtg_data_files gives for 'judge_rel' is relative, so it resolves against wherever the command runs; build it "
        "from the package, e.g. Path(__file__).parent / \"data\" / ...")
    at_home = row(author)  # where the author's CI runs: found, and still a warning
    assert at_home["status"] == "warning" and at_home["warnings"][0].startswith(
        "training data path data/train.jsonl is relative, so it resolves against the current directory")


# -- cross-cutting plugins and what a real expert needs -------------------------------------------

def test_evaluation_prompts_are_capped_per_plugin_and_their_plugin_recorded():
    class Flood:
        @hookimpl
        def mtg_eval_prompts(self, expert):
            return [f"question {i}" for i in range(5000)]

    registry = Registry.discover()
    registry.register(Flood(), "flood")
    explain = registry.expert("explain")
    prompts = registry.eval_prompts_by_plugin(explain)
    assert [plugin for _, plugin in prompts].count("flood") == MAX_EVAL_PROMPTS
    assert [plugin for _, plugin in prompts if plugin != "flood"] == ["explain"] * 3
    (skip,) = [s for s in registry.skipped if s["plugin"] == "flood"]
    assert skip["reason"] == (f"returned 5000 prompts; the first {MAX_EVAL_PROMPTS} are asked and {5000 - MAX_EVAL_PROMPTS} "
                              "dropped (each costs a base and an adapter answer)")
    assert registry.cross_cutting(explain) == [{"plugin": "flood", "distribution": "not installed", "version": "?",
                                                "hooks": ["mtg_eval_prompts"]}]


def test_a_package_with_the_scaffold_s_few_examples_is_a_warning_saying_what_a_real_expert_needs(tmp_path):
    site = make_dist(tmp_path, "acme-few", {"judge_few": "acme_judge_few.plugin:plugin"},
                     packaged("judge_few", training=TRAINING.split("\n", 2)[0] + "\n", heldout=HELDOUT.split("\n", 1)[0] + "\n"))
    (row,) = [row for row in list_json(cli_env(site)) if row["name"] == "judge_few"]
    assert row["status"] == "warning" and row["errors"] == []
    assert row["warnings"] == [
        "only 1 training example: enough to test the plumbing, not to teach a mode; a real expert needs at least 50 varied "
        "ones (each shipped expert has over 100 training and 20 held-out examples, written apart so that none restates another)",
        "only 1 held-out example: enough to test the plumbing, not to measure one; a real expert needs at least 10 varied "
        "ones (each shipped expert has over 100 training and 20 held-out examples, written apart so that none restates another)"]
