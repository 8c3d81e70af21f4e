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
from mtg_core.plan import GIB, AUTO_SHARE, chunked, dequantized_bytes, plan_memory, streamed_copies

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
