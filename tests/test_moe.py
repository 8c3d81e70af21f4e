"""The grouped experts path (frozen weights and peft's LoRA in grouped GEMMs) against the per-expert reference loop."""

import collections
import copy

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from transformers import BitsAndBytesConfig

from mtg_core.base_models import TINY_CONFIG, ensure_tiny_mixtral
from mtg_core.errors import ConfigError
from mtg_core.moe import LinearExperts, MtgMixtralForCausalLM, grouped_mm
from mtg_core.moe import dequantize, dropout, grouped

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
EXPERTS, HIDDEN, INTER = TINY_CONFIG["num_local_experts"], TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny(quant: str, dtype=torch.float32, device="cpu"):
    """The embedded tiny Mixtral in mtg_core's layout, NF4 (double quantisation) or not, on `device`."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype) if quant == "nf4" else None
    return MtgMixtralForCausalLM.from_pretrained(ensure_tiny_mixtral(), dtype=dtype, quantization_config=quantization,
                                                 device_map={"": device})


def with_lora(model, rank=4, dropout=0.0, targets=TARGETS):
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, init_lora_weights=False, target_modules=targets)
    return get_peft_model(model, config)


def expert_layers(model):
    return [m for m in model.modules() if isinstance(m, LinearExperts)]


def set_grouped(model, grouped_path: bool):
    for module in expert_layers(model):
        module.grouped = grouped_path


def loss_and_grads(model, ids, grouped_path):
    set_grouped(model, grouped_path)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    return out.logits.detach().float(), grads


def batch(device="cpu"):
    return torch.randint(3, 2000, (2, 48), generator=torch.Generator().manual_seed(1)).to(device)


def assert_grouped_path_taken(model):
    assert all(grouped.grouped_adapters(layer) == ["default"] for layer in expert_layers(model))


@pytest.mark.parametrize("quant, rank", [("nf4", 4), ("none", 4), ("none", 3)])  # rank 3: padded to 16-byte rows
def test_grouped_lora_matches_the_per_expert_reference_in_fp32(quant, rank):
    model = with_lora(tiny(quant), rank=rank)
    assert_grouped_path_taken(model)
    logits_ref, grads_ref = loss_and_grads(model, batch(), grouped_path=False)
    logits, grads = loss_and_grads(model, batch(), grouped_path=True)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * EXPERTS * 3 * 2  # layers x experts x (w1,w2,w3) x (A,B)
    assert all(g.abs().sum() > 0 for g in grads_ref.values())
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-3)


def layer_output_and_grads(layer, x, index, weights, grouped_path):
    layer.grouped = grouped_path
    layer.zero_grad()
    x = x.detach().requires_grad_()
    y = layer(x, index, weights)
    y.float().square().sum().backward()
    grads = {n: p.grad.float().clone() for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach().float(), x.grad.float(), grads


def bf16_errors(quant: str, device: str):
    """Relative errors (output, input gradient, worst LoRA gradient) of one bf16 layer's grouped path and of its
    per-expert reference, each against the same layer computed in fp32 (rank 4: padded to 8 in bf16)."""
    model = with_lora(tiny(quant, torch.bfloat16, device), rank=4)
    assert_grouped_path_taken(model)
    layer = expert_layers(model)[0]
    exact_layer = copy.deepcopy(layer).float()
    for module in exact_layer.modules():
        if hasattr(module, "compute_dtype"):  # bitsandbytes' Linear4bit: same 4-bit weights, fp32 matmul
            module.compute_dtype = torch.float32
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(64, HIDDEN, generator=generator).to(device)
    index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:2] for _ in range(64)]).to(device)
    weights = torch.rand(64, 2, generator=generator).softmax(-1).to(device)
    exact = layer_output_and_grads(exact_layer, x, index, weights, grouped_path=False)
    assert exact[1].abs().sum() > 0 and len(exact[2]) == EXPERTS * 3 * 2

    def errors(result):
        out, x_grad, grads = result
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()
        return rel(out, exact[0]), rel(x_grad, exact[1]), max(rel(grads[n], exact[2][n]) for n in exact[2])

    layer_output_and_grads(layer, x.bfloat16(), index, weights.bfloat16(), grouped_path=True)  # backend chosen (one probe)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # a host sync in the grouped path raises
    try:
        ours = layer_output_and_grads(layer, x.bfloat16(), index, weights.bfloat16(), grouped_path=True)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return errors(ours), errors(layer_output_and_grads(layer, x.bfloat16(), index, weights.bfloat16(), grouped_path=False))


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_grouped_lora_in_bf16_is_as_close_to_fp32_as_the_reference(quant):
    ours, reference = bf16_errors(quant, "cpu")
    # bf16 rounding only: the reference runs LoRA in fp32 (peft upcasts), the grouped path in bf16
    assert all(o < 0.03 and o < 2 * r + 0.005 for o, r in zip(ours, reference)), (ours, reference)


class SignDropout(nn.Module):
    """A deterministic stand-in for dropout: keeps the values of one sign, doubled. Both paths see the same
    rows, so they draw the same masks, and w1's and w3's (opposite signs) tell apart which one ran where."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign

    def forward(self, x):
        return x * (x * self.sign > 0) * 2.0


