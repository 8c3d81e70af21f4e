"""The command line: listing, errors, --config, and no torch on the --help / --list path."""

import json
import subprocess
import sys

from click.testing import CliRunner

from conftest import EXPERTS, MTG_TRAIN
from mtg_core.commands.train import train_command

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets")


def run(*args):
    return CliRunner().invoke(train_command, list(args))


def test_help_and_list_import_no_torch():
    for args in (["--help"], ["--list"], ["--list", "--json"]):
        code = (
            "import sys\nfrom mtg_core.commands.train import train_command\n"
            f"try:\n    train_command({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert result.stdout.strip().splitlines()[-1] == "[]", (args, result.stdout)


def test_list_json_has_one_object_per_expert_with_the_documented_keys():
    result = run("--list", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.output)
    by_name = {row["name"]: row for row in rows}
    assert set(EXPERTS) <= set(by_name)
    for name in EXPERTS:
        row = by_name[name]
        assert {"name", "rank", "alpha", "dropout", "status", "distribution", "version", "examples"} <= set(row)
        assert row["status"] == "ok" and row["examples"] >= 60 and row["heldout_examples"] >= 12
        assert isinstance(row["rank"], int) and row["alpha"] > 0 and 0 <= row["dropout"] < 1


def test_list_table_names_every_expert():
    result = run("--list")
    assert result.exit_code == 0
    assert result.output.splitlines()[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "RANK", "ALPHA", "DROPOUT", "EXAMPLES", "STATUS"]
    for name in EXPERTS:
        assert any(line.split()[:2] == [name, f"mtg-expert-{name}"] for line in result.output.splitlines())


def test_unknown_expert_exits_non_zero_naming_the_installed_ones():
    result = subprocess.run([*MTG_TRAIN, "--expert", "NOSUCH"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: no expert named 'NOSUCH' is installed (installed: explain, predict, reason, retrospect, teach); "
        "install one with `pip install ./mtg_expert_<name>` or check $MTG_PLUGINS; "
        "searched the entry points of group 'mtg_core' in every installed distribution"
    )


def test_expert_or_all_is_required():
    assert "give --expert NAME or --all" in run().output
    assert "give --expert NAME or --all" in run("--expert", "teach", "--all").output


def test_out_of_range_numbers_are_refused_before_anything_loads(tmp_path):
    for option, value in [("--lr", "0"), ("--seq-len", "4"), ("--batch-size", "0"), ("--max-steps", "0"), ("--epochs", "-1")]:
        result = run("--expert", "teach", option, value, "--output-dir", str(tmp_path))
        assert result.exit_code == 2 and option in result.output, (option, result.output)


def test_config_file_supplies_options_and_the_command_line_wins(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("mtg_core.train.recipe.train_experts", lambda registry, name, all_experts, base, data, out, hyper, *flags: seen.update(hyper, expert=name, out=out))
    config = tmp_path / "run.toml"
    config.write_text('expert = "teach"\nseq-len = 256\nlr = 0.001\nmax_steps = 7\n')
    assert run("--config", str(config), "--lr", "0.01").exit_code == 0
    assert seen["expert"] == "teach" and seen["seq_len"] == 256 and seen["lr"] == 0.01 and seen["max_steps"] == 7
    config.write_text("learning_rate = 0.1\n")
    result = run("--config", str(config))
    assert result.exit_code == 2 and "unknown option 'learning_rate'" in result.output
    config.write_text("seq_len = 4\n")
    assert run("--config", str(config), "--expert", "teach").exit_code == 2


def test_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("--expert", "explain", "--output-dir", str(blocker / "adapters"))
    assert result.exit_code == 2 and "cannot write there" in result.output


def test_config_values_of_the_wrong_type_are_refused_naming_file_key_and_value(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("mtg_core.train.recipe.train_experts", lambda registry, name, all_experts, base, data, out, hyper, *flags: seen.update(
        hyper, expert=name, all=all_experts, data=data, flags=flags))
    config = tmp_path / "run.toml"
    for text, message in [
        ("seq_len = [128]", "seq_len = [128] is not an integer"),
        ("data = 5", "data = 5 is not a string"),
        ("lr = true", "lr = True is not a number"),
        ("max_steps = 2.5", "max_steps = 2.5 is not an integer"),
        ("all = 1", "all = 1 is not true or false"),
        ('quant = "nf8"', "quant = 'nf8' is not one of 'nf4', 'none'"),
    ]:
        config.write_text(text + "\n")
        result = run("--config", str(config), "--expert", "teach")
        assert result.exit_code == 2, text
        assert result.output.startswith(f"error: invalid value for '--config': {config}: {message}"), result.output
        assert len(result.output.strip().splitlines()) == 1
    config.write_text("all = true\nresume = true\nforce = true\neval-after = true\ndebug = false\nlr = 1\n")
    result = run("--config", str(config))
    assert result.exit_code == 0
    assert seen["all"] is True and seen["flags"] == (True, True, True) and seen["lr"] == 1.0
    # force from a file acts on every run that uses it: each run says so (from the command line it does not)
    assert f"warning: {config} sets force = true: this run resumes although the settings changed" in result.stderr
    assert "sets force" not in run("--config", str(config), "--force").stderr
    config.write_text('expert = "teach"\nforce = true\n')
    assert "this run discards an interrupted run's checkpoints" in run("--config", str(config)).stderr
    config.write_text("learning_rate = 0.1\n")
    result = run("--config", str(config))
    assert result.exit_code == 2 and "allowed: all, base_model, batch_size, data, debug, epochs, eval_after, expert, force" in result.output


def test_usage_errors_are_one_line_and_debug_keeps_the_exit_code(tmp_path):
    for args in (["--lr", "0"], ["--no-such-option"], ["--quant", "int3"]):
        result = subprocess.run([*MTG_TRAIN, "--expert", "teach", *args], capture_output=True, text=True)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.strip().endswith("(see --help)")
    plain = subprocess.run([*MTG_TRAIN, "--expert", "nosuch"], capture_output=True, text=True)
    debug = subprocess.run([*MTG_TRAIN, "--expert", "nosuch", "--debug"], capture_output=True, text=True)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" in debug.stderr and debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_a_file_given_as_base_model_and_an_unwritable_dest_are_named(tmp_path):
    from mtg_core.commands.new_expert import new_expert_command

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    result = run("--expert", "teach", "--base-model", str(weights), "--plan")
    assert result.exit_code == 2 and f"--base-model {weights}: is a file; give the model's folder" in result.output
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = CliRunner().invoke(new_expert_command, ["judge", "-d", "Judges", "--dest", str(blocker / "sub")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == f"error: --dest {blocker / 'sub'}: cannot create {blocker / 'sub' / 'mtg_expert_judge'} there (Not a directory); choose a writable folder"


def test_ask_refuses_an_empty_question():
    from mtg_core.commands.ask import ask_command

    result = CliRunner().invoke(ask_command, ["--expert", "teach", "   "])
    assert result.exit_code == 2 and result.output.strip().startswith("error: the question is empty")
