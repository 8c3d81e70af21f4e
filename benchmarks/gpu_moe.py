"""Mixtral-8x7B-shaped LoRA training steps on one GPU: bf16 (reference), transformers' stock 4-bit, mtg_core NF4.

    python benchmarks/gpu_moe.py                 # one H100/H200: 8 layers x 4096 tokens/step, a few minutes
    python benchmarks/gpu_moe.py --layers 4 8 --tokens 2048 4096   # the issue's full table
    python benchmarks/gpu_moe.py --small         # CPU smoke run with tiny shapes (the test suite runs this)
    python benchmarks/gpu_moe.py --full          # the whole 32-layer model, experts streamed under 8/16/24 GiB budgets

Each configuration builds a Mixtral with random weights (hidden 4096, intermediate 14336, 8 experts
top-2, 32/8 heads, vocab 32000) and a few layers, then times what mtg-train runs: forward under bf16
autocast (accelerate's, as Trainer's bf16=True sets it) + backward + paged 8-bit AdamW steps (mtg_core.optim:
one host sync per step), non-reentrant gradient checkpointing, LoRA rank 16 with the shipped experts'
dropout (0.05; EXPLAIN uses 0.1; stock runs without: peft refuses dropout on fused experts) on q,k,v,o,w1,w2,w3:

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

--full builds the whole 32-layer Mixtral-shaped model in NF4 from random weights (mtg_core.moe.synthetic),
with the experts of the layers mtg_core's memory plan streams put in pinned host memory as they are
quantised, and trains it under GPU budgets applied with torch.cuda.set_per_process_memory_fraction (so
the run behaves like a smaller card): --offload-experts none (no budget), auto at 24 GiB, auto and all at
16 GiB, each at 4 x 512 and 8 x 512 tokens per step, and auto at 8 GiB (the seed's 8 GB card: every layer
streamed, experts dequantised in the chunk the plan picks) at 1 x 512, with the resident run at 1 x 512 to
compare it with (goal: >= 0.3x its speed, peak allocated plus memory outside the allocator <= 7.5 GiB).
Each model runs in a process of its own: bitsandbytes
never frees paged optimizer state (cudaMallocManaged, bitsandbytes/functional.py:91-99, kept in its
GlobalPageManager), the allocator's fraction does not cap it, and pinned host memory and the previous
streamer go with the process. Each row: tokens/s and its ratio to the resident run, peak allocated and
reserved, the peak device use including memory outside torch's allocator (mtg_core.device_memory), peak
allocated plus that outside memory, the planned total, streamed layers, experts dequantised at a time, host
memory, and copies per step (measured and planned). --small --full runs the tiny model resident, streamed, and
streamed with a budget that makes the plan chunk the experts (the CPU applies no budget: it checks the wiring).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import subprocess
import sys
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mtg_core.base_models import QUANTIZED_PARTS, count_quantized
from mtg_core.moe import MtgMixtralForCausalLM
from mtg_core.moe.synthetic import MIXTRAL, SMALL, build_nf4, mixtral_config
from mtg_core.optim import one_sync_per_step
from mtg_core.plan import GIB, plan_memory

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
ATTENTION = TARGETS[:4]
VARIANTS = {"bf16": TARGETS, "stock": TARGETS, "nf4": TARGETS, "nf4-attn": ATTENTION}  # variant: LoRA targets
H100_BF16_FLOPS = 989e12  # dense, SXM
LORA_DROPOUT = 0.05  # REASON, PREDICT, TEACH, RETROSPECT; EXPLAIN 0.1: dropout takes the path with one A GEMM per kind


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


def add_lora(model, targets=TARGETS, seed: int = 1, dropout: float = LORA_DROPOUT):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
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


def paged_adamw_8bit(params):
    """The optimizer mtg-train builds: bitsandbytes' paged 8-bit AdamW, one host sync per step."""
    import bitsandbytes as bnb

    return one_sync_per_step(bnb.optim.PagedAdamW8bit)(params, lr=1e-4)


