"""Verify adapters (the seed's "example inferences"): held-out loss and greedy answers, base vs adapter.

Every adapter is loaded onto one base with peft's multi-adapter support; switching expert is
`set_adapter`, and `disable_adapter()` gives the bare base, so the base loads once for everything.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from mtg_core.data import TokenizedData, check_trainable, read_jsonl, tokenize
from mtg_core.errors import MtgError
from mtg_core.plugins import Expert, Registry


LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
ATTENTION = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)")
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3)")
MIXTRAL_TYPES = ("mixtral", "mtg_mixtral")


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
    return choose_base(name, reason=f"the base {meta} names", given_as=f"{meta}: base_model {name}")


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
    from mtg_core.base_models import base_config

    base = base_config(choice)
    if base.model_type in MIXTRAL_TYPES:  # the layout whose shapes are known without the weights
        check_lora_fits(folder, config, lora_modules(folder), base, choice.name, others_allowed=True)
    return folder


def lora_modules(folder: Path) -> dict:
    """The adapter's LoRA matrices: peft module name -> (lora_A [r, in], lora_B [out, r])."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"{path} is missing; retrain the adapter")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path}: not a readable safetensors file ({exc}); retrain the adapter") from None
    if not tensors:
        raise AdapterError(f"{path} holds no LoRA weights; retrain the adapter")
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key)
        if not match:
            raise AdapterError(f"{path}: tensor {key} is not a LoRA A/B weight; only plain LoRA adapters are read")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise AdapterError(f"{path}: {module} has lora_{''.join(pair)} but not its partner; retrain the adapter")
    return {module: (pair["A"], pair["B"]) for module, pair in sorted(pairs.items())}


def check_lora_fits(folder: Path, config: dict, modules: dict, base, base_name: str, others_allowed: bool = False) -> None:
    """Every LoRA matrix of a Mixtral attention projection or expert matrix fits `base` (its transformers config) at the
    adapter's rank, and adapter_config.json's target_modules selects it (peft would otherwise drop it, or find nothing).
    Other modules (a plugin may adapt the router) are refused unless `others_allowed`; peft checks those as it loads."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    r = config["r"]
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    q, kv, hidden, ffn = base.num_attention_heads * head_dim, base.num_key_value_heads * head_dim, base.hidden_size, base.intermediate_size
    shapes = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
              "w1": (ffn, hidden), "w3": (ffn, hidden), "w2": (hidden, ffn)}
    where = folder / "adapter_model.safetensors"
    selects = LoraConfig(target_modules=config["target_modules"], layers_to_transform=config.get("layers_to_transform"),
                         layers_pattern=config.get("layers_pattern"))
    for module, (a, b) in modules.items():
        match = ATTENTION.fullmatch(module) or EXPERT.fullmatch(module)
        if not match and others_allowed:
            continue
        if not match:
            raise AdapterError(f"{where}: {module} is neither a Mixtral attention projection nor an expert matrix")
        if int(match[1]) >= base.num_hidden_layers or (match.re is EXPERT and int(match[2]) >= base.num_local_experts):
            raise AdapterError(f"{where}: {module} does not exist in {base_name} ({base.num_hidden_layers} layers, "
                               f"{base.num_local_experts} experts); pass the --base-model it was trained on")
        out, inp = shapes[match.groups()[-1]]
        if tuple(a.shape) != (r, inp) or tuple(b.shape) != (out, r):
            raise AdapterError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; rank {r} on "
                               f"{base_name} needs ({r}, {inp}) and ({out}, {r}); pass the --base-model it was trained on")
        if not check_target_module_exists(selects, module):
            raise AdapterError(f"{folder / 'adapter_config.json'}: target_modules {config['target_modules']!r} does not select "
                               f"{module}, whose LoRA weights the adapter holds; retrain the adapter")


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


def heldout_data(tokenizer, registry: Registry, expert: Expert, seq_len: int) -> TokenizedData:
    """`expert`'s held-out set, formatted and masked exactly as in training, refused as training refuses data that
    `seq_len` leaves without answer tokens (its loss would be NaN). Cheap: run it before the base loads."""
    path = registry.data_files(expert).heldout
    heldout = read_jsonl(path)
    data = tokenize([registry.format_example(expert, r) for r in heldout.records], tokenizer, seq_len)
    check_trainable(data, seq_len, str(path), heldout.lines)
    return data


def heldout_batch(tokenizer, registry: Registry, expert: Expert, seq_len: int) -> dict:
    """`expert`'s held-out set as one padded batch."""
    from transformers import DataCollatorForSeq2Seq

    data = heldout_data(tokenizer, registry, expert, seq_len)
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


