"""A third party's path: scaffold a new expert outside the repo, pip install it, see it listed, train it."""

import json
import subprocess
import sys
from importlib.metadata import distributions

import pytest

from conftest import MTG_TRAIN, ROOT, cli_env
from mtg_core.errors import ConfigError
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
    assert judge == {**judge, "distribution": "mtg-expert-judge", "status": "ok", "rank": 8, "examples": 2, "heldout_examples": 1}
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
