"""Mixtral-8x7B-shaped LoRA training steps on one GPU: bf16 (reference), transformers' stock 4-bit, mtg_core NF4.

    python benchmarks/gpu_moe.py                 # one H100/H200: 8 layers x 4096 tokens/step, a few minutes
    python benchmarks/gpu_moe.py --layers 4 8 --tokens 2048 4096   # the issue's full table
    python benchmarks/gpu_moe.py --small         # CPU smoke run with tiny shapes (the test suite runs this)
    python benchmarks/gpu_moe.py --full          # the whole 32-layer model, experts streamed under 16/24 GiB budgets

Each configuration builds a Mixtral with random weights (hidden 4096, intermediate 14336, 8 experts
top-2, 32/8 heads, vocab 32000) and a few layers, then times forward + backward + paged 8-bit AdamW
steps with non-reentrant gradient checkpointing and LoRA rank 16 (dropout 0) on q,k,v,o,w1,w2,w3:

- bf16:     per-expert Linear layers in bf16 (mtg_core's grouped path over frozen bf16 weights);
- stock:    transformers' MixtralForCausalLM with bitsandbytes 4-bit on every nn.Linear, which leaves
            the fused experts in bf16 (the trap: see its quantized count);
- nf4:      mtg_core's layout, every attention and expert matrix NF4 (double quantisation);
- nf4-attn: the same NF4 model with LoRA on q,k,v,o only: what LoRA on the experts costs.

Each row has tokens/s, MFU, peak GiB, the ratio to bf16, the planned peak (mtg_core.plan) and its
extrapolation to 32 layers. MFU counts 4N FLOPs per token against the H100's 989 TFLOP/s (dense bf16):
N is the active frozen weights (attention, router, top-k experts per layer, and lm_head), 2N for the
forward and 2N for the input gradient; the recompute, the LoRA terms and attention's scores are not
counted. The nf4 row also has the aten ops one step dispatches (forward + backward, and optimizer) and
the optimizer step's time for paged and non-paged 8-bit AdamW and torch's fused AdamW. A first line
checks logits and one step's LoRA gradients of nf4 against bf16 (relative error).

--full builds the whole 32-layer Mixtral-shaped model in NF4 from random weights, one matrix at a time
(never all bf16 at once), with the experts of the layers mtg_core's memory plan streams put in pinned
host memory as they are quantised, and trains it under GPU budgets applied with
torch.cuda.set_per_process_memory_fraction (so the run behaves like a smaller card): --offload-experts
none (no budget), auto at 24 GiB, auto and all at 16 GiB, each at 4 x 512 and 8 x 512 tokens per step.
Each row: tokens/s and its ratio to the resident run, peak allocated and reserved, the planned total,
streamed layers, host memory, and copies per step (measured and planned).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mtg_core.base_models import QUANTIZED_PARTS, count_quantized
from mtg_core.moe import MtgMixtralForCausalLM
from mtg_core.plan import GIB, plan_memory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
ATTENTION = TARGETS[:4]
VARIANTS = {"bf16": TARGETS, "stock": TARGETS, "nf4": TARGETS, "nf4-attn": ATTENTION}  # variant: LoRA targets
H100_BF16_FLOPS = 989e12  # dense, SXM
MIXTRAL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def build(variant: str, layers: int, small: bool, device: str, dtype: torch.dtype):
    """A randomly initialised model (same seed for every variant), quantised as the variant says."""
    import bitsandbytes as bnb
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    config = MixtralConfig(num_hidden_layers=layers, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=4096, tie_word_embeddings=False, **(SMALL if small else MIXTRAL))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # allocate nothing until the final layout exists
            model = (MixtralForCausalLM if variant == "stock" else MtgMixtralForCausalLM)(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, param in sorted(model.named_parameters()):
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0, 0.02, generator=generator)
    model.model.rotary_emb = MixtralRotaryEmbedding(model.config).to(device)  # to_empty left its buffers blank
    if variant != "bf16":
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                full = f"{parent_name}.{child_name}"
                if type(child) is nn.Linear and any(part in f".{full}." for part in QUANTIZED_PARTS):
                    layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                              quant_type="nf4", compress_statistics=True, device="meta")
                    layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True).to(device)
                    setattr(parent, child_name, layer)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def add_lora(model, targets=TARGETS, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(model, config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def active_weights(config) -> int:
    """N of the 4N-FLOPs-per-token count: the frozen weights one token passes through."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, kv = config.hidden_size, config.num_key_value_heads * head_dim
    attention = 2 * hidden * hidden + 2 * hidden * kv
    experts = config.num_experts_per_tok * 3 * hidden * config.intermediate_size
    router = hidden * config.num_local_experts
    return config.num_hidden_layers * (attention + experts + router) + config.vocab_size * hidden


