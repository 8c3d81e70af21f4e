"""mtg-eval and mtg-ask on the embedded model: held-out loss, samples, one base for every adapter."""

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import EXPERTS
from mtg_core.commands.ask import ask_command
from mtg_core.commands.eval import eval_command
from mtg_core.commands.train import train_command

# 40 steps over each expert's 64 examples: long enough for every adapter to specialise (12 steps gave 3 of 5)
LONGER = ["--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3", "--seq-len", "384", "--max-steps", "40"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    result = CliRunner().invoke(train_command, ["--all", "--output-dir", str(out), *LONGER, "--eval-after"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_training_lowers_heldout_loss_and_eval_json_records_it(adapters):
    out, output = adapters
    for name in EXPERTS:
        report = json.loads((out / name / "eval.json").read_text())
        assert report["heldout_loss"]["adapter"] < report["heldout_loss"]["base"] - 0.05, name
        assert report["heldout_perplexity"]["adapter"] < report["heldout_perplexity"]["base"]
        assert len(report["samples"]) == 3 and all({"prompt", "base", "adapter"} <= set(s) for s in report["samples"])
        assert any(s["base"] != s["adapter"] for s in report["samples"])
        assert set(report["heldout_matrix"]) == set(EXPERTS)
    assert "held-out loss, adapter (row)" in output and "NOT better" not in output


def test_each_adapter_is_best_on_its_own_heldout_set(adapters):
    out, _ = adapters
    matrix = json.loads((out / "reason" / "eval.json").read_text())["heldout_matrix"]
    best = {column: min(EXPERTS, key=lambda row: matrix[row][column]) for column in EXPERTS}
    assert best == {name: name for name in EXPERTS}, best


def test_eval_command_loads_the_base_once_for_every_adapter(adapters, count_base_loads):
    out, _ = adapters
    result = CliRunner().invoke(eval_command, ["--all", "--adapters", str(out), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert len(count_base_loads) == 1
    assert any(line.split()[:3] == ["EXPERT", "BASE", "LOSS"] for line in result.stdout.splitlines())


def test_ask_switches_experts_without_reloading_the_base(adapters, count_base_loads):
    out, _ = adapters
    session = "What is trample?\n/expert teach\nWhat is a mana curve?\n/expert nosuch\n/expert PREDICT\nOdds of a land?\n/quit\n"
    result = CliRunner().invoke(ask_command, ["--interactive", "--expert", "explain", "--adapters", str(out), "--max-new-tokens", "6"],
                                input=session)
    assert result.exit_code == 0, result.output
    assert len(count_base_loads) == 1
    assert "[explain]> " in result.output and "[teach]> " in result.output and "[predict]> " in result.output
    assert "no adapter loaded for 'nosuch'" in result.output
    ended = CliRunner().invoke(ask_command, ["--interactive", "--adapters", str(out), "--max-new-tokens", "2"], input="What is ward?\n")
    assert ended.exit_code == 0 and ended.output.endswith("]> \n")  # end of input ends the prompt's line
    single = CliRunner().invoke(ask_command, ["--expert", "teach", "--adapters", str(out), "--max-new-tokens", "6", "What is a mulligan?"])
    assert single.exit_code == 0 and single.output.strip()


def test_missing_adapter_and_adapter_of_another_base_are_clear_errors(adapters, tmp_path):
    out, _ = adapters
    missing = CliRunner().invoke(eval_command, ["--expert", "teach", "--adapters", str(tmp_path)])
    assert missing.exit_code == 2 and f"{tmp_path}/teach: no adapter" in missing.output and "mtg-train --expert teach" in missing.output
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(out / "teach", moved / "teach")
    config = json.loads((out / "teach" / "adapter_config.json").read_text())
    (moved / "teach" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/models/other-base"}))
    other = CliRunner().invoke(eval_command, ["--expert", "teach", "--adapters", str(moved), "--base-model", "tiny-mixtral"])
    assert other.exit_code == 2 and "was trained on /models/other-base" in other.output and "Traceback" not in other.output
    ask = CliRunner().invoke(ask_command, ["--expert", "teach", "--adapters", str(tmp_path), "What?"])
    assert ask.exit_code == 2 and "no adapter" in ask.output
