"""Everything a command accepts is checked before the base loads: one line, exit 2, no traceback; and the
console scripts end quietly on Ctrl-C during start-up and on a closed stdout pipe."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import MTG_TRAIN, cli_env
from mtg_core.base_models import choose_base, load_tokenizer
from mtg_core.commands.ask import ask_command
from mtg_core.commands.eval import eval_command
from mtg_core.commands.export import export_command
from mtg_core.commands.new_expert import new_expert_command
from mtg_core.commands.train import train_command
from mtg_core.evaluate import heldout_data
from mtg_core.options import SEED_MAX, FiniteFloat, ShellPath
from mtg_core.plugins import Registry

COMMANDS = {"mtg-train": train_command, "mtg-eval": eval_command, "mtg-ask": ask_command, "mtg-export": export_command,
            "mtg-new-expert": new_expert_command}
SCRIPTS = Path(sys.executable).parent
REQUIRED = {"mtg-train": ["--expert", "explain"], "mtg-eval": ["--expert", "explain"], "mtg-ask": ["--expert", "explain", "q?"],
            "mtg-export": ["--expert", "explain", "--format", "vllm"], "mtg-new-expert": ["judge", "-d", "Judges"]}


def one_line_refusal(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def options_of(kind):
    return [(name, param) for name, command in COMMANDS.items() for param in command.params
            if isinstance(param, click.Option) and isinstance(param.type, kind)]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """adapters/explain after a single optimizer step (the shortest run there is)."""
    out = tmp_path_factory.mktemp("adapters")
    result = CliRunner().invoke(train_command, ["--expert", "explain", "--output-dir", str(out), "--max-steps", "1", "--max-samples", "4",
                                                "--batch-size", "4", "--grad-accum", "1", "--seq-len", "128"])
    assert result.exit_code == 0, result.output
    return out


# --- numbers -------------------------------------------------------------------------------------------


def test_every_float_option_of_every_command_refuses_nan_and_inf(count_base_loads):
    floats = options_of(click.types.FloatParamType)
    assert {(name, param.name) for name, param in floats} >= {("mtg-train", "lr"), ("mtg-train", "epochs"), ("mtg-train", "gpu_memory"),
                                                              ("mtg-eval", "gpu_memory"), ("mtg-ask", "gpu_memory")}
    for name, param in floats:
        assert isinstance(param.type, FiniteFloat), (name, param.name)
        for value in ("nan", "inf", "-inf", "NaN"):
            result = CliRunner().invoke(COMMANDS[name], [*REQUIRED[name], param.opts[0], value])
            one_line_refusal(result, f"'{param.opts[0]}'", "is not a finite number")
    assert count_base_loads == []


def test_toml_nan_and_inf_are_refused(tmp_path):
    config = tmp_path / "run.toml"
    for text in ("lr = nan", "epochs = nan", "gpu_memory = inf", "gpu-memory = -nan"):
        config.write_text(text + "\n")
        one_line_refusal(CliRunner().invoke(train_command, ["--config", str(config), "--expert", "explain"]),
                         f"{config}: {text.split()[0]} = ", "is not a finite number")


def test_every_integer_option_is_bounded_within_what_the_libraries_accept():
    for name, param in options_of(click.types.IntParamType):
        assert isinstance(param.type, click.IntRange) and param.type.min is not None and param.type.max is not None, (name, param.name)
        assert param.type.max <= SEED_MAX, (name, param.name)
    np.random.seed(SEED_MAX)  # the largest seed accepted is one numpy, torch and Trainer take
    torch.manual_seed(SEED_MAX)
    for option, value in [("--seed", "4294967296"), ("--seed", "-1"), ("--max-steps", str(10**20)), ("--save-steps", str(10**12)),
                          ("--max-samples", str(10**10)), ("--max-steps", "1e20")]:
        one_line_refusal(CliRunner().invoke(train_command, ["--expert", "explain", option, value]), f"'{option}'")


# --- paths and text ------------------------------------------------------------------------------------


def test_every_path_option_expands_home_and_variables(tmp_path, monkeypatch):
    paths = [(name, param.name) for name, command in COMMANDS.items() for param in command.params
             if isinstance(param.type, click.Path)]
    assert {name for name, _ in paths} == set(COMMANDS)
    assert all(isinstance(param.type, ShellPath) for command in COMMANDS.values() for param in command.params
               if isinstance(param.type, click.Path)), paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MTG_TEST_DIR", str(tmp_path / "var"))
    seen = {}
    monkeypatch.setattr("mtg_core.train.recipe.train_experts", lambda registry, name, all_experts, base, data, out, hyper, *flags: seen.update(out=out, data=data))
    assert CliRunner().invoke(train_command, ["--expert", "explain", "--output-dir", "~", "--data", "$MTG_TEST_DIR/d.jsonl"]).exit_code == 0
    assert seen == {"out": str(tmp_path / "home"), "data": str(tmp_path / "var" / "d.jsonl")}
    config = tmp_path / "home" / "run.toml"
    config.parent.mkdir()
    config.write_text('output_dir = "~/x"\ndata = "${MTG_TEST_DIR}/e.jsonl"\n')
    assert CliRunner().invoke(train_command, ["--config", "~/run.toml", "--expert", "explain"]).exit_code == 0
    assert seen == {"out": str(tmp_path / "home" / "x"), "data": str(tmp_path / "var" / "e.jsonl")}
    monkeypatch.chdir(tmp_path)
    one_line_refusal(CliRunner().invoke(train_command, ["--expert", "explain", "--output-dir", "$MTG_NOT_SET/x"]),
                     "$MTG_NOT_SET is not set")
    one_line_refusal(CliRunner().invoke(export_command, ["--expert", "explain", "--format", "vllm", "--out", "~no_such_user_x/e"]),
                     "cannot expand ~no_such_user_x")
    one_line_refusal(CliRunner().invoke(eval_command, ["--expert", "explain", "--adapters", "~/adapters"]),
                     f"{tmp_path}/home/adapters/explain: no adapter")
    assert not (tmp_path / "~").exists() and not list(tmp_path.glob("$*"))


def test_arguments_that_are_not_utf8_are_one_line(tmp_path):
    for command, args in [("mtg-ask", ["--expert", "explain", b"caf\xe9?"]), ("mtg-train", ["--expert", b"expl\xffain"]),
                          ("mtg-new-expert", [b"judge", "-d", b"\xff"])]:
        result = subprocess.run([SCRIPTS / command, *args], capture_output=True, env=cli_env(), cwd=tmp_path)
        stderr = result.stderr.decode()
        assert result.returncode == 2 and len(stderr.strip().splitlines()) == 1 and "is not UTF-8 text (byte 0x" in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_an_option_given_twice_is_refused_in_every_command(count_base_loads):
    for name, command in COMMANDS.items():
        if name == "mtg-new-expert":
            args = ["judge", "-d", "a", "--dest", ".", "--dest", "x"]
            option = "--dest"
        else:
            args = [*REQUIRED[name], "-e", "teach"]
            option = "--expert"
        one_line_refusal(CliRunner().invoke(command, args), f"{option} is given more than once")
    assert count_base_loads == []


# --- config files --------------------------------------------------------------------------------------


def test_a_toml_key_spelt_both_ways_is_refused_and_a_bom_is_accepted(tmp_path, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text("seq_len = 128\nseq-len = 256\n")
    one_line_refusal(CliRunner().invoke(train_command, ["--config", str(config), "--expert", "explain"]),
                     "seq_len and seq-len set the same option; keep one")
    seen = {}
    monkeypatch.setattr("mtg_core.train.recipe.train_experts", lambda registry, name, all_experts, base, data, out, hyper, *flags: seen.update(hyper))
    config.write_bytes("\ufeffseq_len = 128\n".encode())
    result = CliRunner().invoke(train_command, ["--config", str(config), "--expert", "explain"])
    assert result.exit_code == 0, result.output
    assert seen["seq_len"] == 128


# --- data ----------------------------------------------------------------------------------------------


def test_data_dash_reads_stdin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def capture(registry, experts, runs, *rest):
        seen["runs"] = runs

    monkeypatch.setattr("mtg_core.train.recipe.train_locked", capture)
    lines = "".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3))
    result = CliRunner().invoke(train_command, ["--expert", "explain", "--data", "-", "--output-dir", "out"], input=lines)
    assert result.exit_code == 0, result.output
    assert len(seen["runs"][0].examples) == 3 and seen["runs"][0].lines == [1, 2, 3]
    bad = CliRunner().invoke(train_command, ["--expert", "explain", "--data", "-"], input=lines + "{oops\n")
    one_line_refusal(bad, "<stdin>:4: invalid JSON")


# --- adapters and held-out data: refused before the base loads -----------------------------------------


def test_max_steps_1_installs_an_adapter_that_learned(one_step):
    tensors = load_file(one_step / "explain" / "adapter_model.safetensors")
    b = [t for k, t in tensors.items() if ".lora_B." in k]
    assert b and all(t.abs().max() > 0 for t in b)  # peft starts every B at zero: a step with learning rate 0 leaves them so


def test_eval_refuses_a_seq_len_that_leaves_heldout_examples_without_answer_tokens(one_step, count_base_loads):
    registry = Registry.discover()
    expert = registry.expert("explain")
    tokenizer = load_tokenizer(choose_base("tiny-mixtral"))
    shortest = heldout_data(tokenizer, registry, expert, 32768).shortest_trainable
    heldout_data(tokenizer, registry, expert, shortest)  # keeps every example
    result = CliRunner().invoke(eval_command, ["--expert", "explain", "--adapters", str(one_step), "--seq-len", "64"])
    one_line_refusal(result, "heldout.jsonl", "no answer tokens left after truncation to --seq-len 64",
                     f"--seq-len {shortest} leaves every example an answer token")
    assert count_base_loads == [] and not (one_step / "explain" / "eval.json").exists()


def broken_copy(one_step, tmp_path, how):
    folder = tmp_path / "adapters" / "explain"
    shutil.copytree(one_step / "explain", folder)
    if how == "shape":
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        key = next(k for k in tensors if k.endswith("self_attn.q_proj.lora_A.weight"))
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2)
        save_file(tensors, path)
    else:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_module"]}))
    return folder.parent


@pytest.mark.parametrize("how, message", [("shape", "self_attn.q_proj has lora_A (16, 256)"),
                                          ("targets", "target_modules ['no_such_module'] does not select")])
def test_eval_and_ask_refuse_an_adapter_that_does_not_fit_before_the_base_loads(one_step, tmp_path, count_base_loads, how, message):
    adapters = broken_copy(one_step, tmp_path, how)
    for command, args in [(eval_command, []), (ask_command, ["What is ward?"])]:
        one_line_refusal(CliRunner().invoke(command, ["--expert", "explain", "--adapters", str(adapters), *args]), message)
    assert count_base_loads == []


# --- the base model ------------------------------------------------------------------------------------


def test_base_model_errors_name_where_the_name_came_from(tmp_path):
    for value, message in [("/no/such/base", "error: $MTG_BASE_MODEL=/no/such/base: no such folder"),
                           ("acme/not-cached", "error: $MTG_BASE_MODEL=acme/not-cached: a hub id not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")]:
        result = subprocess.run([*MTG_TRAIN, "--expert", "explain", "--plan"], capture_output=True, text=True, env=cli_env(MTG_BASE_MODEL=value))
        assert result.returncode == 2 and result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = subprocess.run([*MTG_TRAIN, "--expert", "explain", "--plan", "--base-model", "acme/not-cached"], capture_output=True, text=True,
                            env=cli_env(HF_HUB_OFFLINE="", TRANSFORMERS_OFFLINE="1"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: --base-model acme/not-cached: a hub id not in the local Hugging Face cache")


def test_the_continue_command_drops_force(monkeypatch):
    from mtg_core.train import continue_command

    monkeypatch.setattr(sys, "argv", ["mtg-train", "--expert", "explain", "--force", "--output-dir", "my dir"])
    assert continue_command() == "mtg-train --expert explain --output-dir 'my dir' --resume"
    monkeypatch.setattr(sys, "argv", ["mtg-train", "--resume", "--force", "-e", "explain"])
    assert continue_command() == "mtg-train --resume -e explain"


# --- the console scripts -------------------------------------------------------------------------------


def test_ctrl_c_while_a_command_starts_exits_130_quietly(tmp_path):
    """Ctrl-C arriving while the command imports its modules (a stand-in `click` sends SIGINT to its process)."""
    (tmp_path / "click.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
    for command in COMMANDS:
        result = subprocess.run([SCRIPTS / command, "--help"], capture_output=True, text=True, env=cli_env(tmp_path), timeout=60)
        assert result.returncode == 130 and result.stderr == "" and result.stdout == "", (command, result)


def test_help_through_the_console_script_imports_no_torch():
    code = ("import sys\nsys.argv = ['mtg-train', '--help']\nfrom mtg_core.entry import train\ntry:\n    train()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr.strip() == "[]"


def test_a_closed_stdout_ends_every_command_quietly(one_step, tmp_path):
    read, write = os.pipe()
    os.close(read)  # every write to stdout fails with EPIPE, as after `| head -1` has exited
    try:
        for args in (["mtg-train", "--help"], ["mtg-train", "--list"], ["mtg-train", "--expert", "explain", "--plan", "--json"],
                     ["mtg-new-expert", "judge", "-d", "Judges", "--dest", str(tmp_path)],
                     ["mtg-export", "--expert", "explain", "--format", "vllm", "--adapters", str(one_step), "--out", str(tmp_path / "exports")],
                     ["mtg-eval", "--expert", "explain", "--adapters", str(one_step), "--max-new-tokens", "2", "--no-fail"]):
            result = subprocess.run([SCRIPTS / args[0], *args[1:]], stdout=write, stderr=subprocess.PIPE, text=True, env=cli_env(), timeout=600)
            assert result.returncode == 141, (args, result.stderr)
            assert not any(word in result.stderr for word in ("error", "Broken pipe", "Traceback", "Exception")), (args, result.stderr)
    finally:
        os.close(write)
