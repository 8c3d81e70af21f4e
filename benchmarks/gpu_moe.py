"""Mixtral-8x7B-shaped LoRA training steps on one GPU: bf16 (reference), transformers' stock 4-bit, mtg_core NF4.

    python benchmarks/gpu_moe.py                 # one H100/H200, about 5 minutes
    python benchmarks/gpu_moe.py --small         # CPU smoke run with tiny shapes (the test suite runs this)

Each configuration builds a Mixtral with random weights (hidden 4096, intermediate 14336, 8 experts
top-2, 32/8 heads, vocab 32000) and a few layers, then times forward + backward + 8-bit AdamW steps
with non-reentrant gradient checkpointing and LoRA rank 16 (dropout 0) on q,k,v,o,w1,w2,w3:

- bf16:  per-expert Linear layers in bf16 (mtg_core's grouped path over frozen bf16 weights);
- stock: transformers' MixtralForCausalLM with bitsandbytes 4-bit on every nn.Linear, which leaves
         the fused experts in bf16 (the trap: see its quantized count);
- nf4:   mtg_core's layout, every attention and expert matrix NF4 (double quantisation).

It prints tokens/s, peak GiB, the ratio to bf16, the planned peak (mtg_core.plan) and its extrapolation
to 32 layers, and checks logits and one step's LoRA gradients of nf4 against bf16 (relative error).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from torch import nn

from mtg_core.base_models import QUANTIZED_PARTS, count_quantized
from mtg_core.moe import MtgMixtralForCausalLM
from mtg_core.plan import GIB, plan_memory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
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
    if variant in ("stock", "nf4"):
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


def add_lora(model, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def measure(variant, layers, tokens, seq, steps, small, device, dtype):
    import bitsandbytes as bnb

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model = add_lora(build(variant, layers, small, device, dtype))
    quant = count_quantized(model)
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, model.config.vocab_size, (tokens // seq, seq), device=device,
                          generator=torch.Generator(device=device).manual_seed(2))
    model.train()

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, paged optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    plan = plan_memory(model.base_model.model.config, TARGETS, 16, "nf4" if variant == "nf4" else "none",
                       tokens // seq, seq, dtype.itemsize, device, 0)
    plan32 = plan_memory(type(model.base_model.model.config)(**{**model.base_model.model.config.to_dict(), "num_hidden_layers": 32}),
                         TARGETS, 16, "nf4" if variant == "nf4" else "none", tokens // seq, seq, dtype.itemsize, device, 0)
    result = {
        "variant": variant, "layers": layers, "tokens_per_step": tokens,
        "tokens_per_s": round(tokens * steps / elapsed, 1),
        "peak_gib": round(peak / GIB, 3),
        "planned_gib": round(plan.total_bytes / GIB, 3),
        "extrapolated_32_layers_gib": round((peak + plan32.total_bytes - plan.total_bytes) / GIB, 3) if peak else None,
        "quantized_weights": f"{quant.quantized_weights}/{quant.total_weights}",
    }
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
    assert ref_logits.norm() > 0 and all(g.norm() > 0 for g in ref_grads.values()), "reference is zero: nothing checked"
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: a smoke run, no timing meaning")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.small:
        args.layers, args.tokens, args.seq, args.steps = [2], [256], 64, 2
    print(json.dumps({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d")}))
    print(json.dumps(check_against_bf16(args.layers[0], args.seq, args.small, device, dtype)))
    for layers in args.layers:
        for tokens in args.tokens:
            rows = [measure(v, layers, tokens, args.seq, args.steps, args.small, device, dtype) for v in ("bf16", "stock", "nf4")]
            reference = rows[0]["tokens_per_s"]
            for row in rows:
                row["ratio_to_bf16"] = round(row["tokens_per_s"] / reference, 3)
                print(json.dumps(row))


if __name__ == "__main__":
    main()