class EvalFailed(MtgError):
    exit_code = 1


def eval_adapters(name, all_experts: bool, base_model, adapters: Path, max_new_tokens: int, seq_len: int, quant: str, offload: str,
                  gpu_memory, host_memory, no_fail: bool) -> dict:
    """mtg-eval: everything checked before the base loads (adapters, held-out data, the inference plan), then `report_eval`."""
    import click

    from mtg_core.base_models import load_tokenizer
    from mtg_core.run import base_for, finish_installs, inference_run, select_experts

    registry = Registry.discover()
    experts = select_experts(registry, name, all_experts)
    finish_installs(adapters, [e.name for e in experts])
    choice = base_for(adapters, experts, base_model)
    for e in experts:
        check_adapter(adapters, e.name, choice)
    tokenizer = load_tokenizer(choice)
    heldout = max(len(heldout_data(tokenizer, registry, e, seq_len).rows) for e in experts)
    # the held-out loss runs each expert's held-out set as one batch (heldout_batch)
    run = inference_run(registry, experts, choice, quant, offload, gpu_memory, host_memory, seq_len, heldout, tokenizer=tokenizer)
    base = run.load_base(lambda line: click.echo(line, err=True))
    return report_eval(run, adapters, base, max_new_tokens, seq_len, no_fail)


def report_eval(run, adapters: Path, base, max_new_tokens: int, seq_len: int, no_fail: bool) -> dict:
    """Evaluate the run's experts' adapters on `base` (a LoadedBase), print the table, then write each eval.json."""
    import click

    from mtg_core.outputs import adapter_identity, write_eval

    registry = run.registry
    folders = {e.name: check_adapter(adapters, e.name, run.choice) for e in run.experts}
    identities = {name: adapter_identity(folder) for name, folder in folders.items()}  # before peft reads the files
    model = attach_adapters(base.model, folders)
    results = evaluate(model, base.tokenizer, registry, list(run.experts), max_new_tokens, seq_len)
    for name, result in results.items():
        result["skipped_plugins"] = registry.skipped_for(name)
    click.echo(f"{'EXPERT':<12} {'BASE LOSS':>10} {'ADAPTER LOSS':>13} {'BASE PPL':>10} {'ADAPTER PPL':>12}  RESULT")
    for name, r in results.items():
        click.echo(f"{name:<12} {r['heldout_loss']['base']:>10.4f} {r['heldout_loss']['adapter']:>13.4f} "
                   f"{r['heldout_perplexity']['base']:>10.2f} {r['heldout_perplexity']['adapter']:>12.2f}  "
                   f"{'better' if r['improved'] else 'NOT better'}")
    if len(results) > 1:
        names = list(results)
        click.echo("\nheld-out loss, adapter (row) on each expert's held-out set (column):")
        click.echo(" " * 12 + "".join(f"{n:>12}" for n in names))
        matrix = results[names[0]]["heldout_matrix"]
        for row in names:
            click.echo(f"{row:<12}" + "".join(f"{matrix[row][col]:>12.4f}" for col in names))
    for name, r in results.items():
        for sample in r["samples"]:
            click.echo(f"\n[{name}] {sample['prompt']}\n  base:    {sample['base'][:160]}\n  adapter: {sample['adapter'][:160]}")
    write_eval(adapters, identities, results)  # after printing: results that cannot be saved are still seen
    worse = [name for name, r in results.items() if not r["improved"]]
    if worse and not no_fail:
        raise EvalFailed(f"the adapter of {', '.join(worse)} does not lower its held-out loss (see eval.json; --no-fail to only report)")
    return results
