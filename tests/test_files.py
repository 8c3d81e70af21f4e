"""Files in the folders we share with the user (adapters, exports, /tmp): we replace or delete only what a record
or marker of ours proves we wrote, never write through a link, and create files with the user's umask."""

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import zipfile

import pytest
from click.testing import CliRunner

from conftest import QUICK, adapters_with, cli_env
from mtg_core.commands.eval import eval_command
from mtg_core.commands.export import export_command
from mtg_core.commands.train import train_command
from mtg_core.outputs import (WORK_MARKER, ExpertLock, OutputError, checkpoint_problem, check_replaceable, is_ours, recover,
                              recover_unlocked, write_new)

DEAD_PID = 2**22 + 12345  # above Linux's pid_max ceiling: never a live process


def train(*args):
    return CliRunner().invoke(train_command, list(args))


def run_export(*args):
    return CliRunner().invoke(export_command, [str(a) for a in args])


def snapshot(folder):
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def last_line(result):
    assert "Traceback" not in result.output, result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real explain adapter, trained once under umask 022 (a common default); tests copy it."""
    out = tmp_path_factory.mktemp("trained")
    previous = os.umask(0o022)
    try:
        result = train(*QUICK, "--output-dir", str(out))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    return out / "explain"


def marked(folder, pid=DEAD_PID):
    """`folder` as our install or a run left it: our marker, written by a process that is gone."""
    (folder / WORK_MARKER).write_text(json.dumps({"pid": pid, "what": "test"}))
    return folder


# --- the adapter folder: a record of what training wrote -------------------------------------------------


def test_training_records_every_file_it_wrote_and_a_user_file_at_any_depth_or_an_edit_refuses(tmp_path, trained, count_base_loads):
    meta = json.loads((trained / "training_meta.json").read_text())
    written = {p.relative_to(trained).as_posix() for p in trained.rglob("*") if p.is_file()} - {"training_meta.json"}
    assert set(meta["files"]) == written and any(name.startswith("runs/") for name in written) and "README.md" in written
    cases = {
        "a note deep in runs/": lambda f: (f / "runs" / next(p.name for p in (f / "runs").iterdir()) / "notes.txt").write_text("mine"),
        "an edited README": lambda f: (f / "README.md").write_text((f / "README.md").read_text() + "\nmy notes\n"),
        "an empty folder": lambda f: (f / "mydocs").mkdir(),
        "a link": lambda f: (f / "runs" / "elsewhere").symlink_to(tmp_path),
    }
    expected = {"a note deep in runs/": "runs/", "an edited README": "README.md (changed since it was written)",
                "an empty folder": "mydocs/", "a link": "runs/elsewhere/"}
    for case, damage in cases.items():
        out = adapters_with(tmp_path, trained, case.replace(" ", "-"))
        damage(out / "explain")
        before = snapshot(out)
        result = train(*QUICK, "--output-dir", str(out))
        assert result.exit_code == 2, (case, result.output)
        line = last_line(result)
        assert line.startswith(f"error: {out / 'explain'} also holds ") and expected[case] in line and "nothing was changed" in line, line
        assert snapshot(out) == before, case
    assert count_base_loads == []
    untouched = adapters_with(tmp_path, trained, "untouched")
    (untouched / "explain" / "eval.json").write_text("{}")  # written by mtg-eval after the record, replaced by name
    assert is_ours(untouched / "explain", "explain") is None


def test_adapters_from_before_the_record_are_ours_only_by_the_old_names_event_files_and_peft_card(tmp_path, trained):
    out = adapters_with(tmp_path, trained)
    folder = out / "explain"
    meta = json.loads((folder / "training_meta.json").read_text())
    del meta["files"]
    (folder / "training_meta.json").write_text(json.dumps(meta))
    assert is_ours(folder, "explain") is None
    check_replaceable(out, "explain")
    note = next((folder / "runs").rglob("events.out.tfevents.*")).with_name("notes.txt")
    note.write_text("mine")
    assert "runs/" in is_ours(folder, "explain") and "notes.txt" in is_ours(folder, "explain")
    note.unlink()
    (folder / "README.md").write_text("# My adapter\nhow I trained it\n")
    assert "README.md (edited" in is_ours(folder, "explain")
    with pytest.raises(OutputError, match="nothing was changed"):
        check_replaceable(out, "explain")


def test_trained_files_get_the_users_umask(trained):
    modes = {p.relative_to(trained).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in trained.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes


# --- links and planted files in shared folders -------------------------------------------------------------


def test_a_symlinked_lock_never_truncates_its_target(tmp_path, count_base_loads):
    out = tmp_path / "adapters"
    out.mkdir()
    target = tmp_path / "userfile.txt"
    target.write_text("precious")
    (out / ".explain.lock").symlink_to("../userfile.txt")
    result = train(*QUICK, "--output-dir", str(out))
    assert result.exit_code == 2 and f"{out / '.explain.lock'} is a symbolic link" in last_line(result)
    assert target.read_text() == "precious" and (out / ".explain.lock").is_symlink() and count_base_loads == []
    recover_unlocked(out, "explain", print)  # read-only commands skip repair; no error, no write
    assert target.read_text() == "precious"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_lock_file_of_another_user_or_a_fifo_is_refused(tmp_path):
    lock = tmp_path / ".explain.lock"
    lock.write_text("1\n")
    os.chown(lock, 65534, 65534)
    with pytest.raises(OutputError, match="belongs to another user"):
        ExpertLock(tmp_path, "explain").acquire()
    assert lock.read_text() == "1\n"
    lock.unlink()
    os.mkfifo(lock)
    with pytest.raises(OutputError, match="is not a regular file"):
        ExpertLock(tmp_path, "explain").acquire()


def test_files_we_create_are_never_written_through_a_link(tmp_path):
    target = tmp_path / "userfile.txt"
    target.write_text("precious")
    (tmp_path / "run.json").symlink_to(target)
    with pytest.raises((OutputError, FileExistsError)):
        write_new(tmp_path / "run.json", "{}")
    assert target.read_text() == "precious"


def test_a_symlinked_or_hand_made_work_folder_is_refused_with_force_and_kept(tmp_path, count_base_loads):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "mine.txt").write_text("mine")
    for kind in ("link", "hand-made", "hand-made, empty"):
        out = tmp_path / kind.replace(" ", "").replace(",", "")
        out.mkdir()
        work = out / ".explain.partial"
        if kind == "link":
            work.symlink_to(user)
        else:
            work.mkdir()
            if kind == "hand-made":
                (work / "notes.txt").write_text("mine")
        for extra in ([], ["--force"], ["--resume"]):
            result = train(*QUICK, "--output-dir", str(out), *extra)
            assert result.exit_code == 2, (kind, extra, result.output)
            line = last_line(result)
            assert line.startswith(f"error: {work} is ") and "not a work folder mtg-train made" in line, line
        assert work.exists() and sorted(p.name for p in user.iterdir()) == ["mine.txt"]
        if kind == "hand-made":
            assert (work / "notes.txt").read_text() == "mine"
    assert count_base_loads == []


def test_a_symlinked_training_log_is_refused_and_its_target_kept(tmp_path, count_base_loads):
    out = tmp_path / "adapters"
    out.mkdir()
    (tmp_path / "userfile.txt").write_text("precious")
    (out / "training_log.txt").symlink_to(tmp_path / "userfile.txt")
    result = train(*QUICK, "--output-dir", str(out))
    assert result.exit_code == 2 and "training_log.txt is a symbolic link" in last_line(result)
    assert (tmp_path / "userfile.txt").read_text() == "precious" and count_base_loads == []


# --- recovery touches only what our install left ------------------------------------------------------------


def test_recovery_leaves_a_users_old_folder_and_removes_only_marked_leftovers_of_dead_runs(tmp_path, trained):
    out = adapters_with(tmp_path, trained)
    backup, ours, live = out / ".explain.old-backup", out / ".explain.old-4242", out / ".explain.old-1"
    for folder in (backup, ours, live):
        shutil.copytree(out / "explain", folder)  # backup: the user's own copy, named like ours
    marked(ours)
    marked(live, pid=1)  # PID 1 is always alive
    result = CliRunner().invoke(eval_command, ["--expert", "explain", "--adapters", str(out), "--max-new-tokens", "1", "--no-fail"])
    assert result.exit_code == 0, result.output
    assert backup.is_dir() and live.is_dir() and not ours.exists()


def test_an_unmarked_previous_adapter_is_never_installed_or_removed_but_named(tmp_path, trained):
    out = adapters_with(tmp_path, trained)
    (out / "explain").rename(out / ".explain.old-4242")  # no marker: a kill in the instant before it was written, or a user
    messages = []
    recover(out, "explain", messages.append)
    assert not (out / "explain").exists() and (out / ".explain.old-4242").is_dir()
    assert len(messages) == 1 and "carries no mtg-train marker, so it was left alone" in messages[0]


def test_a_work_folder_without_our_marker_is_not_used_to_install(tmp_path, trained):
    out = adapters_with(tmp_path, trained)
    shutil.copytree(out / "explain", out / ".explain.partial" / "adapter")
    (out / "explain").rename(out / ".explain.old-77")
    marked(out / ".explain.old-77")
    recover(out, "explain", lambda line: None)
    # the previous adapter (ours, marked) is restored; the unmarked work folder is left as it was
    assert (out / "explain").is_dir() and (out / ".explain.partial" / "adapter").is_dir()
    assert not (out / "explain" / WORK_MARKER).exists()


# --- eval.json ------------------------------------------------------------------------------------------------


def eval_args(out, *extra):
    return ["--expert", "explain", "--adapters", str(out), "--max-new-tokens", "1", "--no-fail", *extra]


def test_eval_never_writes_results_into_a_newer_adapter_or_while_a_run_holds_the_lock(tmp_path, trained, monkeypatch):
    from mtg_core import evaluate as evaluation
    from mtg_core.outputs import install

    out = adapters_with(tmp_path, trained)

    real = evaluation.evaluate

    def retrained_meanwhile(*args, **kwargs):
        results = real(*args, **kwargs)
        newer = tmp_path / "newer"
        shutil.copytree(trained, newer)
        install(newer, out / "explain")  # what a mtg-train finishing during the evaluation does
        return results

    monkeypatch.setattr(evaluation, "evaluate", retrained_meanwhile)
    result = CliRunner().invoke(eval_command, eval_args(out))
    assert result.exit_code == 2 and "EXPERT" in result.output
    assert last_line(result) == (f"error: {out / 'explain' / 'eval.json'} not written: the adapter was replaced while it was "
                                 "evaluated; evaluate it again (the results are printed above)")
    assert not (out / "explain" / "eval.json").exists()
    monkeypatch.setattr(evaluation, "evaluate", real)
    with open(out / ".explain.lock", "w") as held:  # a training run holding the expert's lock
        held.write("31337\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        result = CliRunner().invoke(eval_command, eval_args(out))
    assert result.exit_code == 2 and "mtg-train (PID 31337) is replacing that adapter" in last_line(result)
    assert not (out / "explain" / "eval.json").exists()


def test_eval_on_a_full_disk_names_the_file_leaves_no_temporary_and_does_not_block_training(tmp_path, trained):
    out = adapters_with(tmp_path, trained)
    limit = 200  # bytes: every eval.json is longer; ulimit -f makes the kernel refuse the write, as a full disk does

    def small_files():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = "from mtg_core.commands.eval import eval_command; eval_command()"
    result = subprocess.run([sys.executable, "-c", code, *eval_args(out)], env=cli_env(), capture_output=True, text=True,
                            preexec_fn=small_files, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "EXPERT" in result.stdout  # the results are printed before the write is tried
    assert result.stderr.strip().splitlines()[-1] == (f"error: {out / 'explain' / 'eval.json'} not written: File too large "
                                                      "(the results are printed above)")
    assert not [p for p in out.rglob("*") if "tmp" in p.name] and not (out / "explain" / "eval.json").exists()
    (out / ".explain.eval.json.tmp-4242").write_text("")  # what a kill -9 in the middle of the write leaves
    (out / "explain" / "eval.json.tmp").write_text("")  # what mtg-eval before this release left inside the adapter
    check_replaceable(out, "explain")


def test_eval_on_a_read_only_adapters_folder_prints_the_results_then_says_why(tmp_path, trained, monkeypatch):
    import errno

    from mtg_core.outputs import files as outputs

    out = adapters_with(tmp_path, trained)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # root ignores permission bits: a read-only mount, as the kernel reports it
        if flags & os.O_CREAT and str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "open", read_only)
    result = CliRunner().invoke(eval_command, eval_args(out))
    assert result.exit_code == 2 and "EXPERT" in result.output and "[explain]" in result.output
    assert last_line(result) == (f"error: {out / 'explain' / 'eval.json'} not written: Read-only file system "
                                 "(the results are printed above)")


# --- exports ------------------------------------------------------------------------------------------------------


def test_re_export_refuses_a_folder_with_user_files_at_any_depth_and_changes_nothing(tmp_path, trained):
    adapters = adapters_with(tmp_path, trained)
    out = tmp_path / "exports"
    assert run_export("-e", "explain", "--format", "vllm", "--adapters", adapters, "--out", out).exit_code == 0
    folder = out / "explain"
    record = json.loads((folder / "export.json").read_text())["files"]
    assert set(record) == {"adapter_config.json", "adapter_model.safetensors"}
    cases = {
        "serve.sh": lambda: (folder / "serve.sh").write_text("vllm serve ..."),
        "mydocs/": lambda: (folder / "mydocs" / "deep").mkdir(parents=True),
        "adapter_config.json (changed since it was written)": lambda: (folder / "adapter_config.json").write_text("{}"),
    }
    for name, damage in cases.items():
        shutil.rmtree(folder)
        assert run_export("-e", "explain", "--format", "vllm", "--adapters", adapters, "--out", out).exit_code == 0
        damage()
        before = snapshot(out)
        result = run_export("-e", "explain", "--format", "vllm", "--adapters", adapters, "--out", out)
        assert result.exit_code == 2, result.output
        assert last_line(result) == (f"error: {folder} also holds {name}, which mtg-export did not write; move them out of it or "
                                     "choose another --out (nothing was changed)")
        assert snapshot(out) == before
    # an export written before export.json recorded hashes lists its top-level names: the same rule
    shutil.rmtree(folder)
    assert run_export("-e", "explain", "--format", "vllm", "--adapters", adapters, "--out", out).exit_code == 0
    marker = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps({**marker, "files": sorted(marker["files"])}))
    assert run_export("-e", "explain", "--format", "vllm", "--adapters", adapters, "--out", out).exit_code == 0
    (folder / "export.json").write_text(json.dumps({**marker, "files": sorted(marker["files"])}))
    (folder / "serve.sh").write_text("x")
    result = run_export("-e", "explain", "--format", "vllm", "--adapters", adapters, "--out", out)
    assert result.exit_code == 2 and "also holds serve.sh" in last_line(result)


def test_exported_files_get_the_users_umask(trained, tmp_path):
    adapters = adapters_with(tmp_path, trained)
    previous = os.umask(0o022)
    try:
        for fmt in ("vllm", "gguf"):
            assert run_export("-e", "explain", "--format", fmt, "--adapters", adapters, "--out", tmp_path / fmt).exit_code == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for fmt in ("vllm", "gguf") for p in (tmp_path / fmt / "explain").iterdir()}
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("where", ["adapters", "adapters/explain", "adapters/explain/sub", "real adapter"])
def test_an_out_inside_the_adapters_is_refused_before_anything_is_written(tmp_path, trained, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    adapters = adapters_with(tmp_path, trained)
    if where == "real adapter":  # adapters/explain a link to the real folder; --out that folder
        real = tmp_path / "real"
        (adapters / "explain").rename(real)
        (adapters / "explain").symlink_to(real)
        where = "real"
    before = snapshot(tmp_path)
    result = run_export("-e", "explain", "--format", "vllm", "--adapters", "adapters", "--out", where)
    assert result.exit_code == 2, result.output
    assert last_line(result).startswith(f"error: --out {where} is inside ") and "choose another --out" in last_line(result)
    assert snapshot(tmp_path) == before


def test_export_all_repairs_an_interrupted_install_first(tmp_path, trained):
    adapters = adapters_with(tmp_path, trained)
    shutil.copytree(adapters / "explain", adapters / ".explain.partial" / "adapter")
    marked(adapters / ".explain.partial")
    (adapters / "explain").rename(adapters / ".explain.old-77")
    marked(adapters / ".explain.old-77")
    result = run_export("--all", "--format", "vllm", "--adapters", adapters, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"warning: restored {adapters / 'explain'}" in result.output and (tmp_path / "out" / "explain" / "export.json").is_file()
    assert sorted(p.name for p in adapters.iterdir()) == ["explain"]


SLOW_MERGE = """
import sys, time
import safetensors.torch as st
from mtg_core.commands.export import export_command
real = st.save_file
def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("shard written", file=sys.stderr, flush=True)
    time.sleep(60)
