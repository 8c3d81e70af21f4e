"""The benchmark scripts run (smoke, tiny shapes on the CPU); no timing is asserted."""

import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_moe_benchmark_smoke_runs_every_variant_on_the_cpu():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_moe.py"), "--small"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert "4N" in rows[0]["mfu_convention"]
    check = rows[1]
    assert 0 < check["nf4_weight_rel_error"] < 0.2 and 0 < check["logits_rel_error"] < 1 and check["lora_tensors_compared"] > 50
    variants = {row["variant"]: row for row in rows[2:]}
    assert set(variants) == {"bf16", "stock", "nf4", "nf4-attn"}
    assert variants["nf4"]["quantized_weights"] == "56/56" and variants["stock"]["quantized_weights"] == "8/40"
    assert all(row["tokens_per_s"] > 0 and row["planned_gib"] > 0 and row["mfu"] > 0 for row in variants.values())
    nf4 = variants["nf4"]
    # LoRA dropout 0.05 as the shipped experts train: one A GEMM per kind, and the dropout ops (1,607 measured)
    assert 500 < nf4["aten_ops_forward_backward"] <= 1700 and nf4["aten_ops_optimizer_step"] > 0
    assert set(nf4["optimizer_step_ms"]) == {"paged_adamw_8bit", "paged_adamw_8bit_bitsandbytes", "adamw_8bit", "adamw_torch_fused"}
    assert nf4["expert_lora_cost"] == round(variants["nf4-attn"]["tokens_per_s"] / nf4["tokens_per_s"] - 1, 3)


def test_gpu_moe_full_smoke_builds_layer_by_layer_and_streams_as_planned():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_moe.py"), "--full", "--small"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")][1:]
    resident, streamed, chunked = rows
    assert resident["offload_experts"] == "none" and resident["streamed_layers"] == 0 and resident["copies_per_step"] == 0
    assert streamed["streamed_layers"] == 4 and streamed["planned_host_gib"] > 0 and streamed["tokens_per_s"] > 0
    assert streamed["copies_per_step"] == streamed["planned_copies_per_step"] == 4  # 2N - 4 in the steady state
    assert resident["ratio_to_resident"] == 1.0 and 0 < streamed["ratio_to_resident"]
    assert streamed["build_s"] > 0 and "peak_allocated_plus_outside_gib" in streamed  # each model built in a process of its own
    # the 8 GiB row's shape on the tiny model: a budget under which the plan chunks the experts, run with that chunk
    assert streamed["expert_chunk"] is None and 0 < chunked["expert_chunk"] < 8 and chunked["streamed_layers"] == 4
    assert chunked["copies_per_step"] == chunked["planned_copies_per_step"] == 4 and chunked["tokens_per_s"] > 0  # no extra copy


def test_gpu_moe_full_has_the_8_gib_row_planned_as_mtg_train_plans_it():
    """--full's 8 GiB row (measured only on a GPU): 1 x 512, every layer streamed, 2 of 8 experts at a time, fitting the
    budget by the plan, as `mtg-train --plan --gpu-memory 8 --batch-size 1 --seq-len 512` plans it (tests/test_plan.py)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_moe", ROOT / "benchmarks" / "gpu_moe.py")
    gpu_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_moe)
    eight = [run for run in gpu_moe.FULL_RUNS if run[1] == 8]
    assert eight == [("auto", 8, (512,))] and 512 in next(run for run in gpu_moe.FULL_RUNS if run[0] == "none")[2]
    [(offload, budget, tokens, plan)] = gpu_moe.full_plans(eight, 512, False, "cuda", torch.bfloat16)
    # the device side only: the host check uses this machine's RAM (21 GiB to pin on the GPU machine)
    assert plan.offloaded_layers == 32 and plan.expert_chunk == 2 and plan.total_bytes <= 0.9 * plan.device_free_bytes == 0.9 * 8 * 1024**3


def test_cpu_overhead_benchmark_smoke_runs_all_three_sides():
    """The plain script, EXPLAIN's dropout-0 twin and EXPLAIN as shipped each train (2 steps) and are compared."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_overhead.py"), "--small"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "command: .venv/bin/python benchmarks/cpu_overhead.py --small"
    walls = next(line for line in lines if line.startswith("whole process wall s:"))
    assert all(f"{side} median" in walls for side in ("plain", "twin", "explain"))
    ratios = {line.split(":")[0]: float(line.split("ratio of medians ")[1].split(";")[0]) for line in lines if "ratio of medians" in line}
    assert set(ratios) >= {"(a) twin (EXPLAIN at dropout 0) / plain, whole process wall", "(b) EXPLAIN (dropout 0.1) / twin, whole process wall"}
    assert all(0 < ratio < 100 for ratio in ratios.values())
