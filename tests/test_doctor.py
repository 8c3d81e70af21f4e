"""mtg-doctor on the CPU: every check that applies passes, the CUDA-only ones say SKIP and why; a failed check exits 1."""

import json

import pytest
import torch
from click.testing import CliRunner

from mtg_core.commands.doctor import doctor_command
from mtg_core.doctor import checks


def doctor(*args):
    result = CliRunner().invoke(doctor_command, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run; on a GPU every check runs")
def test_on_the_cpu_every_applicable_check_passes_and_the_rest_skip_with_a_reason():
    result = doctor("--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["ok"]
    statuses = {check["check"]: check["status"] for check in report["checks"]}
    assert statuses == {name: "SKIP" if name == "peak memory vs the plan" else "PASS" for name, _ in checks.CHECKS}
    reasons = {check["check"]: check["reason"] for check in report["checks"]}
    assert "no CUDA device" in reasons["peak memory vs the plan"]
    assert "identical" in reasons["streamed vs resident training step"] and "as planned" in reasons["streamed vs resident training step"]
    assert reasons["optimizer step host syncs"].startswith("1 host sync per step over 224 LoRA tensors (AdamW8bit alone: 224)")
    env = report["environment"]
    assert {"python", "torch", "driver", "gpu", "bitsandbytes", "transformers", "peft", "moe backend", "host ram",
            "memlock limit", "h2d bandwidth", "bf16"} <= set(env)
    assert env["bitsandbytes"].endswith("kernels load and run on cpu") and env["moe backend"].startswith("grouped_mm (cpu")


def test_a_failing_check_is_one_line_and_exits_1(monkeypatch):
    # bitsandbytes' own step, a sync per tensor: the optimizer check must catch it
    monkeypatch.setattr("mtg_core.optim.one_sync_per_step", lambda cls: cls)

    def broken(bench):
        raise ValueError("no kernel image\nsecond line")

    monkeypatch.setattr(checks, "CHECKS", [checks.CHECKS[0], ("optimizer step host syncs", checks.optimizer_syncs), ("broken", broken)])
    result = doctor()
    lines = result.output.splitlines()
    assert result.exit_code == 1 and "a check FAILED" in lines[-1]
    assert any(line.startswith("PASS  NF4 dequantisation: ") for line in lines)
    assert any(line.startswith("FAIL  optimizer step host syncs: 224 host syncs per step, expected 1") for line in lines)
    assert any(line.startswith("FAIL  broken: ValueError: no kernel image (") for line in lines)
    assert "Traceback" not in result.output and "second line" not in result.output


def test_a_usage_error_is_one_line_and_exits_2():
    result = CliRunner().invoke(doctor_command, ["--bogus"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == ["error: no such option '--bogus'. (see --help)"]