st.save_file = slow  # write_merged imports it when it runs
export_command()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_during_a_merged_export_removes_its_work_folder(tmp_path, trained, sig):
    adapters = adapters_with(tmp_path, trained)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "-e", "explain", "--format", "merged", "--adapters", str(adapters),
                                "--out", str(out)], env=cli_env(), stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "shard written" in line:
            assert list(out.glob(".explain.partial-*"))
            process.send_signal(sig)
            break
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + sig, stderr
    assert f"interrupted: stopped by {signal.Signals(sig).name}; the export being written was removed" in stderr
    assert "Traceback" not in stderr and sorted(p.name for p in out.iterdir()) == []


def test_leftovers_of_a_killed_export_are_cleaned_only_when_marked_and_dead(tmp_path, trained):
    adapters = adapters_with(tmp_path, trained)
    out = tmp_path / "out"
    out.mkdir()
    dead, live, user = out / f".explain.partial-{DEAD_PID}", out / ".explain.partial-1", out / ".explain.partial-7"
    for folder in (dead, live, user):
        folder.mkdir()
    marked(dead)
    (dead / "model.safetensors").write_bytes(b"x" * 1000)  # a SIGKILL in the middle of a shard
    marked(live, pid=1)
    (user / "notes.txt").write_text("mine")
    assert run_export("-e", "explain", "--format", "vllm", "--adapters", adapters, "--out", out).exit_code == 0
    assert not dead.exists() and live.is_dir() and (user / "notes.txt").read_text() == "mine"


