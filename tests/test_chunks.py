"""Experts dequantised a chunk at a time: the whole-layer results, at most one chunk's dequantised weights
alive (as the plan counts them), re-read from the staging buffers in backward without extra copies."""

import weakref

import pytest
import torch
from peft import get_peft_model_state_dict

from conftest import tiny_mixtral_folder
from mtg_core.base_models import TINY_CONFIG, base_config, choose_base, load_base
from mtg_core.moe import grouped
from mtg_core.moe.streaming import set_expert_chunk
from mtg_core.moe.synthetic import mixtral_config
from mtg_core.plan import GIB, AUTO_SHARE, chunked, dequantized_bytes, expert_packed_bytes, plan_memory, streamed_copies

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return choose_base(str(tiny_mixtral_folder(tmp_path_factory.mktemp("four-layers"), 4)))


def with_lora(model, dropout: float):
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(3)
    for name, param in sorted(peft.named_parameters()):
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return peft


IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130], [1, 11, 12, 13, 14, 15, 16, 17, 18, 19]])


def train_step(model):
    """One forward + backward and one AdamW step; the logits, LoRA gradients and the adapter after the step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(11)  # the same dropout masks in both models
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return out.logits.detach(), grads, get_peft_model_state_dict(model)


@pytest.mark.parametrize("streamed", [(), (1, 2)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_chunked_experts_give_the_whole_layer_logits_gradients_and_adapter(four_layers, streamed, dropout):
    whole = train_step(with_lora(load_base(four_layers, "nf4", log=lambda _: None).model, dropout))
    for chunk in (1, 3, 5):
        base = load_base(four_layers, "nf4", log=lambda _: None, streamed_layers=streamed)
        set_expert_chunk(base.model, chunk)
        logits, grads, adapter = train_step(with_lora(base.model, dropout))
        # bit-identical: each chunk runs the same per-expert GEMMs on the same dequantised values
        assert torch.equal(logits, whole[0]), chunk
        assert grads.keys() == whole[1].keys() and all(torch.equal(grads[n], whole[1][n]) for n in grads), chunk
        assert adapter.keys() == whole[2].keys() and all(torch.equal(adapter[n], whole[2][n]) for n in adapter), chunk


class LiveDequantised:
    """The most bytes of dequantised expert weights (grouped.stacked_frozen_weights' results) alive at once."""

    def __init__(self, monkeypatch):
        self.live, self.peak = {}, 0
        original = grouped.stacked_frozen_weights

        def counted(groups, dtype):
            weight = original(groups, dtype)
            key = id(weight)
            self.live[key] = weight.untyped_storage().nbytes()
            weakref.finalize(weight, self.live.pop, key, None)
            self.peak = max(self.peak, sum(self.live.values()))
            return weight

        monkeypatch.setattr(grouped, "stacked_frozen_weights", counted)


@pytest.mark.parametrize("chunk", [None, 4, 2, 1])
@pytest.mark.parametrize("streamed", [(), (0, 1, 2, 3)])
def test_dequantised_bytes_alive_at_once_are_what_the_plan_counts(four_layers, monkeypatch, chunk, streamed):
    base = load_base(four_layers, "nf4", log=lambda _: None, streamed_layers=streamed)
    set_expert_chunk(base.model, chunk)
    model = with_lora(base.model, 0.0)
    live = LiveDequantised(monkeypatch)
    model(input_ids=IDS, labels=IDS).loss.backward()
    planned = dequantized_bytes(base_config(four_layers), 4, chunk, training=True)
    assert live.peak == planned, (live.peak, planned)  # 20 routed pairs reach every chunk of every layer here
    if chunk is not None:
        assert live.peak * TINY_CONFIG["num_local_experts"] * 3 == dequantized_bytes(base_config(four_layers), 4, None, True) * chunk * 2


def test_backward_reloads_streamed_layers_without_extra_copies(four_layers):
    base = load_base(four_layers, "nf4", log=lambda _: None, streamed_layers=(0, 1, 2, 3))
    set_expert_chunk(base.model, 3)
    model = with_lora(base.model, 0.0)
    streamer = base.model.expert_streamer
    train_step(model)
    streamer.log = []
    train_step(model)
    # the checkpoint recompute of each layer leaves it in its buffer for that layer's backward
    assert len(streamer.log) == streamed_copies(4) and all(why == "prefetch" for _, why in streamer.log)


def test_the_plan_picks_the_largest_chunk_that_fits():
    config = mixtral_config(32, small=False)
    whole = plan_memory(config, TARGETS, 16, "nf4", 1, 512, 2, "cuda", 80 * GIB, offload="all")
    assert whole.expert_chunk is None
    for budget in (7.0, 7.5, 8.0, 9.0):
        plan = plan_memory(config, TARGETS, 16, "nf4", 1, 512, 2, "cuda", int(budget * GIB), offload="auto")
        target = AUTO_SHARE * budget * GIB
        if plan.expert_chunk is not None:
            assert plan.offloaded_layers == 32
            assert plan.expert_chunk == 1 or plan.total_bytes <= target
            if plan.expert_chunk < 7:
                assert chunked(plan, config, plan.expert_chunk + 1, 2).total_bytes > target
    eight = plan_memory(config, TARGETS, 16, "nf4", 1, 512, 2, "cuda", 8 * GIB, offload="auto")
    assert eight.fits and eight.expert_chunk is not None
    assert eight.dequantized_bytes == eight.expert_chunk * 2 * 4096 * 14336 * 2


def test_mtg_train_dequantises_in_the_plans_chunk_and_writes_the_same_adapter(tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from mtg_core.commands.train import train_command

    args = ["--expert", "explain", "--max-samples", "8", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "128", "--max-steps", "2",
            "--offload-experts", "all"]
    # 0.0228 GiB: the tiny model's plan with every layer streamed fits with 5 experts at a time, not with 6
    for name, budget in (("whole", []), ("chunked", ["--gpu-memory", "0.0228"])):
        result = CliRunner().invoke(train_command, [*args, *budget, "--output-dir", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    whole, chunks = (load_file(tmp_path / name / "explain" / "adapter_model.safetensors") for name in ("whole", "chunked"))
    assert whole.keys() == chunks.keys() and all(torch.equal(whole[k], chunks[k]) for k in whole)
    meta = json.loads((tmp_path / "chunked" / "explain" / "training_meta.json").read_text())
    assert meta["memory_plan"]["expert_chunk"] == 5 and meta["memory_plan"]["fits"]
    assert "experts dequantised 5 of 8 at a time" in (tmp_path / "chunked" / "training_log.txt").read_text()


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_staging_by_matrix_group_gives_the_whole_layer_staging_results(four_layers, chunk, dropout):
    """Two micro-batches (the second in the steady state of the prefetches) staged by group, bit-identical to staging
    by layer: the same packed bytes reach the same dequantisations, only through smaller buffers."""
    results = {}
    for staging in ("layer", "group"):
        base = load_base(four_layers, "nf4", log=lambda _: None, streamed_layers=(0, 1, 2, 3))
        set_expert_chunk(base.model, chunk, staging)
        streamer = base.model.expert_streamer
        model = with_lora(base.model, dropout)
        results[staging] = [train_step(model), train_step(model)]
        sizes = [slot.buffer.numel() for slot in streamer.slots]
        assert streamer.staging == staging and len(sizes) == 2
        layer = streamer.layers[0].host.numel()
        assert sizes == [layer, layer] if staging == "layer" else sizes == [2 * layer // 3] * 2  # w1|w3, the larger group
    for (logits, grads, adapter), (group_logits, group_grads, group_adapter) in zip(results["layer"], results["group"]):
        assert torch.equal(logits, group_logits)
        assert grads.keys() == group_grads.keys() and all(torch.equal(grads[n], group_grads[n]) for n in grads)
        assert adapter.keys() == group_adapter.keys() and all(torch.equal(adapter[n], group_adapter[n]) for n in adapter)


def test_the_plan_stages_by_group_only_when_no_chunk_fits_with_whole_layer_buffers():
    from mtg_core.plan import describe, expert_packed_bytes

    config = mixtral_config(32, small=False)
    layer = expert_packed_bytes(config)

    def plan(budget):
        return plan_memory(config, TARGETS, 16, "nf4", 1, 512, 2, "cuda", int(budget * GIB), offload="auto", grad_accum=4)

    eight, smaller, smallest = plan(8.0), plan(7.5), plan(7.25)
    assert (eight.staging, eight.expert_chunk, eight.staging_bytes) == ("layer", 2, 2 * layer)  # 8 GiB as before
    assert chunked(eight, config, 1, 2).total_bytes > AUTO_SHARE * 7.5 * GIB  # 7.5 GiB: no chunk fits whole-layer buffers ...
    assert (smaller.staging, smaller.expert_chunk) == ("group", 2) and smaller.total_bytes <= AUTO_SHARE * 7.5 * GIB  # ... by group they do
    assert (smallest.staging, smallest.expert_chunk) == ("group", 1) and smallest.total_bytes <= AUTO_SHARE * 7.25 * GIB
    assert smaller.staging_bytes == 2 * (2 * layer // 3) == eight.staging_bytes - 0.4375 * GIB  # two w1|w3 groups: 0.875 GiB
    # per micro-batch 4N - 4 group copies, in pairs that add up to 2N - 2 layers (by layer: 2N - 4)
    assert streamed_copies(32, staging="group") == 124 and smaller.transfer_bytes_per_step == 4 * 62 * layer
    assert eight.transfer_bytes_per_step == 4 * 60 * layer
    assert any("staging buffers for streamed experts (2 groups)" in line for line in describe(smaller))


def test_mtg_train_stages_by_group_when_the_plan_needs_it_and_writes_the_same_adapter(tmp_path):
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file

    from mtg_core.base_models import TINY
    from mtg_core.commands.train import train_command
    from mtg_core.plugins import Registry
    from mtg_core.run import TrainOptions, memory_plan

    registry = Registry.discover()
    options = TrainOptions(batch_size=2, grad_accum=2, seq_len=128, offload_experts="all")
    plan, _ = memory_plan(choose_base(TINY), registry.lora_settings(registry.expert("explain")), options)
    budget = (chunked(plan, base_config(choose_base(TINY)), 1, 4).total_bytes - 1024) / GIB  # not even 1 expert at a time fits by layer
    args = ["--expert", "explain", "--max-samples", "8", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "128", "--max-steps", "2",
            "--offload-experts", "all"]
    for name, extra in (("whole", []), ("grouped", ["--gpu-memory", f"{budget:.12f}"])):
        result = CliRunner().invoke(train_command, [*args, *extra, "--output-dir", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    whole, grouped_ = (load_file(tmp_path / name / "explain" / "adapter_model.safetensors") for name in ("whole", "grouped"))
    assert whole.keys() == grouped_.keys() and all(torch.equal(whole[k], grouped_[k]) for k in whole)
    meta = json.loads((tmp_path / "grouped" / "explain" / "training_meta.json").read_text())
    assert meta["memory_plan"]["staging"] == "group" and meta["memory_plan"]["fits"] and meta["memory_plan"]["expert_chunk"] is not None
    assert "streamed experts staged by matrix group" in (tmp_path / "grouped" / "training_log.txt").read_text()
    third = expert_packed_bytes(base_config(choose_base(TINY))) // 3  # w2 of every expert; w1|w3 is two of these
    copied, copies = meta["streaming"]["copied_bytes"], meta["streaming"]["copies"]
    assert copied % third == 0 and third * copies < copied < 2 * third * copies  # groups, both kinds, counted as copied
