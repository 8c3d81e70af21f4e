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
    check = rows[1]
    assert 0 < check["nf4_weight_rel_error"] < 0.2 and 0 < check["logits_rel_error"] < 1 and check["lora_tensors_compared"] > 50
    variants = {row["variant"]: row for row in rows[2:]}
    assert set(variants) == {"bf16", "stock", "nf4"}
    assert variants["nf4"]["quantized_weights"] == "56/56" and variants["stock"]["quantized_weights"] == "8/40"
    assert all(row["tokens_per_s"] > 0 and row["planned_gib"] > 0 for row in variants.values())
