"""The grouped NF4 experts path: same maths as the per-expert reference, two dequantisations per step."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.checkpoint import checkpoint

from mtg_core.base_models import TINY, TINY_CONFIG, choose_base, load_base
from mtg_core.moe import LinearExperts, _groupable


@pytest.fixture(scope="module")
def lora_model():
    base = load_base(choose_base(TINY), "nf4", log=lambda _: None)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"])
    return get_peft_model(base.model, config)


def set_grouped(model, grouped: bool):
    for module in model.modules():
        if isinstance(module, LinearExperts):
            module.grouped = grouped


def loss_and_grads(model, ids, grouped):
    set_grouped(model, grouped)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    return out.logits.detach(), grads


def test_grouped_path_matches_the_per_expert_reference(lora_model):
    experts = [m for m in lora_model.modules() if isinstance(m, LinearExperts)]
    assert len(experts) == 2 and all(_groupable(l) for m in experts for e in m for l in (e.w1, e.w2, e.w3))
    ids = torch.randint(3, 2000, (2, 48), generator=torch.Generator().manual_seed(1))
    logits_ref, grads_ref = loss_and_grads(lora_model, ids, grouped=False)
    logits, grads = loss_and_grads(lora_model, ids, grouped=True)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 8 * 3 * 2  # layers x experts x (w1,w2,w3) x (A,B)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-3)


def test_each_expert_weight_is_dequantised_twice_per_checkpointed_step(lora_model, monkeypatch):
    hidden, inter = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]
    calls = []
    original = bnbf.dequantize_4bit

    def counting(A, quant_state=None, *args, **kwargs):
        if quant_state is not None and tuple(quant_state.shape) in {(inter, hidden), (hidden, inter)}:
            calls.append(tuple(quant_state.shape))
        return original(A, quant_state, *args, **kwargs)

    monkeypatch.setattr(bnbf, "dequantize_4bit", counting)
    set_grouped(lora_model, True)
    layer = lora_model.base_model.model.model.layers[0].mlp.experts
    x = torch.randn(40, hidden, requires_grad=True)
    index = torch.randint(0, 8, (40, 2))
    weights = torch.rand(40, 2).softmax(-1)
    out = checkpoint(layer, x, index, weights, use_reentrant=False)
    assert len(calls) == 8 * 3  # the forward
    out.square().sum().backward()
    assert len(calls) == 2 * 8 * 3  # the recompute; backward reuses its weights
    assert x.grad is not None and x.grad.abs().sum() > 0
