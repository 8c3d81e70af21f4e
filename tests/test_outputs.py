"""The adapters folder as a careless user leaves it: nothing of theirs is deleted, one writer per expert,
a kill at any instant of the install is recovered, write failures are one line and change nothing."""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import threading

import pytest
from click.testing import CliRunner

from conftest import MTG_TRAIN, QUICK, adapters_with, cli_env, with_option, write_jsonl
from mtg_core.commands.ask import ask_command
from mtg_core.commands.eval import eval_command
from mtg_core.commands.train import train_command
from mtg_core.outputs import ExpertLock, mark, recover



def train(*args):
    return CliRunner().invoke(train_command, list(args))


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_line(result):
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output, result.output
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real explain adapter, trained once for the module; tests copy it."""
    out = tmp_path_factory.mktemp("trained")
    result = train(*QUICK, "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    return out / "explain"


def test_a_folder_mtg_train_did_not_write_is_never_replaced(tmp_path, trained):
    user = tmp_path / "d" / "explain"
    user.mkdir(parents=True)
    (user / "notes.txt").write_text("x")
    result = train(*QUICK, "--output-dir", str(tmp_path / "d"))
    assert result.exit_code == 2 and (user / "notes.txt").read_text() == "x"
    assert last_line(result).startswith(f"error: {user} has no readable training_meta.json") and "nothing was changed" in result.output
    # an adapter of ours with the user's --data file kept inside it
    out = adapters_with(tmp_path, trained)
    data = write_jsonl(out / "explain" / "mine.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(8)])
    before = snapshot(out)
    result = train(*QUICK, "--output-dir", str(out), "--data", str(data))
    assert result.exit_code == 2 and "also holds mine.jsonl, which mtg-train did not write" in last_line(result)
    assert snapshot(out) == before


def test_a_symlinked_adapter_folder_is_refused_before_anything_loads(tmp_path, trained, count_base_loads):
    real = adapters_with(tmp_path, trained, "real")
    out = tmp_path / "adapters"
    out.mkdir()
    (out / "explain").symlink_to(real / "explain")
    result = train(*QUICK, "--output-dir", str(out))
    assert result.exit_code == 2 and "is a symbolic link" in last_line(result)
    assert (out / "explain").is_symlink() and count_base_loads == []


def test_an_adapter_folder_that_cannot_be_renamed_is_refused_before_training(tmp_path, trained, monkeypatch, count_base_loads):
    out = adapters_with(tmp_path, trained)
    rename = type(out).rename

    def immutable(self, target):
        if self == out / "explain":
            raise PermissionError(1, "Operation not permitted", str(self))
        return rename(self, target)

    monkeypatch.setattr(type(out), "rename", immutable)
    before = snapshot(out)
    result = train(*QUICK, "--output-dir", str(out))
    assert result.exit_code == 2 and "cannot be replaced (Operation not permitted; is it immutable" in last_line(result)
    assert snapshot(out) == before and count_base_loads == []


def test_a_second_run_on_the_same_expert_and_folder_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "adapters"
    first = subprocess.Popen([*MTG_TRAIN, *QUICK[:-1], "500", "--output-dir", str(out)], env=cli_env(), stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stderr:
            if "step 1/" in line:
                break
        for extra in ([], ["--force"], ["--resume"]):
            second = train(*QUICK, "--output-dir", str(out), *extra)
            assert second.exit_code == 2, second.output
            assert last_line(second) == (f"error: {out / 'explain'} is being written by another mtg-train (PID {first.pid}); "
                                         "wait for it to finish or give this run another --output-dir")
        assert (out / ".explain.partial").is_dir()  # the live run's work is untouched
        other = train(*with_option(with_option(QUICK, "--expert", "teach"), "--seq-len", "384"), "--output-dir", str(out))  # another expert may share the folder
        assert other.exit_code == 0, other.output
    finally:
        first.kill()
        first.communicate()
    assert train(*QUICK, "--output-dir", str(out), "--force").exit_code == 0  # the kernel released the dead run's lock
    assert not (out / ".explain.lock").exists()


@pytest.mark.parametrize("left", ["new and old", "old only", "new, old still installed"])
def test_a_kill_between_the_two_renames_is_recovered_by_the_next_command(tmp_path, trained, left):
    out = adapters_with(tmp_path, trained)
    old_meta = json.loads((out / "explain" / "training_meta.json").read_text())
    new = out / ".explain.partial" / "adapter"
    shutil.copytree(out / "explain", new)
    mark(new.parent, "the work folder of a run")
    (new / "training_meta.json").write_text(json.dumps({**old_meta, "steps": 99}))
    if left != "new, old still installed":
        (out / "explain").rename(out / ".explain.old-4242")
        mark(out / ".explain.old-4242", "the previous adapter")  # as install() marks it (by this process: not alive elsewhere)
    if left == "old only":
        shutil.rmtree(new)
    messages = []
    recover(out, "explain", messages.append)
    meta = json.loads((out / "explain" / "training_meta.json").read_text())
    assert meta["steps"] == (old_meta["steps"] if left == "old only" else 99)
    assert len(messages) == 1 and str(out / "explain") in messages[0]
    assert not list(out.glob(".explain.old-*")) and not new.exists()


def test_mtg_eval_recovers_an_interrupted_install_and_says_so(tmp_path, trained):
    out = adapters_with(tmp_path, trained)
    shutil.copytree(out / "explain", out / ".explain.partial" / "adapter")
    mark(out / ".explain.partial", "the work folder of a run")
    (out / "explain").rename(out / ".explain.old-77")
    mark(out / ".explain.old-77", "the previous adapter")
    result = CliRunner().invoke(eval_command, ["--expert", "explain", "--adapters", str(out), "--max-new-tokens", "2", "--no-fail"])
    assert result.exit_code == 0, result.output
    assert f"warning: restored {out / 'explain'}: the run that trained it was stopped while installing it" in result.output
    assert (out / "explain" / "eval.json").is_file() and not list(out.glob(".explain*"))


def test_a_write_failure_while_saving_is_one_line_and_keeps_the_old_adapter(tmp_path, trained, monkeypatch):
    from safetensors import SafetensorError

    out = adapters_with(tmp_path, trained)
    before = snapshot(out / "explain")
    failures = {
        "disk full": SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
        "permission": PermissionError(13, "Permission denied", str(out)),
    }
    for name, error in failures.items():
        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr("peft.peft_model.safe_save_file", fail)
        result = train(*QUICK, "--output-dir", str(out))
        assert result.exit_code == 2, (name, result.output)
        line = last_line(result)
        assert line.startswith(f"error: cannot write the new adapter in {out / '.explain.partial' / 'adapter'}: "), line
        assert ("no space left on device" if name == "disk full" else "Permission denied") in line
        assert line.endswith("(the previous adapter is unchanged)")
        assert snapshot(out / "explain") == before and not (out / ".explain.partial").exists()


@pytest.mark.parametrize("save_steps", [None, 1])
def test_a_file_size_limit_while_saving_or_checkpointing_is_one_line(tmp_path, trained, save_steps):
    """A real failed write: the kernel refuses to grow any file past 400 KB (ulimit -f) in a fresh process."""
    out = adapters_with(tmp_path, trained)
    before = snapshot(out / "explain")
    limit = 400 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    extra = ["--save-steps", str(save_steps)] if save_steps else []
    result = subprocess.run([*MTG_TRAIN, *QUICK, "--output-dir", str(out), *extra], env=cli_env(), capture_output=True, text=True,
                            preexec_fn=small_files, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    where = "a checkpoint in" if save_steps else "the new adapter in"
    assert line.startswith(f"error: cannot write {where} {out / '.explain.partial'}"), line
    assert snapshot(out / "explain") == before


def test_training_log_that_is_a_folder_and_an_empty_output_dir_are_refused(tmp_path, count_base_loads):
    (tmp_path / "training_log.txt").mkdir()
    result = train(*QUICK, "--output-dir", str(tmp_path))
    assert result.exit_code == 2 and f"{tmp_path / 'training_log.txt'}: cannot append the training log" in last_line(result)
    result = train(*QUICK, "--output-dir", "")
    assert result.exit_code == 2 and last_line(result) == "error: --output-dir is empty; give a folder (default: adapters)"
    assert count_base_loads == []


def test_data_is_read_once_so_a_fifo_trains_and_its_hash_is_recorded(tmp_path):
    records = [{"input": f"What does rule {i} say?", "output": f"It says {i}."} for i in range(8)]
    content = "".join(json.dumps(r) + "\n" for r in records).encode()
    fifo = tmp_path / "data.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as pipe:  # a FIFO delivers its bytes once: a second read would block forever
            pipe.write(content)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    result = train(*QUICK, "--output-dir", str(tmp_path / "out"), "--data", str(fifo))
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "explain" / "training_meta.json").read_text())
    assert meta["data"]["sha256"] == hashlib.sha256(content).hexdigest() and meta["data"]["examples"] == 8


def test_corrupt_adapter_files_are_refused_before_the_base_loads(tmp_path, trained, count_base_loads):
    cases = {
        "truncated weights": ("adapter_model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:5000]), "adapter_model.safetensors is truncated"),
        "weights of another format": ("adapter_model.safetensors", lambda p: p.write_bytes((2).to_bytes(8, "little") + b"[]"),
                                      "adapter_model.safetensors is not a safetensors file"),
        "garbage config": ("adapter_config.json", lambda p: p.write_text("not json"), "adapter_config.json is not valid JSON"),
        "empty config": ("adapter_config.json", lambda p: p.write_text("{}"), "adapter_config.json is not a peft LoRA config"),
        "garbage meta": ("training_meta.json", lambda p: p.write_text("{{{"), "training_meta.json: unreadable"),
        "pickle weights": ("adapter_model.safetensors", lambda p: p.rename(p.with_name("adapter_model.bin")), "adapter_model.bin: a pickle file"),
    }
    for name, (file, damage, message) in cases.items():
        out = adapters_with(tmp_path, trained, name.replace(" ", "-"))
        damage(out / "explain" / file)
        for command, args in ((eval_command, []), (ask_command, ["What is trample?"])):
            result = CliRunner().invoke(command, ["--expert", "explain", "--adapters", str(out), *args])
            assert result.exit_code == 2, (name, result.output)
            assert message in last_line(result) and len(result.output.strip().splitlines()) == 1, (name, result.output)
    assert count_base_loads == []


def test_adapters_of_the_tiny_preset_name_their_base_by_name_and_match_under_another_cache(tmp_path, trained, monkeypatch):
    from mtg_core.base_models import choose_base
    from mtg_core.evaluate import check_adapter

    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-mixtral"
    meta = json.loads((trained / "training_meta.json").read_text())["base_model"]
    assert meta["id"] == "tiny-mixtral" and len(meta["fingerprint"]) == 12
    monkeypatch.setenv("MTG_CACHE_DIR", str(tmp_path / "another-cache"))
    assert check_adapter(trained.parent, "explain", choose_base("tiny-mixtral")) == trained


def test_an_unwritable_model_cache_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MTG_CACHE_DIR", str(blocker))
    result = train(*QUICK, "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 2 and f"cannot write the model cache {blocker}" in last_line(result) and "MTG_CACHE_DIR" in last_line(result)
    monkeypatch.delenv("MTG_CACHE_DIR")
    monkeypatch.setenv("HOME", str(blocker))  # ~/.cache under a file: as unwritable as a read-only home
    result = train(*QUICK, "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 2 and f"cannot write the model cache {blocker}/.cache/mtg_core" in last_line(result)
    assert not (tmp_path / "out" / "explain").exists()


def test_the_lock_is_an_os_lock_that_names_its_holder(tmp_path):
    held = ExpertLock(tmp_path, "explain")
    assert held.acquire()
    try:
        other = ExpertLock(tmp_path, "explain")
        assert not other.acquire() and other.holder() == str(os.getpid())
        assert ExpertLock(tmp_path, "teach").acquire()
    finally:
        held.release()
    assert ExpertLock(tmp_path, "explain").acquire()


def test_stop_signals_before_training_stop_at_once_with_nothing_written(tmp_path):
    out = tmp_path / "adapters"
    process = subprocess.Popen([*MTG_TRAIN, *QUICK, "--output-dir", str(out)], env=cli_env(), stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "base model:" in line:  # logged just before the weights load
            process.send_signal(signal.SIGTERM)
            break
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted: stopped by SIGTERM outside a training step" in stderr and "Traceback" not in stderr
    assert not out.joinpath(".explain.partial").exists() and not out.joinpath("explain").exists()
    # blocked reading a FIFO that no one writes: SIGHUP (a closed SSH session) stops it at once too
    fifo = tmp_path / "never.fifo"
    os.mkfifo(fifo)
    process = subprocess.Popen([*MTG_TRAIN, *QUICK, "--output-dir", str(out), "--data", str(fifo)], env=cli_env(),
                               stderr=subprocess.PIPE, text=True)
    try:
        process.wait(timeout=8)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGHUP)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signal.SIGHUP and "stopped by SIGHUP" in stderr, stderr


def test_sighup_during_training_checkpoints_like_sigterm(tmp_path):
    out = tmp_path / "adapters"
    process = subprocess.Popen([*MTG_TRAIN, *QUICK[:-1], "200", "--output-dir", str(out)], env=cli_env(), stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "step 2/" in line:
            process.send_signal(signal.SIGHUP)
            break
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 128 + signal.SIGHUP, stderr
    assert "interrupted: stopped by SIGHUP at step" in stderr and list((out / ".explain.partial").glob("checkpoint-*/trainer_state.json"))


def test_training_survives_its_stderr_reader_going_away(tmp_path):
    out = tmp_path / "adapters"
    process = subprocess.Popen([*MTG_TRAIN, *QUICK[:-1], "4", "--output-dir", str(out)], env=cli_env(), stderr=subprocess.PIPE)
    process.stderr.readline()
    process.stderr.close()  # like `mtg-train ... 2>&1 | head -1`, or a closed SSH session's pipe
    assert process.wait(timeout=300) == 0
    assert (out / "explain" / "training_meta.json").is_file()
    assert "step 4/4" in (out / "training_log.txt").read_text()
