"""Verify adapters (the seed's "example inferences"): held-out loss and greedy answers, base vs adapter.

Every adapter is loaded onto one base with peft's multi-adapter support; switching expert is
`set_adapter`, and `disable_adapter()` gives the bare base, so the base loads once for everything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mtg_core.data import read_records, tokenize
from mtg_core.errors import MtgError
from mtg_core.plugins import Expert, Registry


class AdapterError(MtgError):
    """An adapter folder is missing, incomplete, or was trained on another base."""


def check_adapter(adapters: Path, expert: str, base_location: str) -> Path:
    folder = adapters / expert
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"{folder}: no adapter (adapter_config.json missing); train it with: mtg-train --expert {expert} --output-dir {adapters}")
    trained_on = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if trained_on and Path(trained_on).resolve() != Path(base_location).resolve() and trained_on != base_location:
        raise AdapterError(f"{folder} was trained on {trained_on}, not on {base_location}; pass --base-model {trained_on} or retrain it")
    return folder


def attach_adapters(base_model, folders: dict[str, Path]):
    """One peft model holding every adapter under its expert's name."""
    from peft import PeftModel

    names = list(folders)
    model = PeftModel.from_pretrained(base_model, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.eval()
    return model


def prompt_for(registry: Registry, expert: Expert, question: str) -> str:
    """The prompt exactly as training formatted it (the template never sees the answer)."""
    return registry.format_example(expert, {"input": question, "output": ""}).prompt


def heldout_batch(tokenizer, registry: Registry, expert: Expert, seq_len: int) -> dict:
    """`expert`'s held-out set, formatted and masked exactly as in training, as one padded batch."""
    from transformers import DataCollatorForSeq2Seq

    records = read_records(registry.data_files(expert).heldout)
    data = tokenize([registry.format_example(expert, r) for r in records], tokenizer, seq_len)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)(data.rows)


def heldout_loss(model, batch: dict) -> float:
    """Mean loss per answer token of a held-out batch under the model's current adapter."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    return out.loss.item()  # transformers averages over every unmasked label token of the batch


def generate(model, tokenizer, prompt: str, max_new_tokens: int, streamer=None) -> str:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate(model, tokenizer, registry: Registry, experts: list[Expert], max_new_tokens: int, seq_len: int) -> dict:
    """Per expert: held-out loss of base and adapter, greedy samples; with several, the loss matrix."""
    results = {}
    batches = {e.name: heldout_batch(tokenizer, registry, e, seq_len) for e in experts}
    with model.disable_adapter():
        base_losses = {e.name: heldout_loss(model, batches[e.name]) for e in experts}
        base_answers = {e.name: [generate(model, tokenizer, prompt_for(registry, e, q), max_new_tokens)
                                 for q in registry.eval_prompts(e)] for e in experts}
    matrix = {}
    for adapter in experts:
        model.set_adapter(adapter.name)
        matrix[adapter.name] = {e.name: heldout_loss(model, batches[e.name]) for e in experts}
        questions = registry.eval_prompts(adapter)
        answers = [generate(model, tokenizer, prompt_for(registry, adapter, q), max_new_tokens) for q in questions]
        base, tuned = base_losses[adapter.name], matrix[adapter.name][adapter.name]
        results[adapter.name] = {
            "heldout_loss": {"base": base, "adapter": tuned},
            "heldout_perplexity": {"base": math.exp(base), "adapter": math.exp(tuned)},
            "improved": tuned < base,
            "samples": [{"prompt": q, "base": b, "adapter": a} for q, b, a in zip(questions, base_answers[adapter.name], answers)],
        }
    if len(experts) > 1:
        for name in results:
            results[name]["heldout_matrix"] = matrix  # rows: adapter; columns: held-out set
    return results
