"""Interruption and resume: signals checkpoint and exit 130/143, SIGKILL loses nothing, resumed == uninterrupted."""

import json
import re
import signal
import subprocess

from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import MTG_TRAIN, add_plugin, cli_env, with_option, write_jsonl
from mtg_core import hookimpl
from mtg_core.commands.train import train_command
from mtg_core.train import STOP

SMALL = ["--expert", "explain", "--max-samples", "16", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "192", "--max-steps", "6"]


def train(*args):
    return CliRunner().invoke(train_command, list(args))


class SignalAt:
    """Acts as if SIGINT arrived during step `step` (the CLI's handler sets STOP.signum the same way)."""

    def __init__(self, step):
        self.step = step

    @hookimpl
    def mtg_trainer_callbacks(self, expert):
        step = self.step

        class Fire(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step + 1 == step:
                    STOP.signum = signal.SIGINT

        return [Fire()]


def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert train(*SMALL, "--output-dir", str(straight)).exit_code == 0
    with monkeypatch.context() as patch:
        add_plugin(patch, SignalAt(3))
        stopped = train(*SMALL, "--output-dir", str(interrupted))
    assert stopped.exit_code == 130, stopped.output
    assert "interrupted: stopped by SIGINT at step 3" in stopped.output and "--resume" in stopped.output
    assert not (interrupted / "explain").exists()
    assert (interrupted / ".explain.partial" / "checkpoint-3" / "trainer_state.json").is_file()
    resumed = train(*SMALL, "--output-dir", str(interrupted), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from step 3" in (interrupted / "training_log.txt").read_text()
    a = load_file(straight / "explain" / "adapter_model.safetensors")
    b = load_file(interrupted / "explain" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((interrupted / "explain" / "training_meta.json").read_text())["resumed_from_step"] == 3
    assert not (interrupted / ".explain.partial").exists()


def test_sigterm_checkpoints_and_sigkill_loses_nothing(tmp_path):
    out = tmp_path / "adapters"
    args = [*SMALL[:-1], "200", "--output-dir", str(out), "--save-steps", "1"]
    assert train(*SMALL, "--output-dir", str(out)).exit_code == 0
    before = {p.relative_to(out): p.read_bytes() for p in (out / "explain").rglob("*") if p.is_file()}

    def run_until_step(step, sig, *extra):
        process = subprocess.Popen([*MTG_TRAIN, *args, *extra], env=cli_env(), stderr=subprocess.PIPE, text=True)
        lines = []
        for line in process.stderr:
            lines.append(line)
            if f"step {step}/" in line:
                process.send_signal(sig)
                break
        lines.append(process.communicate(timeout=120)[1])
        return process.returncode, "".join(lines)

    code, stderr = run_until_step(2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    after = {p.relative_to(out): p.read_bytes() for p in (out / "explain").rglob("*") if p.is_file()}
    assert after == before
    code, stderr = run_until_step(1, signal.SIGTERM)  # an interrupted run is never silently discarded
    assert code == 2 and "holds an interrupted run of explain" in stderr and "--resume" in stderr
    code, stderr = run_until_step(5, signal.SIGTERM, "--resume")
    assert code == 143, stderr
    assert re.search(r"resumed from step [12] ", stderr)
    stopped = re.search(r"interrupted: stopped by SIGTERM at step (\d+); checkpoint in \S+checkpoint-(\d+); continue with: mtg-train", stderr)
    assert stopped and stopped[1] == stopped[2] and int(stopped[1]) >= 5 and "Traceback" not in stderr
    assert (out / ".explain.partial" / f"checkpoint-{stopped[1]}" / "trainer_state.json").is_file()
    assert (out / "explain").is_dir() and {p.relative_to(out): p.read_bytes() for p in (out / "explain").rglob("*") if p.is_file()} == before


def test_resume_refuses_when_there_is_nothing_or_the_meaning_changed(tmp_path, monkeypatch):
    result = train(*SMALL, "--output-dir", str(tmp_path), "--resume")
    assert result.exit_code == 2 and "nothing to resume for explain" in result.output
    with monkeypatch.context() as patch:
        add_plugin(patch, SignalAt(2))
        assert train(*SMALL, "--output-dir", str(tmp_path)).exit_code == 130
    other = write_jsonl(tmp_path / "other.jsonl", [{"input": f"q{i}", "output": f"a{i}"} for i in range(16)])
    changed = train(*with_option(SMALL, "--seq-len", "128"), "--output-dir", str(tmp_path), "--resume", "--data", str(other))
    assert changed.exit_code == 2
    assert "cannot resume explain" in changed.output and "data_sha256 was" in changed.output and "seq_len was 192, now 128" in changed.output
    fresh = train(*SMALL, "--output-dir", str(tmp_path))
    assert fresh.exit_code == 2 and "--force" in fresh.output
    forced = train(*SMALL, "--output-dir", str(tmp_path), "--resume", "--force", "--data", str(other))
    assert forced.exit_code == 0, forced.output
    assert "resumed from step 2" in (tmp_path / "training_log.txt").read_text()


def test_out_of_memory_is_one_message_with_the_settings_to_change(tmp_path, monkeypatch):
    import torch
    from transformers import Trainer

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", oom)
    result = train(*SMALL, "--output-dir", str(tmp_path))
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert "out of GPU memory at step 0" in result.output and "lower --batch-size (now 2" in result.output and "--seq-len (now 192)" in result.output
    assert not any(tmp_path.glob(".explain*"))


def test_resume_passes_over_incomplete_or_corrupt_checkpoints_and_says_so(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        add_plugin(patch, SignalAt(4))
        assert train(*SMALL, "--output-dir", str(tmp_path), "--save-steps", "1").exit_code == 130
    work = tmp_path / ".explain.partial"
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    (work / "checkpoint-4" / "optimizer.pt").unlink()
    weights = work / "checkpoint-3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    resumed = train(*SMALL, "--output-dir", str(tmp_path), "--resume")
    assert resumed.exit_code == 0, resumed.output
    log = (tmp_path / "training_log.txt").read_text()
    assert "not resuming from checkpoint-4: optimizer.pt is missing; using checkpoint-2" in log
    assert "not resuming from checkpoint-3: adapter_model.safetensors is truncated; using checkpoint-2" in log
    assert "resumed from step 2" in log


def test_resume_refuses_without_a_whole_checkpoint_or_with_a_corrupt_run_record(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        add_plugin(patch, SignalAt(2))
        assert train(*SMALL, "--output-dir", str(tmp_path)).exit_code == 130
    work = tmp_path / ".explain.partial"
    (work / "run.json").write_text("{ not json")
    result = train(*SMALL, "--output-dir", str(tmp_path), "--resume")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: cannot resume explain: {work / 'run.json'} is not valid JSON, so the run's settings are unknown; pass --force to resume anyway")
    (work / "checkpoint-2" / "scheduler.pt").write_bytes(b"PK\x03\x04 truncated")
    result = train(*SMALL, "--output-dir", str(tmp_path), "--resume")
    assert result.exit_code == 2
    assert "nothing to resume for explain: no complete checkpoint" in result.output and "(checkpoint-2: scheduler.pt is truncated or not a torch file)" in result.output


def test_resume_onto_a_base_of_another_size_is_one_line(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from mtg_core.base_models import TINY_CONFIG, TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    other = tmp_path / "narrow-mixtral"
    MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), **{**TINY_CONFIG, "hidden_size": 64, "intermediate_size": 128})).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with monkeypatch.context() as patch:
        add_plugin(patch, SignalAt(2))
        assert train(*SMALL, "--output-dir", str(tmp_path)).exit_code == 130
    result = train(*SMALL, "--output-dir", str(tmp_path), "--resume", "--force", "--base-model", str(other))
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot resume from {tmp_path / '.explain.partial' / 'checkpoint-2'}: its ") and "(trained on another base or rank)" in last
    assert (tmp_path / ".explain.partial" / "checkpoint-2" / "trainer_state.json").is_file()  # kept for a resume on the right base
