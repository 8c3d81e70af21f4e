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


def check_adapter_files(adapters: Path, expert: str) -> Path:
    """The adapter folder, its files checked whole (no base needed): weights, LoRA config, training record."""
    from mtg_core.outputs import META, json_problem, safetensors_problem

    folder = adapters / expert
    retrain = f"retrain it with: mtg-train --expert {expert} --output-dir {adapters}"
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"{folder}: no adapter (adapter_config.json missing); train it with: mtg-train --expert {expert} --output-dir {adapters}")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists() and (folder / "adapter_model.bin").exists():
        raise AdapterError(f"{folder}/adapter_model.bin: a pickle file (loading one can run code); only adapter_model.safetensors is loaded; {retrain}")
    problem = safetensors_problem(weights)
    if problem:
        raise AdapterError(f"{weights} {problem}; {retrain}")
    config_file = folder / "adapter_config.json"
    problem = json_problem(config_file)
    config = {} if problem else json.loads(config_file.read_text(encoding="utf-8"))
    if problem or config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int) or not config.get("target_modules"):
        raise AdapterError(f"{config_file} {problem or 'is not a peft LoRA config (peft_type, r, target_modules)'}; {retrain}")
    if (folder / META).exists():
        problem = json_problem(folder / META)
        if problem:
            raise AdapterError(f"{folder / META}: unreadable ({problem}); {retrain}")
    return folder


def recorded_base(folder: Path):
    """The base an adapter's training_meta.json names (presets and hub ids by name, local folders by path), or None."""
    from mtg_core.base_models import PRESETS, TINY, choose_base
    from mtg_core.outputs import META

    meta = folder / META
    if not meta.is_file():
        return None
    try:
        recorded = json.loads(meta.read_text(encoding="utf-8"))["base_model"]
        name = recorded["name"] if recorded["name"] == TINY or recorded["name"] in PRESETS else recorded.get("id", recorded["location"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise AdapterError(f"{meta}: unreadable (not mtg-train's record of the base); retrain the adapter, or pass --base-model") from None
    return choose_base(name, reason=f"the base {meta} names")


def check_adapter(adapters: Path, expert: str, choice) -> Path:
    """Everything about an adapter folder that can be checked before the base loads: files whole, trained on `choice`."""
    from mtg_core.outputs import META

    folder = check_adapter_files(adapters, expert)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    meta = json.loads((folder / META).read_text(encoding="utf-8")) if (folder / META).exists() else {}
    trained_on = config.get("base_model_name_or_path")
    same = not trained_on or trained_on in (choice.identity, choice.location) or (
        Path(trained_on).is_absolute() and Path(trained_on).resolve() == Path(choice.location).resolve())
    if not same:
        raise AdapterError(f"{folder} was trained on {trained_on}, not on {choice.identity}; pass --base-model {trained_on} or retrain it")
    recorded = meta.get("base_model", {}).get("fingerprint") if isinstance(meta.get("base_model"), dict) else None
    if recorded and choice.fingerprint and recorded != choice.fingerprint:
        raise AdapterError(f"{folder} was trained on another build of {choice.name} (recipe {recorded}, this one {choice.fingerprint}); "
                           f"retrain it with: mtg-train --expert {expert} --output-dir {adapters}")
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
    """Per expert: held-out loss of base and adapter, greedy samples; with several, the loss matrix.

    Prints a line per answer to stderr: a plugin's evaluation prompts cost minutes on a big base."""
    import time

    import click

    def answers(e: Expert, which: str, questions: list[str]) -> list[str]:
        replies = []
        for number, question in enumerate(questions, 1):
            started = time.perf_counter()
            replies.append(generate(model, tokenizer, prompt_for(registry, e, question), max_new_tokens))
            click.echo(f"  {e.name}: {which} answer {number}/{len(questions)} ({time.perf_counter() - started:.1f} s)", err=True)
        return replies

    results = {}
    batches = {e.name: heldout_batch(tokenizer, registry, e, seq_len) for e in experts}
    prompts = {e.name: registry.eval_prompts_by_plugin(e) for e in experts}
    click.echo(f"evaluating {', '.join(f'{e.name} ({len(prompts[e.name])} prompts)' for e in experts)}: held-out loss, then "
               "base and adapter answers", err=True)
    with model.disable_adapter():
        base_losses = {e.name: heldout_loss(model, batches[e.name]) for e in experts}
        base_answers = {e.name: answers(e, "base", [q for q, _ in prompts[e.name]]) for e in experts}
    matrix = {}
    for adapter in experts:
        model.set_adapter(adapter.name)
        matrix[adapter.name] = {e.name: heldout_loss(model, batches[e.name]) for e in experts}
        questions = [q for q, _ in prompts[adapter.name]]
        tuned_answers = answers(adapter, "adapter", questions)
        base, tuned = base_losses[adapter.name], matrix[adapter.name][adapter.name]
        results[adapter.name] = {
            "heldout_loss": {"base": base, "adapter": tuned},
            "heldout_perplexity": {"base": math.exp(base), "adapter": math.exp(tuned)},
            "improved": tuned < base,
            "samples": [{"prompt": q, "plugin": plugin, "base": b, "adapter": a}
                        for (q, plugin), b, a in zip(prompts[adapter.name], base_answers[adapter.name], tuned_answers)],
            "cross_cutting_plugins": registry.cross_cutting(adapter),
        }
    if len(experts) > 1:
        for name in results:
            results[name]["heldout_matrix"] = matrix  # rows: adapter; columns: held-out set
    return results