def test_grouped_lora_applies_each_experts_dropout_to_its_own_input():
    model = with_lora(tiny("nf4"), rank=4, dropout=0.1).eval()  # eval: attention's LoRA dropout off, SignDropout stays
    for layer in expert_layers(model):
        for expert in layer:
            for name, sign in (("w1", 1.0), ("w3", -1.0), ("w2", 1.0)):
                getattr(expert, name).lora_dropout["default"] = SignDropout(sign)
    assert_grouped_path_taken(model)
    logits_ref, grads_ref = loss_and_grads(model, batch(), grouped_path=False)
    logits, grads = loss_and_grads(model, batch(), grouped_path=True)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-3)


def test_grouped_lora_dropout_has_the_per_expert_distribution():
    """Real dropout (p = 0.3): over 300 draws each, the grouped and the per-expert outputs of one layer agree in
    mean and spread; a reference with p = 0.4 (a different distribution) is told apart by the same statistic."""
    model = with_lora(tiny("none"), rank=4, dropout=0.3)
    model.train()
    layer = expert_layers(model)[0]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(24, HIDDEN, generator=generator)
    index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:2] for _ in range(24)])
    weights = torch.rand(24, 2, generator=generator).softmax(-1)

    def draws(grouped_path, copies=50, calls=6):  # every (row, matrix) draws its own mask: copies of a token are draws
        layer.grouped = grouped_path
        with torch.no_grad():
            outs = [layer(x.repeat(copies, 1), index.repeat(copies, 1), weights.repeat(copies, 1)) for _ in range(calls)]
        return torch.cat(outs).view(copies * calls, *x.shape)

    def distance(a, b):  # mean difference in units of its standard error, and the ratio of the spreads
        se = ((a.var(0) + b.var(0)) / a.shape[0]).sum().sqrt()
        return ((a.mean(0) - b.mean(0)).norm() / se).item(), (a.std(0).norm() / b.std(0).norm()).item()

    torch.manual_seed(4)
    ours, reference = draws(True), draws(False)
    mean_gap, spread = distance(ours, reference)
    assert mean_gap < 2.0 and 0.93 < spread < 1.07, (mean_gap, spread)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.4
    other = draws(False)
    assert distance(ours, other)[1] < 0.93  # the test can see a wrong dropout rate


def test_each_expert_weight_is_dequantised_twice_per_checkpointed_step(monkeypatch):
    model = with_lora(tiny("nf4"))
    dequantised = []
    original = bnbf.dequantize_4bit

    def counting(A, quant_state=None, *args, **kwargs):
        out = original(A, quant_state, *args, **kwargs)
        dequantised.append(out.numel())
        return out

    monkeypatch.setattr(bnbf, "dequantize_4bit", counting)
    layer = expert_layers(model)[0]
    x = torch.randn(40, HIDDEN, requires_grad=True)
    index = torch.randint(0, EXPERTS, (40, 2))
    weights = torch.rand(40, 2).softmax(-1)
    out = checkpoint(layer, x, index, weights, use_reentrant=False)
    every_expert_weight = EXPERTS * 3 * HIDDEN * INTER
    assert sum(dequantised) == every_expert_weight and len(dequantised) == 2  # the forward: one call per group
    out.square().sum().backward()
    assert sum(dequantised) == 2 * every_expert_weight  # the recompute; backward reuses its weights
    assert x.grad is not None and x.grad.abs().sum() > 0


