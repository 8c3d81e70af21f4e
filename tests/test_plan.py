"""The memory plan: computed offline from the config, consistent with what a real tiny load allocates."""

import json
import subprocess

import pytest
import torch
from click.testing import CliRunner
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import MTG_TRAIN, cli_env
from mtg_core.base_models import TINY, base_config, choose_base, load_base
from mtg_core.commands.train import train_command
from mtg_core.plan import CUDA_CONTEXT_BYTES, GIB, expert_packed_bytes, logit_bytes, plan_memory
from mtg_core.plugins import Registry

KEYS = {"weights_bytes", "lora_params", "optimizer_bytes", "activation_bytes", "total_bytes", "device_free_bytes", "fits"}


def tiny_plan(batch=4, seq=512, rank=16, quant="nf4"):
    lora = Registry.discover().lora_settings(Registry.discover().expert("explain"))
    return plan_memory(base_config(choose_base(TINY)), lora.target_modules, rank, quant, batch, seq, 4, "cpu", 10 * GIB)


def stored_bytes(model) -> int:
    total = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            total += param.numel() * param.element_size()
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors = [state.absmax, state.code, state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def test_planned_weights_and_lora_match_a_real_load():
    from peft import LoraConfig, get_peft_model

    plan = tiny_plan()
    base = load_base(choose_base(TINY), "nf4", log=lambda _: None)
    measured = stored_bytes(base.model)
    assert abs(plan.weights_bytes - measured) / measured < 0.01, (plan.weights_bytes, measured)
    lora = Registry.discover().lora_settings(Registry.discover().expert("explain"))
    peft_model = get_peft_model(base.model, LoraConfig(r=16, lora_alpha=32, target_modules=list(lora.target_modules)))
    assert plan.lora_params == peft_model.get_nb_trainable_parameters()[0]
    assert plan.lora_bytes == plan.gradient_bytes == 4 * plan.lora_params


def test_activations_grow_with_tokens_and_nf4_shrinks_weights():
    small, long, wide = tiny_plan(seq=256), tiny_plan(seq=512), tiny_plan(batch=8, seq=256)
    assert long.activation_bytes > 1.9 * small.activation_bytes - 3 * 256 * 128 * 4
    assert long.logits_bytes == 2 * small.logits_bytes == wide.logits_bytes
    assert tiny_plan(quant="none").weights_bytes > 4 * tiny_plan().weights_4bit_bytes


def test_mixtral_preset_plan_works_offline_with_the_real_sizes():
    config = base_config(choose_base("mixtral-8x7b"))
    plan = plan_memory(config, ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"), 16, "nf4", 1, 2048, 2, "cuda", 80 * GIB)
    assert 22.0 < plan.weights_4bit_bytes / GIB < 23.0  # 46.4B 4-bit-able weights, NF4 with double-quantised constants
    assert plan.lora_params == 32 * (4 * 16 * (4096 + 4096) - 2 * 16 * (4096 - 1024) + 8 * 3 * 16 * (4096 + 14336))
    assert plan.fits and plan.overhead_bytes > 0


def test_plan_json_needs_no_weights_and_refuses_what_does_not_fit(tmp_path):
    env = cli_env(MTG_CACHE_DIR=str(tmp_path / "cache"))
    ok = subprocess.run([*MTG_TRAIN, "--expert", "explain", "--plan", "--json"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    assert KEYS <= set(plan) and plan["fits"] and plan["total_bytes"] < plan["device_free_bytes"]
    assert not (tmp_path / "cache").exists()  # the tiny model was not even built
    too_big = subprocess.run([*MTG_TRAIN, "--expert", "explain", "--plan", "--batch-size", "1024", "--seq-len", "32768"],
                             env=env, capture_output=True, text=True)
    assert too_big.returncode == 1 and "does NOT fit" in too_big.stdout
    assert "to fit: --batch-size" in too_big.stdout


def test_training_records_the_plan_next_to_the_measured_peak(tmp_path, monkeypatch):
    import bitsandbytes.optim.optimizer as bnb_optimizer

    import mtg_core.train.trainer

    syncs, built = [], []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: syncs.append(t))
    monkeypatch.setattr(mtg_core.train.trainer, "one_sync_per_step", lambda cls: built.append(mtg_core.optim.one_sync_per_step(cls)) or built[-1])
    result = CliRunner().invoke(train_command, ["--expert", "teach", "--max-steps", "1", "--max-samples", "4", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert built[0].__name__ == "AdamWOneSync" and len(syncs) == 1  # the optimizer mtg-train ran: one host sync for its one step
    meta = json.loads((tmp_path / "teach" / "training_meta.json").read_text())
    assert KEYS <= set(meta["memory_plan"]) and meta["memory_plan"]["lora_params"] > 0
    assert "memory plan" in (tmp_path / "training_log.txt").read_text()


class LiveLogitBytes(TorchDispatchMode):
    """The most bytes that tensors of the logits' size held at once (their storages, alive or saved for backward)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.live, self.peak = numel, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {key: (ref, size) for key, (ref, size) in self.live.items() if not ref.expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_planned_bytes_per_logit_are_what_the_loss_and_its_backward_hold(mixed_precision):
    """transformers' loss and accelerate's bf16 forward (autocast + convert_outputs_to_fp32, as Trainer(bf16=True)
    wraps it) on a one-layer Mixtral; widths chosen so that no other tensor has the logits' size."""
    from accelerate.utils import convert_outputs_to_fp32
    from transformers import MixtralForCausalLM

    from mtg_core.moe.synthetic import mixtral_config

    config = mixtral_config(1, small=True)
    config.vocab_size = 1000
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)) if mixed_precision else model.forward
    ids = torch.randint(0, config.vocab_size, (2, 48))
    with LiveLogitBytes(ids.numel() * config.vocab_size) as live:
        forward(input_ids=ids, labels=ids).loss.backward()
    assert live.peak == ids.numel() * config.vocab_size * logit_bytes(2 if mixed_precision else 4) == ids.numel() * config.vocab_size * 12


MIXTRAL_RENT = ["--expert", "explain", "--base-model", "mixtral-8x7b", "--plan", "--json", "--batch-size", "1", "--seq-len", "512"]


def test_without_a_gpu_gpu_memory_plans_the_cuda_card_to_rent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this test's machine has no GPU, whatever runs it
    result = CliRunner().invoke(train_command, [*MIXTRAL_RENT, "--gpu-memory", "8", "--host-memory", "64"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["device"] == "cuda" and plan["overhead_bytes"] == CUDA_CONTEXT_BYTES
    assert plan["device_free_bytes"] == 8 * GIB and plan["host_free_bytes"] == 64 * GIB
    config = base_config(choose_base("mixtral-8x7b"))
    assert plan["logits_bytes"] == 512 * config.vocab_size * logit_bytes(2)  # bf16, not the CPU's fp32
    assert plan["fits"] and plan["offloaded_layers"] == 32 and plan["expert_chunk"] == 2  # the seed's 8 GB card
    small_host = CliRunner().invoke(train_command, [*MIXTRAL_RENT, "--gpu-memory", "8", "--host-memory", "16"])
    assert small_host.exit_code == 1 and not json.loads(small_host.output)["fits"]  # 21 GiB of experts to pin
    text = CliRunner().invoke(train_command, [a for a in MIXTRAL_RENT if a != "--json"] + ["--gpu-memory", "12", "--host-memory", "64"])
    assert "no GPU here: planned for a CUDA GPU of 12 GiB in bf16, host RAM from --host-memory" in text.output


def test_host_memory_caps_what_a_run_on_this_machine_may_pin():
    import psutil

    from mtg_core.run import TrainOptions, memory_plan

    lora = Registry.discover().lora_settings(Registry.discover().expert("explain"))
    plan, _ = memory_plan(choose_base(TINY), lora, TrainOptions(host_memory=0.5))
    assert plan.host_free_bytes == min(GIB // 2, psutil.virtual_memory().available)
    bad = subprocess.run([*MTG_TRAIN, "--expert", "explain", "--plan", "--host-memory", "nan"], env=cli_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "--host-memory" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_inference_plans_without_gradients_optimizer_or_checkpoints():
    config = base_config(choose_base("mixtral-8x7b"))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
    for budget in (12, 16, 24, 32):
        train, infer = (plan_memory(config, targets, 16, "nf4", 1, 512, 2, "cuda", budget * GIB, offload="auto", training=training)
                        for training in (True, False))
        assert infer.offloaded_layers <= train.offloaded_layers
        assert infer.gradient_bytes == infer.optimizer_bytes == 0 < train.gradient_bytes
        assert infer.lora_bytes == train.lora_bytes and infer.activation_bytes < train.activation_bytes
        assert infer.dequantized_bytes * 3 == train.dequantized_bytes * 2  # one group at a time, none kept for backward
    assert plan_memory(config, targets, 16, "nf4", 1, 512, 2, "cuda", 24 * GIB, offload="auto", training=False).offloaded_layers \
        < plan_memory(config, targets, 16, "nf4", 1, 512, 2, "cuda", 24 * GIB, offload="auto").offloaded_layers
    streamed = plan_memory(config, targets, 16, "nf4", 1, 512, 2, "cuda", 16 * GIB, offload="all", training=False)
    assert streamed.transfer_bytes_per_step == 32 * expert_packed_bytes(config)  # every layer once per forward pass


def test_eval_and_ask_plan_inference(monkeypatch):
    import mtg_core.run as run

    seen = []
    monkeypatch.setattr(run, "memory_plans", lambda choice, experts, loras, options, inference=False: seen.append((options, inference)) or [])
    registry = Registry.discover()
    run.inference_run(registry, [registry.expert("explain")], choose_base(TINY), "nf4", "auto", 8.0, 32.0, 256)
    options, inference = seen[0]
    assert inference and options.batch_size == 1 and options.seq_len == 256
    assert options.gpu_memory == 8.0 and options.host_memory == 32.0


def test_eval_plans_its_held_out_batch(monkeypatch, tmp_path):
    import mtg_core.evaluate
    import mtg_core.run as run
    from mtg_core.commands.eval import eval_command
    from mtg_core.evaluate import heldout_data

    class Planned(Exception):
        pass

    def plans(*args, **kwargs):
        raise Planned(args)

    monkeypatch.setattr(run, "base_for", lambda adapters, experts, base_model: choose_base(TINY))
    monkeypatch.setattr(mtg_core.evaluate, "check_adapter", lambda *args: None)
    monkeypatch.setattr(run, "inference_run", plans)
    result = CliRunner().invoke(eval_command, ["--expert", "explain", "--adapters", str(tmp_path), "--seq-len", "256",
                                                   "--gpu-memory", "8", "--host-memory", "32"])
    assert isinstance(result.exception, Planned), result.output
    registry = Registry.discover()
    from mtg_core.base_models import load_tokenizer

    rows = len(heldout_data(load_tokenizer(choose_base(TINY)), registry, registry.expert("explain"), 256).rows)
    assert result.exception.args[0][-4:] == (8.0, 32.0, 256, rows) and rows > 1
