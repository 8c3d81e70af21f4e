"""Experts streamed from host memory: the same model as the resident one, copied in execution order through
two staging buffers, planned for 16/24/80 GiB budgets. On the CPU host and device are both the CPU and the
copies are still made, through the same code."""

import gc
import json
import mmap
from contextlib import contextmanager

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import tiny_mixtral_folder
from mtg_core.base_models import base_config, choose_base, load_base
from mtg_core.commands.eval import eval_command
from mtg_core.commands.train import train_command
from mtg_core.moe import grouped, streaming
from mtg_core.plan import GIB, expert_packed_bytes, pinned_bytes, plan_memory, streamed_copies

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """A tiny Mixtral with six layers, so that streaming has an order to get right."""
    folder = tiny_mixtral_folder(tmp_path_factory.mktemp("six-layers"), 6, max_shard_size="300KB")  # experts over many shards
    return choose_base(str(folder))


def with_lora(model, seed=3):
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(peft.named_parameters()):
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return peft


def step(model):
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130], [1, 11, 12, 13, 14, 15, 16, 17, 18, 19]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("streamed", [(0, 1, 2, 3, 4, 5), (2,), (1, 4)])
def test_a_streamed_model_gives_the_resident_logits_and_lora_gradients(six_layers, streamed):
    resident = with_lora(load_base(six_layers, "nf4", log=lambda _: None).model)
    moved = with_lora(load_base(six_layers, "nf4", log=lambda _: None, streamed_layers=streamed).model)
    logits, grads = step(resident)
    streamed_logits, streamed_grads = step(moved)
    assert torch.equal(logits, streamed_logits)
    assert grads.keys() == streamed_grads.keys() and len(grads) == 6 * (4 + 3 * 8) * 2
    assert all(torch.equal(grads[name], streamed_grads[name]) for name in grads)
    for layer in streamed:  # between uses a streamed weight holds nothing on the device
        assert all(p.numel() == 0 for n, p in moved.base_model.model.model.layers[layer].mlp.named_parameters() if "base_layer" in n)


def test_copies_follow_the_forward_up_and_the_recompute_down_through_two_buffers(six_layers):
    base = load_base(six_layers, "nf4", log=lambda _: None, streamed_layers=tuple(range(6)))
    model = with_lora(base.model)
    streamer = base.model.expert_streamer
    streamer.log = []
    buffers = {slot.buffer.data_ptr() for slot in streamer.slots}
    seen = set()
    original = type(streamer).loaded

    @contextmanager
    def watching(self, position, backward=False):  # which buffer each layer's weights point into while it runs
        with original(self, position, backward) as stage:
            @contextmanager
            def watched(group):
                with stage(group):
                    seen.add(self.layers[position].params[0][0].data.untyped_storage().data_ptr())
                    yield

            yield watched

    step(model)
    first = list(streamer.log)
    streamer.log.clear()
    type(streamer).loaded, saved = watching, type(streamer).loaded
    try:
        step(model)
    finally:
        type(streamer).loaded = saved
    assert len(streamer.slots) == 2 and seen <= buffers
    # first micro-batch: layer 0 on demand, then each next layer while the one before runs; the recompute
    # goes down and finds layers 5 and 4 still in the buffers
    assert first == [(0, "demand"), (1, "prefetch"), (2, "prefetch"), (3, "prefetch"), (4, "prefetch"), (5, "prefetch"),
                     (3, "prefetch"), (2, "prefetch"), (1, "prefetch"), (0, "prefetch")]
    # steady state: layers 0 and 1 are still there from the recompute; 2N - 4 copies, all ahead of need
    assert streamer.log[:4] == [(2, "prefetch"), (3, "prefetch"), (4, "prefetch"), (5, "prefetch")]
    assert len(streamer.log) == streamed_copies(6) == 8 and all(why == "prefetch" for _, why in streamer.log)


def test_inference_prefetches_round_the_layers(six_layers):
    base = load_base(six_layers, "nf4", log=lambda _: None, streamed_layers=(0, 2, 4))
    streamer = base.model.expert_streamer
    streamer.log = []
    with torch.no_grad():
        base.model(torch.tensor([[1, 2, 3]]))
        base.model(torch.tensor([[1, 2, 3]]))
    assert [why for _, why in streamer.log] == ["demand"] + ["prefetch"] * 6  # the last one for the next forward
    assert [layer for layer, _ in streamer.log] == [0, 2, 4, 0, 2, 4, 0]


