"""Whole-process wall time of `mtg-train` against a plain Trainer+peft script, same tiny base, data, rank, steps.

Goal (issue 3): ratio <= 1.1 on a CPU. Run from the repository root with the project's venv:
    .venv/bin/python benchmarks/cpu_overhead.py [--steps 30] [--repeats 3]
The plain script is what a user would write by hand: AutoModelForCausalLM with transformers'
bitsandbytes NF4 config (which, note, leaves the fused experts unquantised), peft LoRA on the same
modules and rank, paged_adamw_8bit, gradient checkpointing, the same batch and sequence length.
Its LoRA dropout is 0 (EXPLAIN trains with 0.1): on transformers 5's fused experts peft's ParamWrapper
refuses any other value.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PLAIN = r'''
import json, sys, torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                          Trainer, TrainingArguments)
from importlib.resources import files
base, out, steps, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(base)
template = (files("mtg_expert_explain") / "template.txt").read_text().rstrip()
rows = []
for line in (files("mtg_expert_explain") / "data/training/explain_examples.jsonl").read_text().splitlines()[:samples]:
    r = json.loads(line)
    p = tok(template.format(input=r["input"]))["input_ids"]
    c = tok(" " + r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows.append({"input_ids": (p + c)[:512], "attention_mask": [1] * min(512, len(p + c)), "labels": ([-100] * len(p) + c)[:512]})
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]))
args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=4,
                         learning_rate=2e-4, optim="paged_adamw_8bit", activation_checkpointing=True,
                         activation_checkpointing_kwargs={"use_reentrant": False}, use_cpu=True, logging_steps=1,
                         save_strategy="no", report_to=["tensorboard"], seed=42, lr_scheduler_type="cosine", warmup_steps=0.03)
Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)).train()
model.save_pretrained(out)
'''


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.exit(f"benchmark run failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    from mtg_core.base_models import ensure_tiny_mixtral

    base = str(ensure_tiny_mixtral())
    bin_dir = os.path.dirname(sys.executable)
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(options.repeats):  # alternate so machine noise hits both alike
            plain.append(timed([sys.executable, "-c", PLAIN, base, f"{scratch}/plain{i}", str(options.steps), str(options.samples)]))
            ours.append(timed([f"{bin_dir}/mtg-train", "--expert", "explain", "--base-model", "tiny-mixtral",
                               "--output-dir", f"{scratch}/ours{i}", "--max-steps", str(options.steps),
                               "--max-samples", str(options.samples), "--batch-size", "4", "--grad-accum", "4"]))
    o, p = statistics.median(ours), statistics.median(plain)
    print(f"steps={options.steps} samples={options.samples} repeats={options.repeats}")
    print(f"mtg-train   median {o:.2f}s  runs {', '.join(f'{t:.2f}' for t in ours)}")
    print(f"plain       median {p:.2f}s  runs {', '.join(f'{t:.2f}' for t in plain)}")
    print(f"ratio mtg-train / plain = {o / p:.3f}  (goal <= 1.1)")


if __name__ == "__main__":
    main()