def quantized(shape, seed):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state), nn.Parameter(packed, requires_grad=False), state


@pytest.mark.parametrize("shape, together", [((256, 128), True), ((96, 64), False)])  # 96 * 64 / 64 blocks: not whole nested blocks
def test_batched_dequantisation_equals_one_call_per_matrix(shape, together):
    import bitsandbytes as bnb

    matrices = [quantized(shape, seed) for seed in range(6)]
    weights = []
    for _, packed, state in matrices:
        weight = bnb.nn.Params4bit(packed.data, requires_grad=False, quant_state=state, quant_type="nf4", bnb_quantized=True)
        weights.append(weight)
    assert dequantize.dequantizes_together(weights) is together
    groups = [(nn.Linear(1, 1), nn.Linear(1, 1)) for _ in range(3)]  # 3 experts x 2 matrices
    for (a, b), wa, wb in zip(groups, weights[::2], weights[1::2]):
        a.weight, b.weight = wa, wb
    stacked = grouped.stacked_frozen_weights(groups, torch.float32)
    expected = torch.stack([torch.cat([matrices[2 * e][0], matrices[2 * e + 1][0]]) for e in range(3)])
    assert torch.equal(stacked, expected)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_the_loop_backend_equals_torch_grouped_mm(monkeypatch, requires_grad):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(20, 16, generator=generator, requires_grad=requires_grad)
    weight = torch.randn(4, 16, 8, generator=generator, requires_grad=requires_grad)
    ends = torch.tensor([5, 5, 12, 20], dtype=torch.int32)  # expert 1 gets no rows
    results = {}
    for name in grouped.BACKENDS:
        monkeypatch.setattr(grouped, "_backends", {("cpu", torch.float32): name})
        y = grouped_mm(x, weight, grouped.Ends(ends))
        if requires_grad:
            x.grad = weight.grad = None
            (y * torch.arange(8.0)).sum().backward()
            results[name] = (y.detach(), x.grad, weight.grad)
        else:
            results[name] = (y,)
    for ours, theirs in zip(results["loop"], results["grouped_mm"]):
        torch.testing.assert_close(ours, theirs)
    reference = torch.cat([x[:5] @ weight[0], x[5:12] @ weight[2], x[12:] @ weight[3]])
    torch.testing.assert_close(results["grouped_mm"][0], reference.detach())


