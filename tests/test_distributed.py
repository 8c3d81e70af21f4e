"""torchrun on the CPU (gloo, 2 processes): one adapter, equal to a single-process run with the same global batch."""

import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from conftest import ROOT, cli_env, make_dist

BIN = Path(sys.executable).parent
EXPLAIN = ROOT / "mtg_expert_explain" / "mtg_expert_explain"
EXPLAIN_DATA = EXPLAIN / "data" / "training" / "explain_examples.jsonl"
# EXPLAIN's template and data with LoRA dropout 0 (dropout masks differ between one and two processes), as a package of its own
NODROP = {
    "mtg_expert_nodrop/__init__.py": "",
    "mtg_expert_nodrop/plugin.py": """from mtg_core import ExpertInfo, LoraSettings, PackagedExpert
plugin = PackagedExpert(info=ExpertInfo("nodrop", "EXPLAIN without dropout"), lora=LoraSettings(16, 32, 0.0),
                        package=__package__, eval_prompts=["What does trample do?"])
""",
    "mtg_expert_nodrop/template.txt": (EXPLAIN / "template.txt").read_text(),
    "mtg_expert_nodrop/data/training/nodrop_examples.jsonl": EXPLAIN_DATA.read_text(),
    "mtg_expert_nodrop/data/heldout/nodrop_heldout.jsonl": (EXPLAIN / "data" / "heldout" / "explain_heldout.jsonl").read_text(),
}
COMMON = ["--expert", "nodrop", "--data", str(EXPLAIN_DATA), "--max-samples", "16", "--max-steps", "4", "--seq-len", "256",
          "--grad-accum", "1", "--seed", "7"]


def test_two_gloo_processes_train_one_adapter_equal_to_one_process(tmp_path):
    env = cli_env(make_dist(tmp_path / "site", "mtg-expert-nodrop", {"nodrop": "mtg_expert_nodrop.plugin:plugin"}, NODROP),
                  MTG_PLUGINS="explain,nodrop")
    single = subprocess.run([str(BIN / "mtg-train"), *COMMON, "--batch-size", "4", "--output-dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mtg-train"),
                             *COMMON, "--batch-size", "2", "--output-dir", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-3000:]
    log = (tmp_path / "two" / "training_log.txt").read_text()
    assert "global batch 4 = 2 per device x 1 accumulation x 2 processes" in log
    assert log.count("step 4/4") == 1  # rank 0 alone writes the log
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["nodrop", "training_log.txt"]
    one = load_file(tmp_path / "one" / "nodrop" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "nodrop" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    # lora_B starts at zero, so its value is what training changed: compare the two runs against that
    b_keys = [k for k in one if "lora_B" in k]
    change = sum(one[k].square().sum() for k in b_keys).sqrt()
    gap = sum((one[k] - two[k]).square().sum() for k in b_keys).sqrt()
    assert change > 0 and gap / change < 0.02, (gap / change).item()
    for k in one:
        if "lora_A" in k:
            assert (one[k] - two[k]).abs().max() < 1e-3 * one[k].abs().max()


def test_all_under_torchrun_trains_the_experts_one_after_another(tmp_path):
    out = tmp_path / "adapters"
    run = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mtg-train"),
                          "--all", "--max-samples", "8", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                          "--seq-len", "384", "--output-dir", str(out)],
                         env=cli_env(MTG_PLUGINS="teach,predict"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["predict", "teach", "training_log.txt"]
    log = (out / "training_log.txt").read_text()
    assert log.index("predict: adapter saved") < log.index("teach: adapter saved")
    assert log.count("loaded tiny-mixtral") == 1 and log.count("adapter saved") == 2


# Acts as if rank 0 alone received SIGTERM during step 2: the ranks must agree to stop together.
STOP_ON_RANK0 = """import os, signal
from transformers import TrainerCallback
from mtg_core import hookimpl
from mtg_core.train import STOP

class Fire(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == 2 and os.environ.get("RANK") == "0" and not os.environ.get("NO_STOP"):
            STOP.signum = signal.SIGTERM

@hookimpl
def mtg_trainer_callbacks(expert):
    return [Fire()]
"""


def test_interrupt_and_resume_under_torchrun(tmp_path):
    site = make_dist(tmp_path / "site", "mtg-stopper", {"stopper": "mtg_stopper"}, {"mtg_stopper.py": STOP_ON_RANK0})
    out = tmp_path / "adapters"
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mtg-train"),
               "--expert", "teach", "--max-samples", "8", "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1",
               "--seq-len", "384", "--output-dir", str(out)]
    stopped = subprocess.run(command, env=cli_env(site, MTG_PLUGINS="teach,stopper"), capture_output=True, text=True, timeout=300)
    assert stopped.returncode != 0 and "interrupted: stopped by SIGTERM at step 2" in stopped.stderr, stopped.stderr[-3000:]
    assert (out / ".teach.partial" / "checkpoint-2" / "trainer_state.json").is_file() and not (out / "teach").exists()
    resumed = subprocess.run([*command, "--resume"], env=cli_env(site, MTG_PLUGINS="teach,stopper", NO_STOP="1"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in (out / "training_log.txt").read_text()
    assert (out / "teach" / "adapter_model.safetensors").is_file() and not (out / ".teach.partial").exists()


def test_accelerate_launch_runs_the_same_data_parallel_training(tmp_path):
    out = tmp_path / "adapters"
    run = subprocess.run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "--no_python",
                          str(BIN / "mtg-train"), "--expert", "explain", "--max-samples", "8", "--max-steps", "2",
                          "--batch-size", "2", "--grad-accum", "1", "--seq-len", "384", "--output-dir", str(out)],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (out / "training_log.txt").read_text()
    assert "global batch 4 = 2 per device x 1 accumulation x 2 processes" in log
    assert (out / "explain" / "adapter_model.safetensors").is_file()