class CountOps(TorchDispatchMode):
    """Counts the aten (and bitsandbytes) ops dispatched: on a GPU each is about one kernel launch."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def optimizer_times(params, device, repeats=5) -> dict[str, float]:
    """Milliseconds per optimizer step on the current gradients, for each 8-bit / fused AdamW."""
    import bitsandbytes as bnb

    choices = {"paged_adamw_8bit": lambda: bnb.optim.PagedAdamW8bit(params, lr=1e-4),
               "adamw_8bit": lambda: bnb.optim.AdamW8bit(params, lr=1e-4),
               "adamw_torch_fused": lambda: torch.optim.AdamW(params, lr=1e-4, fused=True)}
    times = {}
    for name, make in choices.items():
        optimizer = make()
        optimizer.step()  # state allocated
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            optimizer.step()
        synchronize(device)
        times[name] = round((time.perf_counter() - started) / repeats * 1000, 2)
        del optimizer
    return times


def measure(variant, layers, tokens, seq, steps, small, device, dtype):
    import bitsandbytes as bnb

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model = add_lora(build(variant, layers, small, device, dtype), VARIANTS[variant])
    quant = count_quantized(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    batch = torch.randint(0, model.config.vocab_size, (tokens // seq, seq), device=device,
                          generator=torch.Generator(device=device).manual_seed(2))
    model.train()

    def forward_backward():
        model(input_ids=batch, labels=batch).loss.backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    forward_backward()  # warm-up: kernels, backend probes, paged optimizer state
    optimizer_step()
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        forward_backward()
        optimizer_step()
    synchronize(device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    config = model.base_model.model.config
    quant_name = "none" if variant == "bf16" else "nf4"
    plan = plan_memory(config, VARIANTS[variant], 16, quant_name, tokens // seq, seq, dtype.itemsize, device, 0)
    plan32 = plan_memory(type(config)(**{**config.to_dict(), "num_hidden_layers": 32}),
                         VARIANTS[variant], 16, quant_name, tokens // seq, seq, dtype.itemsize, device, 0)
    tokens_per_s = tokens * steps / elapsed
    result = {
        "variant": variant, "layers": layers, "tokens_per_step": tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": float(f"{4 * active_weights(config) * tokens_per_s / H100_BF16_FLOPS:.3g}"),
        "peak_gib": round(peak / GIB, 3),
        "planned_gib": round((plan.total_bytes - plan.overhead_bytes) / GIB, 3),
        "extrapolated_32_layers_gib": round((peak + plan32.total_bytes - plan.total_bytes) / GIB, 3) if peak else None,
        "quantized_weights": f"{quant.quantized_weights}/{quant.total_weights}",
    }
    if variant == "nf4":
        with CountOps() as step_ops:
            forward_backward()
        with CountOps() as optimizer_ops:
            optimizer.step()
        result["aten_ops_forward_backward"] = sum(step_ops.ops.values())
        result["aten_ops_optimizer_step"] = sum(optimizer_ops.ops.values())
        result["optimizer_step_ms"] = optimizer_times(params, device)
    return result  # the model and optimizer go with this frame; the next measure() collects them


def check_against_bf16(layers, seq, small, device, dtype):
    """Relative error of nf4 logits and one step's LoRA gradients against the bf16 model (same weights)."""
    outputs = {}
    for variant in ("bf16", "nf4"):
        model = add_lora(build(variant, layers, small, device, dtype))
        batch = torch.randint(0, model.config.vocab_size, (1, seq), device=device, generator=torch.Generator(device=device).manual_seed(3))
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        outputs[variant] = (out.logits.detach().float(), grads)
        del model
        gc.collect()
    (ref_logits, ref_grads), (logits, grads) = outputs["bf16"], outputs["nf4"]
    ref_grads = {n: g for n, g in ref_grads.items() if g.norm() > 0}  # an expert no token reached has zero gradients
    assert ref_logits.norm() > 0 and ref_grads, "reference is zero: nothing checked"
    errors = sorted((grads[n] - ref_grads[n]).norm().item() / ref_grads[n].norm().item() for n in ref_grads if n in grads)
    # NF4's own error on one weight matrix of this model: the scale the other errors should be compared to
    import bitsandbytes.functional as bnbf

    weight = torch.randn(1024, 512, device=device, dtype=dtype) * 0.02
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    nf4_error = ((bnbf.dequantize_4bit(packed, state).float() - weight.float()).norm() / weight.float().norm()).item()
    # Routing (top-2 of 8) can flip where a token's router scores are close, so a few experts see other
    # tokens than in bf16: the median gradient error is the meaningful one, the maximum is shown too.
    return {"nf4_weight_rel_error": round(nf4_error, 4),
            "logits_rel_error": round(((logits - ref_logits).norm() / ref_logits.norm()).item(), 4),
            "lora_grad_rel_error_median": round(errors[len(errors) // 2], 4), "lora_grad_rel_error_max": round(errors[-1], 4),
            "lora_tensors_compared": len(errors)}


FULL_RUNS = [("none", None), ("auto", 24), ("auto", 16), ("all", 16)]  # (--offload-experts, GiB budget)


def build_full(layers: int, small: bool, device: str, dtype: torch.dtype, streamed: tuple[int, ...]):
    """The model quantised one matrix at a time from random weights; `streamed` layers' experts go to host memory."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    from mtg_core.moe.streaming import attach, install_streamed_layer, quantized_linear

    config = MixtralConfig(num_hidden_layers=layers, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=4096, tie_word_embeddings=False, **(SMALL if small else MIXTRAL))
    config.mtg_streamed_layers = list(streamed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = MtgMixtralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)

    def random(rows, columns):
        return torch.randn(rows, columns, device=device, dtype=dtype, generator=generator) * 0.02

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and any(part in f".{parent_name}.{child_name}." for part in QUANTIZED_PARTS):
                setattr(parent, child_name, quantized_linear(random(child.out_features, child.in_features)))
    for module in model.modules():  # embeddings, norms, router, lm_head: in the compute dtype
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type == "meta":
                value = torch.ones(param.shape, device=device, dtype=dtype) if "norm" in type(module).__name__.lower() \
                    else random(*param.shape) if param.dim() == 2 else torch.zeros(param.shape, device=device, dtype=dtype)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = {"w1": (inter, hidden), "w3": (inter, hidden), "w2": (hidden, inter)}
    hosted = [install_streamed_layer(model, index, {(e, n): quantized_linear(random(*shape)) for e in range(8) for n, shape in shapes.items()},
                                     pin=device == "cuda") for index in streamed]
    if hosted:
        attach(model, hosted)
    model.model.rotary_emb = MixtralRotaryEmbedding(config).to(device)
    return model


def full_config(small: bool):
    from transformers import MixtralConfig

    return MixtralConfig(num_hidden_layers=4 if small else 32, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=4096, tie_word_embeddings=False, **(SMALL if small else MIXTRAL))


def measure_full(runs, token_counts, seq, steps, small, device, dtype) -> list[dict]:
    """Each (offload, budget) at each token count, building the model anew only when the streamed layers change."""
    import bitsandbytes as bnb
    import psutil

    from mtg_core.plan import streamed_copies

    config = full_config(small)
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else psutil.virtual_memory().total
    rows, resident_speed, built, model, optimizer = [], {}, None, None, None
    for offload, budget_gib in runs:
        budget = int(budget_gib * GIB) if budget_gib else total
        for tokens in token_counts:
            plan = plan_memory(config, TARGETS, 16, "nf4", tokens // seq, seq, dtype.itemsize, device, budget, offload=offload,
                               host_free_bytes=psutil.virtual_memory().available)
            row = {"offload_experts": offload, "budget_gib": budget_gib, "tokens_per_step": tokens, "layers": config.num_hidden_layers,
                   "streamed_layers": plan.offloaded_layers, "planned_gib": round((plan.total_bytes - plan.overhead_bytes) / GIB, 3),
                   "planned_host_gib": round(plan.host_bytes / GIB, 3)}
            if not plan.fits:
                rows.append({**row, "skipped": "does not fit this budget by the plan"})
                continue
            if built != (budget, plan.streamed_layers):
                model = optimizer = None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                model = add_lora(build_full(config.num_hidden_layers, small, device, dtype, plan.streamed_layers))
                row["build_s"] = round(time.perf_counter() - started, 1)
                optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                model.train()
                built = (budget, plan.streamed_layers)
            streamer = getattr(model.base_model.model, "expert_streamer", None)
            batch = torch.randint(0, config.vocab_size, (tokens // seq, seq), device=device, generator=torch.Generator(device=device).manual_seed(2))

            def train_step():
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            try:
                train_step()  # warm-up
                synchronize(device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                copies = streamer.copies if streamer else 0
                started = time.perf_counter()
                for _ in range(steps):
                    train_step()
                synchronize(device)
                elapsed = time.perf_counter() - started
            except torch.OutOfMemoryError as exc:
                rows.append({**row, "out_of_memory": str(exc).splitlines()[0][:160]})
                built = None
                continue
            speed = tokens * steps / elapsed
            if offload == "none":
                resident_speed[tokens] = speed
            rows.append({
                **row,
                "tokens_per_s": round(speed, 1),
                "ratio_to_resident": round(speed / resident_speed[tokens], 3) if tokens in resident_speed else None,
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if device == "cuda" else None,
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if device == "cuda" else None,
                "host_rss_gib": round(psutil.Process().memory_info().rss / GIB, 3),
                "copies_per_step": ((streamer.copies - copies) / steps) if streamer else 0,
                "planned_copies_per_step": streamed_copies(plan.offloaded_layers),
            })
    model = optimizer = None
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: a smoke run, no timing meaning")
    parser.add_argument("--layers", type=int, nargs="+", default=[8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--full", action="store_true", help="the whole 32-layer model under 16/24 GiB budgets, experts streamed")
    args = parser.parse_args()
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.small:
        args.layers, args.tokens, args.seq, args.steps = [2], [256], 64, 2
    print(json.dumps({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d"),
                      "mfu_convention": "4N FLOPs/token (N: active frozen weights incl. lm_head) / 989e12 (H100 dense bf16)"}))
    if args.full:
        token_counts = [256] if args.small else [2048, 4096]
        runs = [("none", None), ("all", None)] if args.small else FULL_RUNS
        for row in measure_full(runs, token_counts, args.seq, 2 if args.small else 3, args.small, device, dtype):
            print(json.dumps(row))
        return
    print(json.dumps(check_against_bf16(args.layers[0], args.seq, args.small, device, dtype)))
    for layers in args.layers:
        for tokens in args.tokens:
            rows = {v: measure(v, layers, tokens, args.seq, args.steps, args.small, device, dtype) for v in args.variants}
            for row in rows.values():
                if "bf16" in rows:
                    row["ratio_to_bf16"] = round(row["tokens_per_s"] / rows["bf16"]["tokens_per_s"], 3)
                if row["variant"] == "nf4" and "nf4-attn" in rows:  # goal <= 0.15
                    row["expert_lora_cost"] = round(rows["nf4-attn"]["tokens_per_s"] / row["tokens_per_s"] - 1, 3)
                print(json.dumps(row))


if __name__ == "__main__":
    main()