def test_an_unknown_backend_override_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setattr(grouped, "_backends", {})
    monkeypatch.setenv(grouped.BACKEND_ENV, "triton")
    with pytest.raises(ConfigError, match=r"MTG_MOE_BACKEND='triton'.*grouped_mm, loop"):
        grouped.backend(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("capability, dtype, chosen", [
    ((9, 0), torch.bfloat16, "grouped_mm"),  # H100, H200
    ((10, 0), torch.bfloat16, "grouped_mm"),  # B200
    ((9, 0), torch.float16, "loop"),  # the CUTLASS kernel is bf16 only
    ((8, 0), torch.bfloat16, "loop"),  # A100
    ((8, 9), torch.bfloat16, "loop"),  # L40S, RTX 4090, L4
    ((8, 6), torch.bfloat16, "loop"),  # RTX 3090
    ((12, 0), torch.bfloat16, "loop"),  # RTX 5090
])
def test_the_backend_follows_what_the_card_runs_fast_and_is_logged_once_with_why(monkeypatch, caplog, capability, dtype, chosen):
    probed = []
    monkeypatch.setattr(grouped, "_backends", {})
    monkeypatch.delenv(grouped.BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(grouped, "_grouped_mm_fails", lambda device, dtype: probed.append(device) and None)
    with caplog.at_level("INFO", logger="mtg_core"):
        assert grouped.backend(torch.device("cuda"), dtype) == chosen
        assert grouped.backend(torch.device("cuda"), dtype) == chosen
    lines = [r.getMessage() for r in caplog.records if "MoE experts on cuda" in r.getMessage()]
    assert len(lines) == 1 and f": {chosen} backend (sm{capability[0]}{capability[1]} in {str(dtype)[6:]}" in lines[0]
    assert len(probed) == (chosen == "grouped_mm")  # a slow card is not even probed: the call would pass, and sync
    if chosen == "loop":
        assert "its fallback syncs the host on every GEMM" in lines[0]


def test_a_grouped_mm_that_does_not_run_falls_back_to_the_loop_saying_why(monkeypatch, caplog):
    monkeypatch.setattr(grouped, "_backends", {})
    monkeypatch.delenv(grouped.BACKEND_ENV, raising=False)
    monkeypatch.setattr(grouped, "_grouped_mm_fails", lambda device, dtype: "no kernel image is available")
    with caplog.at_level("INFO", logger="mtg_core"):
        assert grouped.backend(torch.device("cpu"), torch.float32) == "loop"
    assert "loop backend (torch._grouped_mm failed: no kernel image is available)" in caplog.text


def test_the_loop_backend_reads_the_routing_on_the_host_once_per_layer_and_pass(monkeypatch):
    """Forward and recompute read `ends` once each; backward reuses the forward's copy (not one read per GEMM)."""
    model = with_lora(tiny("nf4"), dropout=0.1)
    layer = expert_layers(model)[0]
    x = torch.randn(40, HIDDEN, requires_grad=True)
    index, weights = torch.randint(0, EXPERTS, (40, 2)), torch.rand(40, 2).softmax(-1)
    monkeypatch.setattr(grouped, "_backends", {("cpu", torch.float32): "loop"})
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    with CountOps() as counted:
        checkpoint(layer, x, index, weights, use_reentrant=False).square().sum().backward()
    assert reads == [(EXPERTS,), (EXPERTS,)] and counted.ops["aten._grouped_mm"] == 0 and counted.ops["aten.mm"] > 0


def test_an_unaligned_operand_runs_the_loop_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(grouped, "_backends", {("cpu", torch.float32): "grouped_mm"})
    monkeypatch.setattr(grouped, "_warned_unaligned", set())
    x = torch.randn(20 * 16 + 1)[1:].view(20, 16)  # data 4 bytes past a 16-byte boundary
    weight = torch.randn(4, 16, 8)
    ends = grouped.Ends(torch.tensor([5, 5, 12, 20], dtype=torch.int32))
    with caplog.at_level("WARNING", logger="mtg_core"):
        first, second = grouped_mm(x, weight, ends), grouped_mm(x, weight, ends)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, torch.cat([x[:5] @ weight[0], x[5:12] @ weight[2], x[12:] @ weight[3]]))
    assert len([r for r in caplog.records if "not 16-byte aligned" in r.getMessage()]) == 1


def test_resident_experts_are_laid_out_contiguously_once_and_never_concatenated_again():
    from mtg_core.moe.streaming import packing_order

    model = with_lora(tiny("nf4"))
    layer = expert_layers(model)[0]
    x, index, weights = torch.randn(40, HIDDEN), torch.randint(0, EXPERTS, (40, 2)), torch.rand(40, 2).softmax(-1)
    expected = layer(x, index, weights)  # first use: laid out
    params = packing_order(layer)
    assert layer.packed and dequantize.adjacent(params) is not None
    pointers = [p.data_ptr() for p in params]
    with CountOps() as counted:
        again = layer(x, index, weights)
    assert torch.equal(again, expected) and [p.data_ptr() for p in params] == pointers
    assert counted.uint8_cats == 0  # the packed weights are dequantised where they lie


def test_the_grouped_path_reads_nothing_on_the_host(monkeypatch):
    """No .tolist()/.item() in the grouped forward or backward: on a GPU they would stall it each layer."""
    model = with_lora(tiny("nf4"))
    layer = expert_layers(model)[0]
    x = torch.randn(40, HIDDEN, requires_grad=True)
    index, weights = torch.randint(0, EXPERTS, (40, 2)), torch.rand(40, 2).softmax(-1)
    layer(x, index, weights)  # the backend is chosen (one probe) on first use

    def host_read(*args, **kwargs):
        raise AssertionError("host read in the grouped path")

    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    checkpoint(layer, x, index, weights, use_reentrant=False).square().sum().backward()
    monkeypatch.undo()
    assert x.grad.abs().sum() > 0


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.uint8_cats = 0  # concatenations of packed 4-bit data

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.cat and out.dtype == torch.uint8:
            self.uint8_cats += 1
        return out


def test_a_training_step_of_the_nf4_model_dispatches_at_most_1500_ops():
    """Forward + backward of 4 x 64 tokens, LoRA r16 on attention and experts, checkpointed as mtg-train trains."""
    model = with_lora(tiny("nf4"), rank=16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(3, 2000, (4, 64), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()  # first use: backend probe
    with CountOps() as counted:
        model(input_ids=ids, labels=ids).loss.backward()
    total = sum(counted.ops.values())
    assert counted.ops["aten._grouped_mm"] > 0 and counted.ops["aten.mm"] < 100  # the experts did run grouped
    assert 500 < total <= 1500, counted.ops.most_common(10)


@cuda_only
@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_grouped_lora_in_bf16_on_cuda_is_as_close_to_fp32_as_the_reference(quant):
    fast = torch.cuda.get_device_capability()[0] in (9, 10)  # elsewhere the loop: torch's fallback would sync per GEMM
    assert grouped.backend(torch.device("cuda"), torch.bfloat16) == ("grouped_mm" if fast else "loop")
    ours, reference = bf16_errors(quant, "cuda")
    assert all(o < 0.03 and o < 2 * r + 0.005 for o, r in zip(ours, reference)), (ours, reference)


@cuda_only
def test_planned_peak_is_within_ten_percent_of_the_measured_one_on_cuda():
    """Two Mixtral-8x7B-shaped NF4 layers, 2 x 1024 tokens, LoRA r16 on q,k,v,o,w1,w2,w3, 8-bit AdamW."""
    import bitsandbytes as bnb
    from transformers import MixtralConfig

    from mtg_core.plan import plan_memory

    config = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                           vocab_size=32000, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=4096, tie_word_embeddings=False)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = MtgMixtralForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device="cuda")
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to("cuda")  # to_empty left its buffers blank
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name in TARGETS:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          quant_type="nf4", compress_statistics=True, device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to("cuda")
                setattr(parent, child_name, layer)
    for param in model.parameters():
        param.requires_grad_(False)
    torch.cuda.empty_cache()
    model = with_lora(model, rank=16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    plan = plan_memory(config, TARGETS, 16, "nf4", 2, 1024, 2, "cuda", 0)
    planned = plan.total_bytes - plan.overhead_bytes
    assert abs(planned - measured) <= 0.1 * measured, (planned / 2**30, measured / 2**30)


def test_lora_dropout_masks_drop_each_element_alone_with_probability_p():
    """16 bits per element, four elements per 64-bit draw: every lane drops at rate p, and neighbours (which
    share a draw) drop independently of each other."""
    p, count = 0.1, 1 << 22
    kept = dropout.keep_mask(torch.Size([count]), p, torch.float32, torch.device("cpu")).bool()
    assert kept.numel() == count
    dropped_ = ~kept.view(-1, 4)
    sigma = (p * (1 - p) / (count / 4)) ** 0.5
    assert all(abs(rate - p) < 5 * sigma for rate in dropped_.float().mean(0).tolist())  # each lane of a draw
    both = (dropped_[:, :-1] & dropped_[:, 1:]).float().mean().item()  # neighbours in one draw
    assert abs(both - p * p) < 5 * (p * p / (count / 4 * 3)) ** 0.5
    assert abs((~kept[1:] & ~kept[:-1]).float().mean().item() - p * p) < 0.002  # neighbours anywhere
    assert not torch.equal(kept, dropout.keep_mask(torch.Size([count]), p, torch.float32, torch.device("cpu")).bool())  # new per call


def test_lora_dropout_has_torch_dropouts_mean_spread_and_gradient():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(7), requires_grad=True)
    ours, theirs = dropout.LoraDropout(0.3).train(), nn.Dropout(0.3).train()
    torch.manual_seed(8)
    a = torch.stack([ours(x).detach() for _ in range(400)])
    b = torch.stack([theirs(x).detach() for _ in range(400)])
    torch.testing.assert_close(a.mean(0), x.detach(), atol=0.25, rtol=0)  # unbiased: E = x
    assert 0.95 < a.std(0).norm() / b.std(0).norm() < 1.05
    out = ours(x)
    out.sum().backward()
    kept = out.detach() != 0
    assert torch.equal(x.grad, kept.float() / 0.7)  # the gradient passes where the input did, scaled alike
    assert torch.equal(ours.eval()(x), x)  # eval: nothing dropped


def test_use_lora_dropout_swaps_every_lora_dropout_of_the_model():
    model = with_lora(tiny("none"), rank=4, dropout=0.1)
    assert dropout.use_lora_dropout(model) == 2 * (4 + EXPERTS * 3)  # layers x (q, k, v, o + experts x (w1, w2, w3))
    assert all(type(m) is not nn.Dropout for m in model.modules())
    assert_grouped_path_taken(model)


def test_grouped_lora_folds_the_dropout_scale_into_its_weights(monkeypatch):
    """The grouped path multiplies 1 / (1 - p) into the stacked A instead of every input row: with a deterministic
    mask (keep values away from 0) it equals the per-expert reference, whose modules scale the input."""
    monkeypatch.setattr(dropout, "keep_mask", lambda shape, p, dtype, device: None)  # the paths must use `dropped`
    deterministic = lambda x, p: x * (x.abs() > 0.05)
    monkeypatch.setattr(dropout, "dropped", deterministic)
    monkeypatch.setattr(grouped, "dropped", deterministic)
    model = with_lora(tiny("none"), rank=4, dropout=0.2)
    dropout.use_lora_dropout(model)
    assert_grouped_path_taken(model)
    ids = torch.randint(3, 2000, (4, 128), generator=torch.Generator().manual_seed(1))  # every expert gets tokens
    logits_ref, grads_ref = loss_and_grads(model, ids, grouped_path=False)
    logits, grads = loss_and_grads(model, ids, grouped_path=True)
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-3)