def test_the_host_holds_exactly_what_the_plan_says(six_layers):
    streamed = (1, 3, 5)
    base = load_base(six_layers, "nf4", log=lambda _: None, streamed_layers=streamed)
    config = base_config(six_layers)
    plan = plan_memory(config, TARGETS, 16, "nf4", 2, 64, 4, "cpu", GIB, offload="all", grad_accum=2)
    host = sum(layer.host.numel() for layer in base.model.expert_streamer.layers)
    assert host == len(streamed) * expert_packed_bytes(config)
    assert plan.host_bytes == 6 * pinned_bytes(expert_packed_bytes(config))
    assert plan.transfer_bytes_per_step == 2 * streamed_copies(6) * expert_packed_bytes(config)
    assert base.quantization.quantized_weights == base.quantization.total_weights == 6 * (4 + 24)


class FakeCudart:
    """torch.cuda.cudart() on a machine without CUDA: records what would be pinned."""

    def __init__(self):
        self.pinned = {}

    def cudaHostRegister(self, pointer, size, flags):
        assert pointer % mmap.PAGESIZE == 0 and pointer not in self.pinned
        self.pinned[pointer] = size
        return 0

    def cudaHostUnregister(self, pointer):
        del self.pinned[pointer]
        return 0


def test_what_is_pinned_is_what_the_plan_counts_not_a_power_of_two(six_layers, monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    base = load_base(six_layers, "nf4", log=lambda _: None)
    config = base_config(six_layers)
    plan = plan_memory(config, TARGETS, 16, "nf4", 2, 64, 4, "cpu", GIB, offload="all")
    hosts = []
    for index in range(6):
        experts = base.model.model.layers[index].mlp.experts
        host, entries = streaming.host_copy(streaming.packing_order(experts), pin=True)
        assert torch.equal(host[entries[1][1]:][: entries[1][0].numel()], entries[1][0].data.reshape(-1))
        hosts.append(host)
    assert sum(cudart.pinned.values()) == plan.host_bytes == 6 * pinned_bytes(expert_packed_bytes(config))
    del hosts, host
    gc.collect()
    assert cudart.pinned == {}  # unregistered with their tensors
    layer = expert_packed_bytes(base_config(choose_base("mixtral-8x7b")))
    assert layer == 672 * 1024**2 and pinned_bytes(layer) == layer  # torch.empty(pin_memory=True) would pin 1 GiB
    assert mixtral_plan(16, "all").host_bytes == 32 * layer  # 21 GiB, not 32


@pytest.mark.parametrize("staging", ["layer", "group"])
def test_a_staging_buffer_is_released_right_after_its_last_dequantisation(six_layers, monkeypatch, staging):
    """A buffer's last reader is a dequantisation: `free` is recorded before the GEMMs that follow it (by layer: w2's;
    by group: w1|w3's frees its buffer, then w2's)."""
    events = []
    stacked, gemm, release = grouped.stacked_frozen_weights, grouped.grouped_mm, streaming.ExpertStreamer._release
    monkeypatch.setattr(grouped, "stacked_frozen_weights", lambda groups, dtype: events.append(f"dequantise {len(groups[0])}") or stacked(groups, dtype))
    monkeypatch.setattr(grouped, "grouped_mm", lambda *args: events.append("gemm") or gemm(*args))
    monkeypatch.setattr(streaming.ExpertStreamer, "_release", lambda self, slot: events.append("release") or release(self, slot))
    base = load_base(six_layers, "nf4", log=lambda _: None, streamed_layers=(2,))
    streaming.set_expert_chunk(base.model, None, staging)
    model = with_lora(base.model)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    released = [i for i, event in enumerate(events) if event == "release"]  # layer 2, the one streamed layer
    expected = [["dequantise 1", "release", "gemm"]] if staging == "layer" else [["dequantise 2", "release", "gemm"], ["dequantise 1", "release", "gemm"]]
    assert [events[i - 1 : i + 2] for i in released] == expected


def mixtral_plan(budget_gib, offload, host_gib=128, batch=4):
    config = base_config(choose_base("mixtral-8x7b"))
    return plan_memory(config, TARGETS, 16, "nf4", batch, 512, 2, "cuda", int(budget_gib * GIB), offload=offload,
                       grad_accum=4, host_free_bytes=int(host_gib * GIB))


def test_the_plan_for_80_24_and_16_gib_cards():
    big, mid, small, everything = mixtral_plan(80, "auto"), mixtral_plan(24, "auto"), mixtral_plan(16, "auto"), mixtral_plan(16, "all")
    assert big.offloaded_layers == 0 and big.fits and big.host_bytes == big.transfer_bytes_per_step == 0
    assert 0 < mid.offloaded_layers < small.offloaded_layers <= 32 and mid.fits and small.fits
    assert mid.total_bytes <= 0.9 * 24 * GIB and small.total_bytes <= 0.9 * 16 * GIB
    assert everything.offloaded_layers == 32 and everything.total_bytes < 14 * GIB
    assert mid.streamed_layers == tuple(sorted(set(mid.streamed_layers)))  # evenly spread, each once
    layer = expert_packed_bytes(base_config(choose_base("mixtral-8x7b")))
    assert 0.65 < layer / GIB < 0.66 and mid.host_bytes == mid.offloaded_layers * layer and mid.staging_bytes == 2 * layer
    assert not mixtral_plan(16, "none").fits
    assert not mixtral_plan(16, "all", host_gib=8).fits  # pinned host memory is checked too


def test_plan_cli_names_offload_when_a_budget_is_too_small(tmp_path):
    result = CliRunner().invoke(train_command, ["--expert", "explain", "--base-model", "mixtral-8x7b", "--plan", "--json",
                                                "--gpu-memory", "16", "--offload-experts", "none", "--batch-size", "1", "--seq-len", "256"])
    plan = json.loads(result.output)
    assert result.exit_code == 1 and not plan["fits"] and plan["advice"].startswith("--offload-experts auto")
    result = CliRunner().invoke(train_command, ["--expert", "explain", "--base-model", "mixtral-8x7b", "--plan", "--json",
                                                "--gpu-memory", "40", "--offload-experts", "all", "--batch-size", "1", "--seq-len", "256"])
    plan = json.loads(result.output)
    assert {"offloaded_layers", "host_bytes", "transfer_bytes_per_step", "streamed_layers"} <= set(plan)
    assert plan["offloaded_layers"] == 32 and plan["host_bytes"] > 20 * GIB


def test_training_with_every_expert_streamed_writes_the_same_adapter(tmp_path):
    args = ["--expert", "explain", "--max-samples", "8", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "128", "--max-steps", "3"]
    for offload in ("none", "all"):
        result = CliRunner().invoke(train_command, [*args, "--offload-experts", offload, "--output-dir", str(tmp_path / offload)])
        assert result.exit_code == 0, result.output
    resident, streamed = (load_file(tmp_path / o / "explain" / "adapter_model.safetensors") for o in ("none", "all"))
    assert resident.keys() == streamed.keys()
    assert all(torch.equal(resident[k], streamed[k]) for k in resident)
    meta = json.loads((tmp_path / "all" / "explain" / "training_meta.json").read_text())
    assert meta["memory_plan"]["offloaded_layers"] == 2 and meta["streaming"]["copies"] > 0
    layer = expert_packed_bytes(base_config(choose_base("tiny-mixtral")))  # staged by layer: every copy is a whole layer
    assert meta["streaming"]["copied_bytes"] == meta["streaming"]["copies"] * layer
    assert "2 layers' experts in host memory" in (tmp_path / "all" / "training_log.txt").read_text()
    losses = {}
    for offload in ("none", "all"):
        result = CliRunner().invoke(eval_command, ["--expert", "explain", "--adapters", str(tmp_path / "none"), "--no-fail",
                                                   "--max-new-tokens", "4", "--offload-experts", offload])
        assert result.exit_code == 0, result.output
        losses[offload] = json.loads((tmp_path / "none" / "explain" / "eval.json").read_text())["heldout_loss"]
    assert losses["none"] == losses["all"]


@pytest.mark.parametrize("chunk", [None, 3])
def test_staged_by_group_the_copies_and_buffers_are_what_the_plan_counts(six_layers, chunk):
    """By group: w1|w3 and w2 of each layer copied one after the other, each into the buffer the previous group freed;
    the turns find their two end groups still there; copies, bytes and buffers as the plan counts them."""
    from mtg_core.plan import streaming as plan_streaming

    base = load_base(six_layers, "nf4", log=lambda _: None, streamed_layers=tuple(range(6)))
    streaming.set_expert_chunk(base.model, chunk, "group")
    model = with_lora(base.model)
    streamer = base.model.expert_streamer
    streamer.log = []
    step(model)
    first = list(streamer.log)
    streamer.log.clear()
    copied = streamer.copied_bytes
    step(model)
    up = [(layer, group, "prefetch") for layer in range(6) for group in ("w1|w3", "w2")]
    down = [(layer, group, "prefetch") for layer in range(4, -1, -1) for group in ("w1|w3", "w2")]
    assert first == [(0, "w1|w3", "demand"), *up[1:], *down]
    assert streamer.log == [*up[2:], *down]  # the steady state: every copy ahead of need
    config = base_config(six_layers)
    plan = plan_streaming(plan_memory(config, TARGETS, 4, "nf4", 2, 10, 4, "cpu", GIB, offload="all", grad_accum=3),
                          config, 6, 3, "group")
    assert len(streamer.log) == streamed_copies(6, staging="group") == 20
    assert 3 * (streamer.copied_bytes - copied) == plan.transfer_bytes_per_step == 3 * 10 * expert_packed_bytes(config)
    assert sum(slot.buffer.numel() for slot in streamer.slots) == plan.staging_bytes == 2 * (2 * expert_packed_bytes(config) // 3)
