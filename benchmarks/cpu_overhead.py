"""Wall time of `mtg-train` as a user runs it, against a plain Trainer + peft script, and EXPLAIN against its dropout-0 twin.

Goals on a CPU (issue 23), whole process:
  (a) the expert at LoRA dropout 0 (EXPLAIN's data, template, rank and alpha) / the plain script <= 1.1
  (b) EXPLAIN as shipped (dropout 0.1) / its dropout-0 twin                                     <= 1.15
Run from the repository root with the project's venv (the defaults are the measured settings):
    .venv/bin/python benchmarks/cpu_overhead.py --repeats 5
Settings, as a user runs them: tiny-mixtral (2 layers, hidden 128), EXPLAIN's first 64 records, 30 steps,
batch 4 x 4 accumulation, --seq-len 256, --quant none, LoRA r16 alpha 32 on q,k,v,o,w1,w2,w3, 8-bit AdamW
(paged in the plain script, as a user writes it; bitsandbytes has nothing to page on a CPU), gradient
checkpointing. Each run is timed as a whole process (wall and CPU: user + system, which other load on a
shared machine disturbs less), and split into its training loop (`trainer.train()`, as both sides report
it) and the rest (imports, data, model, peft; saving). The three sides alternate within each repeat, so
machine noise hits them alike; every repeat is printed. `--small` is the smoke test's few-second version.

The plain script is what a user writes by hand on stock transformers: its fused experts take LoRA through
peft's `target_parameters` (peft's w1/w2/w3 mapping), whose ParamWrapper refuses dropout != 0, so the
like-for-like comparison (a) is at dropout 0. The twin is EXPLAIN's package with only the dropout changed,
made with `mtg-new-expert` and pip-installed into a scratch folder before the clock starts.
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN = r'''
import json, sys, time, torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
from importlib.resources import files
base, out, steps, samples, seq_len, batch, accum = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
tok = AutoTokenizer.from_pretrained(base)
template = (files("mtg_expert_explain") / "template.txt").read_text().rstrip()
rows = []
for line in (files("mtg_expert_explain") / "data/training/explain_examples.jsonl").read_text().splitlines()[:samples]:
    r = json.loads(line)
    p = tok(template.format(input=r["input"]))["input_ids"]
    c = tok(" " + r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + c)[:seq_len]
    rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(p) + c)[:seq_len]})
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]))
args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                         learning_rate=2e-4, optim="paged_adamw_8bit", activation_checkpointing=True,
                         activation_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True, logging_steps=1,
                         save_strategy="no", report_to=["tensorboard"], seed=42, data_seed=42, lr_scheduler_type="cosine", warmup_steps=0.03)
trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
started = time.perf_counter()  # as mtg-train's wall_time_s: the whole trainer.train() call
trainer.train()
loop = time.perf_counter() - started
model.save_pretrained(out)
print(json.dumps({"train_wall_s": loop}))
'''

SIDES = ("plain", "twin", "explain")  # the plain script; EXPLAIN at dropout 0; EXPLAIN as shipped
MEASURES = ("whole process wall s", "whole process CPU s", "training loop wall s", "outside the loop wall s")


def twin_expert(scratch: str) -> str:
    """Install "explain0" (EXPLAIN's package with LoRA dropout 0, nothing else changed) under scratch/site."""
    from importlib.resources import files

    from mtg_core.scaffold import scaffold

    root = scaffold("explain0", "EXPLAIN with LoRA dropout 0", Path(scratch))
    package = root / "mtg_expert_explain0"
    explain = files("mtg_expert_explain")
    (package / "template.txt").write_text((explain / "template.txt").read_text())
    (package / "data/training/explain0_examples.jsonl").write_text((explain / "data/training/explain_examples.jsonl").read_text())
    shipped = (explain / "plugin.py").read_text()
    if "dropout=0.1)" not in shipped:
        sys.exit("benchmarks/cpu_overhead.py: EXPLAIN's plugin.py no longer sets dropout=0.1; update the twin's recipe")
    plugin = shipped.replace("dropout=0.1)", "dropout=0.0)").replace('name="explain"', 'name="explain0"')
    (package / "plugin.py").write_text(plugin)
    site = f"{scratch}/site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(root)], check=True)
    return site


def timed(command: list[str]) -> tuple[float, float, str]:
    """(whole-process wall seconds, CPU seconds, stdout) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        sys.exit(f"benchmark run failed: {shlex.join(command)[:300]}\n{result.stderr[-3000:]}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, result.stdout


def run_side(side: str, run: str, base: str, options) -> tuple[float, float, float]:
    """(whole wall, whole CPU, training loop wall) of one run of one side."""
    if side == "plain":
        wall, cpu, out = timed([sys.executable, "-c", PLAIN, base, run, *map(str, (options.steps, options.samples, options.seq_len,
                                                                                options.batch_size, options.grad_accum))])
        return wall, cpu, json.loads(out.strip().splitlines()[-1])["train_wall_s"]
    expert = "explain0" if side == "twin" else "explain"
    wall, cpu, _ = timed([f"{os.path.dirname(sys.executable)}/mtg-train", "--expert", expert, "--base-model", "tiny-mixtral",
                          "--lr", "2e-4", "--output-dir", run, "--max-steps", str(options.steps), "--quant", options.quant,
                          "--max-samples", str(options.samples), "--seq-len", str(options.seq_len),
                          "--batch-size", str(options.batch_size), "--grad-accum", str(options.grad_accum)])
    return wall, cpu, json.loads(Path(f"{run}/{expert}/training_meta.json").read_text())["wall_time_s"]


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} ({', '.join(f'{t:.2f}' for t in times)})"


def ratio_line(name: str, ours: list[float], theirs: list[float], goal: str) -> str:
    per_repeat = ", ".join(f"{o / t:.3f}" for o, t in zip(ours, theirs))
    spread = [o / t for o, t in zip(ours, theirs)]
    return (f"{name}: ratio of medians {statistics.median(ours) / statistics.median(theirs):.3f}; per repeat {per_repeat} "
            f"(min {min(spread):.3f}, max {max(spread):.3f}){goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quant", choices=("none", "nf4"), default="none",
                        help="mtg-train's --quant (the plain script's fused experts cannot be 4-bit: bitsandbytes issue #1849)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every side (default: torch's choice)")
    parser.add_argument("--small", action="store_true", help="smoke test: 2 steps of 8 records, batch 2 x 1, once")
    options = parser.parse_args()
    if options.small:
        options.steps, options.samples, options.batch_size, options.grad_accum, options.repeats = 2, 8, 2, 1, 1
    from mtg_core.base_models import ensure_tiny_mixtral

    base = str(ensure_tiny_mixtral())
    runs = {side: tuple([] for _ in MEASURES) for side in SIDES}
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [twin_expert(scratch), os.environ.get("PYTHONPATH")]))
        os.environ["MTG_PLUGINS"] = "explain,explain0"
        if options.threads:
            os.environ["OMP_NUM_THREADS"] = str(options.threads)
        for i in range(options.repeats):
            for side in SIDES:  # alternate so machine noise hits every side alike
                wall, cpu, loop = run_side(side, f"{scratch}/{side}{i}", base, options)
                for times, value in zip(runs[side], (wall, cpu, loop, wall - loop)):
                    times.append(value)
    command = shlex.join([".venv/bin/python", "benchmarks/cpu_overhead.py", *sys.argv[1:]])
    print(f"command: {command}")
    print(f"steps={options.steps} samples={options.samples} seq_len={options.seq_len} batch={options.batch_size}x{options.grad_accum} "
          f"quant={options.quant} repeats={options.repeats} threads={options.threads or 'default'} load={os.getloadavg()[0]:.1f}")
    for index, measure in enumerate(MEASURES):
        print(f"{measure}: " + "; ".join(f"{side} {summary(runs[side][index])}" for side in SIDES))
    whole = 0
    print(ratio_line("(a) twin (EXPLAIN at dropout 0) / plain, whole process wall", runs["twin"][whole], runs["plain"][whole], "  goal <= 1.1"))
    print(ratio_line("(b) EXPLAIN (dropout 0.1) / twin, whole process wall", runs["explain"][whole], runs["twin"][whole], "  goal <= 1.15"))
    for index, measure in enumerate(MEASURES[1:], 1):
        print(ratio_line(f"(a) {measure}", runs["twin"][index], runs["plain"][index], ""))
        print(ratio_line(f"(b) {measure}", runs["explain"][index], runs["twin"][index], ""))


if __name__ == "__main__":
    main()