def test_grouped_lora_dropout_matches_torchs_per_expert_dropout_in_distribution():
    """Real masks: the grouped path with LoraDropout against the per-expert reference with torch's nn.Dropout."""
    model = with_lora(tiny("none"), rank=4, dropout=0.3).train()
    layer = expert_layers(model)[0]
    reference = copy.deepcopy(layer)
    dropout.use_lora_dropout(layer)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(24, HIDDEN, generator=generator)
    index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:2] for _ in range(24)])
    weights = torch.rand(24, 2, generator=generator).softmax(-1)

    def draws(module, grouped_path, copies=50, calls=6):
        module.grouped = grouped_path
        with torch.no_grad():
            outs = [module(x.repeat(copies, 1), index.repeat(copies, 1), weights.repeat(copies, 1)) for _ in range(calls)]
        return torch.cat(outs).view(copies * calls, *x.shape)

    torch.manual_seed(4)
    ours, theirs = draws(layer, True), draws(reference, False)
    se = ((ours.var(0) + theirs.var(0)) / ours.shape[0]).sum().sqrt()
    assert ((ours.mean(0) - theirs.mean(0)).norm() / se).item() < 2.0
    assert 0.93 < (ours.std(0).norm() / theirs.std(0).norm()).item() < 1.07


def test_checkpoint_recompute_draws_the_same_lora_dropout_masks():
    """Non-reentrant checkpointing replays the forward for backward: it must see the masks the forward drew."""
    model = with_lora(tiny("none"), rank=4, dropout=0.1).train()
    dropout.use_lora_dropout(model)
    results = []
    for checkpointed in (False, True):
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(11)
        results.append(loss_and_grads(model, batch(), grouped_path=True))
    (logits, grads), (logits_ckpt, grads_ckpt) = results
    torch.testing.assert_close(logits_ckpt, logits, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5)