def autocast(device, dtype):
    """accelerate's mixed-precision forward, as Trainer(bf16=True) runs it; nothing in fp32 (the CPU runs)."""
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def optimizer_times(params, device, repeats=5) -> dict[str, float]:
    """Milliseconds per optimizer step on the current gradients, for each 8-bit / fused AdamW."""
    import bitsandbytes as bnb

    choices = {"paged_adamw_8bit": lambda: paged_adamw_8bit(params),
               "paged_adamw_8bit_bitsandbytes": lambda: bnb.optim.PagedAdamW8bit(params, lr=1e-4),  # a sync per tensor
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
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    # peft's ParamWrapper (the stock model's fused experts) refuses dropout: stock runs without
    model = add_lora(build(variant, layers, small, device, dtype), VARIANTS[variant], dropout=0.0 if variant == "stock" else LORA_DROPOUT)
    quant = count_quantized(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = paged_adamw_8bit(params)
    batch = torch.randint(0, model.config.vocab_size, (tokens // seq, seq), device=device,
                          generator=torch.Generator(device=device).manual_seed(2))
    model.train()

    def forward_backward():
        with autocast(device, dtype):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()

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
        model = add_lora(build(variant, layers, small, device, dtype), dropout=0.0)  # the weights' error, not dropout's
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


# (--offload-experts, GiB budget, tokens per step): 8 GiB plans to fit at 1 x 512 only, so the resident run has that row too
FULL_RUNS = [("none", None, (512, 2048, 4096)), ("auto", 24, (2048, 4096)), ("auto", 16, (2048, 4096)), ("all", 16, (2048, 4096)),
             ("auto", 8, (512,))]


def small_runs(seq: int, dtype) -> list:
    """--small --full: resident, all streamed, and all streamed under a budget that makes the plan chunk the experts."""
    import psutil

    config = mixtral_config(4, True)
    whole = plan_memory(config, TARGETS, 16, "nf4", 256 // seq, seq, dtype.itemsize, "cpu", psutil.virtual_memory().total, offload="all")
    budget = whole.total_bytes - whole.dequantized_bytes // 2  # half the whole layer's dequantised experts less
    return [("none", None, (256,)), ("all", None, (256,)), ("all", budget / GIB, (256,))]


def full_plans(runs, seq, small, device, dtype):
    """(offload, budget GiB, tokens, plan) for every row of --full, planned as mtg-train plans (auto aims at 90 % of
    the budget, and the experts are dequantised in the largest chunk that fits when streaming all layers is not enough)."""
    import psutil

    config = mixtral_config(4 if small else 32, small)
    for offload, budget_gib, token_counts in runs:
        if budget_gib:
            budget = int(budget_gib * GIB)
        else:  # the whole device
            budget = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else psutil.virtual_memory().total
        for tokens in token_counts:
            yield offload, budget_gib, tokens, plan_memory(config, TARGETS, 16, "nf4", tokens // seq, seq, dtype.itemsize, device, budget,
                                                           offload=offload, host_free_bytes=psutil.virtual_memory().available)


def measure_full(runs, seq, steps, small, device, dtype) -> list[dict]:
    """Every row of --full; each distinct model (budget, streamed layers, chunk) trains in a process of its own."""
    rows, builds = [], {}
    for offload, budget_gib, tokens, plan in full_plans(runs, seq, small, device, dtype):
        row = {"offload_experts": offload, "budget_gib": budget_gib, "tokens_per_step": tokens, "layers": 4 if small else 32,
               "streamed_layers": plan.offloaded_layers, "expert_chunk": plan.expert_chunk, "staging": plan.staging,
               "planned_gib": round((plan.total_bytes - plan.overhead_bytes) / GIB, 3),
               "planned_with_cuda_context_gib": round(plan.total_bytes / GIB, 3), "planned_host_gib": round(plan.host_bytes / GIB, 3)}
        rows.append(row)
        if not plan.fits:
            row["skipped"] = "does not fit this budget by the plan"
            continue
        builds.setdefault((budget_gib, plan.streamed_layers, plan.expert_chunk, plan.staging), []).append(row)
    for (budget_gib, streamed, chunk, staging), build_rows in builds.items():
        job = {"budget_gib": budget_gib, "streamed": list(streamed), "expert_chunk": chunk, "staging": staging,
               "tokens": [r["tokens_per_step"] for r in build_rows], "seq": seq, "steps": steps, "small": small}
        done = subprocess.run([sys.executable, __file__, "--full-build", json.dumps(job)], capture_output=True, text=True)
        results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or len(results) != len(build_rows):
            raise SystemExit(f"--full build {job} failed:\n{done.stderr[-3000:]}")
        for row, result in zip(build_rows, results):
            row.update(result)
    resident = {row["tokens_per_step"]: row["tokens_per_s"] for row in rows if row["offload_experts"] == "none" and "tokens_per_s" in row}
    for row in rows:
        if "tokens_per_s" in row and row["tokens_per_step"] in resident:
            row["ratio_to_resident"] = round(row["tokens_per_s"] / resident[row["tokens_per_step"]], 3)
    return rows


def full_build(job: dict, device: str, dtype: torch.dtype) -> None:
    """One --full model (this process's only one), trained at each token count; prints a JSON line per count."""
    import psutil

    from mtg_core.device_memory import DevicePeak
    from mtg_core.moe.streaming import set_expert_chunk
    from mtg_core.plan import streamed_copies

    config = mixtral_config(4 if job["small"] else 32, job["small"])
    if device == "cuda" and job["budget_gib"]:
        torch.cuda.set_per_process_memory_fraction(min(1.0, job["budget_gib"] * GIB / torch.cuda.get_device_properties(0).total_memory))
    started = time.perf_counter()
    model = add_lora(build_nf4(config, device, dtype, tuple(job["streamed"])))
    set_expert_chunk(model, job["expert_chunk"], job["staging"])  # as mtg-train applies the plan's choices
    build_s = round(time.perf_counter() - started, 1)
    optimizer = paged_adamw_8bit([p for p in model.parameters() if p.requires_grad])
    model.train()
    streamer = getattr(model.base_model.model, "expert_streamer", None)
    seq, steps = job["seq"], job["steps"]
    for tokens in job["tokens"]:
        batch = torch.randint(0, config.vocab_size, (tokens // seq, seq), device=device, generator=torch.Generator(device=device).manual_seed(2))
        peak = None  # sampled from the first timed step on

        def train_step():
            with autocast(device, dtype):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if peak is not None:
                peak.sample()

        try:
            train_step()  # warm-up
            synchronize(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                peak = DevicePeak()
            copies = streamer.copies if streamer else 0
            started = time.perf_counter()
            for _ in range(steps):
                train_step()
            synchronize(device)
            elapsed = time.perf_counter() - started
        except torch.OutOfMemoryError as exc:
            print(json.dumps({"build_s": build_s, "out_of_memory": str(exc).splitlines()[0][:160]}), flush=True)
            continue
        print(json.dumps({
            "build_s": build_s,
            "tokens_per_s": round(tokens * steps / elapsed, 1),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if device == "cuda" else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if device == "cuda" else None,
            # paged optimizer state, CUDA context: what the fraction above does not cap
            "peak_device_gib": round(peak.peak() / GIB, 3) if peak is not None else None,
            # the 8 GiB bar: what torch allocated at its peak plus what the device used beyond the allocator
            "peak_allocated_plus_outside_gib": round((torch.cuda.max_memory_allocated() + peak.outside) / GIB, 3) if peak is not None else None,
            "host_rss_gib": round(psutil.Process().memory_info().rss / GIB, 3),
            "copies_per_step": ((streamer.copies - copies) / steps) if streamer else 0,
            "planned_copies_per_step": streamed_copies(len(job["streamed"]), staging=job["staging"]),
        }), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU: a smoke run, no timing meaning")
    parser.add_argument("--layers", type=int, nargs="+", default=[8])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--full", action="store_true", help="the whole 32-layer model under 8/16/24 GiB budgets, experts streamed")
    parser.add_argument("--full-build", help=argparse.SUPPRESS)  # one --full model, in the process --full starts for it
    args = parser.parse_args()
    device = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.full_build:
        job = json.loads(args.full_build)
        full_build(job, "cpu" if job["small"] else device, dtype if not job["small"] else torch.float32)
        return
    if args.small:
        args.layers, args.tokens, args.seq, args.steps = [2], [256], 64, 2
    print(json.dumps({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d"),
                      "mfu_convention": "4N FLOPs/token (N: active frozen weights incl. lm_head) / 989e12 (H100 dense bf16)"}))
    if args.full:
        runs = small_runs(args.seq, dtype) if args.small else FULL_RUNS
        for row in measure_full(runs, args.seq, 2 if args.small else 3, args.small, device, dtype):
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
