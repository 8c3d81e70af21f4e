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


# Writes, per rank, what /proc/self/smaps says of the mappings of moe.shared_host's files once training starts.
SMAPS_AT_TRAIN_BEGIN = """import json, os
from pathlib import Path
from transformers import TrainerCallback
from mtg_core import hookimpl

class Maps(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        maps, current = [], None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = {"size": end - start, "inode": int(fields[4]), "path": " ".join(fields[5:])}
                if "mtg-experts-" in current["path"]:
                    maps.append(current)
            elif fields[0].endswith(":") and current is not None and fields[0][:-1] in ("Rss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty"):
                current[fields[0][:-1]] = int(fields[1]) * 1024
        Path(os.environ["MAPS_DIR"], os.environ.get("RANK", "0") + ".json").write_text(json.dumps(maps))

@hookimpl
def mtg_trainer_callbacks(expert):
    return [Maps()]
"""


def test_two_ranks_share_one_host_copy_of_the_streamed_experts_and_train_the_same_adapter(tmp_path):
    """--offload-experts all under torchrun: both ranks map the same file per streamed layer, which no longer has a name
    once training starts and costs neither rank private memory; the adapter equals one process's at the same global batch."""
    import json
    import os
    import socket

    from mtg_core.moe.shared_host import MAGIC

    site = make_dist(tmp_path / "site", "mtg-expert-nodrop", {"nodrop": "mtg_expert_nodrop.plugin:plugin"}, NODROP)
    make_dist(site, "mtg-maps", {"maps": "mtg_maps"}, {"mtg_maps.py": SMAPS_AT_TRAIN_BEGIN})
    shm, maps = tmp_path / "shm", tmp_path / "maps"
    shm.mkdir()
    maps.mkdir()
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = shm / f"mtg-experts-{os.geteuid()}-0123456789abcdef.L1"  # what a killed run's local rank 0 leaves
    stale.write_bytes(MAGIC + json.dumps({"pid": finished.pid, "host": socket.gethostname()}).encode() + b"\n")
    foreign = shm / f"mtg-experts-{os.geteuid()}-notours.L1"
    foreign.write_text("someone else's")
    env = cli_env(site, MTG_PLUGINS="explain,nodrop,maps", MTG_SHM_DIR=str(shm), MAPS_DIR=str(maps))
    args = [*COMMON, "--offload-experts", "all"]
    single = subprocess.run([str(BIN / "mtg-train"), *args, "--batch-size", "4", "--output-dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    assert sorted(p.name for p in shm.iterdir()) == sorted([stale.name, foreign.name])  # one process: nothing shared, nothing cleaned
    alone = json.loads((maps / "0.json").read_text())
    assert alone == []  # its copy is private memory, as before
    double = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mtg-train"),
                             *args, "--batch-size", "2", "--output-dir", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    assert [p.name for p in shm.iterdir()] == [foreign.name]  # the stale file removed, nothing of this run left
    log = (tmp_path / "two" / "training_log.txt").read_text()
    assert f"one copy for the 2 processes of this node in {shm}" in log

    meta = json.loads((tmp_path / "two" / "nodrop" / "training_meta.json").read_text())
    streamed = meta["memory_plan"]["host_bytes"]
    assert meta["memory_plan"]["offloaded_layers"] == 2 and streamed > 0
    rank0, rank1 = (json.loads((maps / f"{rank}.json").read_text()) for rank in (0, 1))
    assert len(rank0) == len(rank1) == 2  # one mapping per streamed layer in each process
    assert {m["inode"] for m in rank0} == {m["inode"] for m in rank1}  # of the same files
    for mapping in rank0 + rank1:
        assert mapping["path"].endswith("(deleted)")  # unlinked once both ranks had mapped them
        assert mapping["Private_Clean"] + mapping["Private_Dirty"] == 0  # no page of it is either rank's own ...
        assert mapping["Shared_Clean"] + mapping["Shared_Dirty"] == mapping["Rss"] > 0  # ... each resident one is both's
    assert sum(m["size"] for m in rank1) == streamed  # the whole streamed copy, mapped and not copied by rank 1

    one = load_file(tmp_path / "one" / "nodrop" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "nodrop" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    b_keys = [k for k in one if "lora_B" in k]  # as in the test above: the change training made, and the gap to it
    change = sum(one[k].square().sum() for k in b_keys).sqrt()
    gap = sum((one[k] - two[k]).square().sum() for k in b_keys).sqrt()
    assert change > 0 and gap / change < 0.02, (gap / change).item()


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