def test_a_kill_between_the_renames_of_an_export_install_restores_the_previous_export(tmp_path, trained):
    adapters = adapters_with(tmp_path, trained)
    out = tmp_path / "out"
    assert run_export("-e", "explain", "--format", "gguf", "--adapters", adapters, "--out", out).exit_code == 0
    before = snapshot(out / "explain")
    (out / "explain").rename(out / f".explain.old-{DEAD_PID}")
    marked(out / f".explain.old-{DEAD_PID}")
    from mtg_core.export.writing import clean_leftovers

    clean_leftovers(out, "explain")
    assert snapshot(out / "explain") == before and sorted(p.name for p in out.iterdir()) == ["explain"]


# --- locks of --all ---------------------------------------------------------------------------------------------


def test_all_refused_by_one_held_lock_leaves_no_lock_holding_its_pid(tmp_path, count_base_loads):
    out = tmp_path / "adapters"
    out.mkdir()
    with open(out / ".predict.lock", "w") as held:
        held.write("31337\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        result = train("--all", "--max-steps", "1", "--output-dir", str(out))
        assert result.exit_code == 2 and "being written by another mtg-train (PID 31337)" in last_line(result)
        assert sorted(p.name for p in out.glob(".*.lock")) == [".predict.lock"]
        assert (out / ".predict.lock").read_text() == "31337\n"
    assert count_base_loads == []


# --- resume checks what the Trainer will read ----------------------------------------------------------------


def test_resume_passes_over_a_checkpoint_with_an_empty_trainer_state_or_a_foreign_optimizer(tmp_path, monkeypatch, count_base_loads):
    from test_reliability import SMALL, SignalAt

    from conftest import add_plugin

    with monkeypatch.context() as patch:
        add_plugin(patch, SignalAt(3))
        assert train(*SMALL, "--output-dir", str(tmp_path), "--save-steps", "1").exit_code == 130
    work = tmp_path / ".explain.partial"
    assert checkpoint_problem(work / "checkpoint-3") is None
    (work / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with zipfile.ZipFile(work / "checkpoint-2" / "optimizer.pt", "w") as archive:
        archive.writestr("notes.txt", "a valid zip, not an optimizer")
    assert checkpoint_problem(work / "checkpoint-3") == "trainer_state.json is not the Trainer's state of step 3 (global_step, log_history)"
    assert checkpoint_problem(work / "checkpoint-2") == "optimizer.pt is not a torch optimizer state"
    shutil.rmtree(work / "checkpoint-1", ignore_errors=True)
    count_base_loads.clear()
    result = train(*SMALL, "--output-dir", str(tmp_path), "--resume")
    assert result.exit_code == 2 and count_base_loads == []
    assert "nothing to resume for explain: no complete checkpoint" in last_line(result)
    assert "checkpoint-3: trainer_state.json is not the Trainer's state" in last_line(result)
