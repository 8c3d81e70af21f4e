"""mtg-doctor's checks: each runs mtg_core's own code (layout, grouped path, streaming, plan, optimizer) on a
small Mixtral-shaped NF4 model from random weights and returns (status, reason)."""

from __future__ import annotations

import contextlib
import time

import attrs

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
LORA_DROPOUT = 0.05  # the shipped experts' (0.05-0.1): the path mtg-train runs
BATCH, SEQ = 2, 128
LAYERS = 4  # streaming's steady state needs more than two: 2N - 4 copies per micro-batch
REAL_WIDTHS_FREE_GIB = 12  # device memory free for Mixtral's real widths (a resident and a streamed 4-layer model, ~10 GiB)


@attrs.define
class Bench:
    """The device, dtype and model the checks share; the resident model is built once, on first use."""

    device: str
    dtype: object
    config: object
    widths: str
    real_widths: bool = False
    _resident: object = None
    _step: tuple | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def build(self, streamed=()):
        from mtg_core.moe.synthetic import build_nf4

        return with_lora(build_nf4(self.config, self.device, self.dtype, tuple(streamed)))

    def resident(self):
        if self._resident is None:
            self._resident = self.build()
        return self._resident

    def resident_step(self):
        """The resident model's training step: logits and LoRA gradients, computed once."""
        if self._step is None:
            self._step = train_step(self.resident(), self)
        return self._step

    def batch(self):
        import torch

        generator = torch.Generator(device=self.device).manual_seed(2)
        return torch.randint(0, self.config.vocab_size, (BATCH, SEQ), device=self.device, generator=generator)


def bench() -> Bench:
    import torch

    from mtg_core.moe.synthetic import mixtral_config

    if not torch.cuda.is_available():
        return Bench("cpu", torch.float32, mixtral_config(LAYERS, small=True), "tiny widths (CPU)")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32  # mtg-train's choice (base_models)
    free, _ = torch.cuda.mem_get_info()
    real = free >= REAL_WIDTHS_FREE_GIB * 1024**3
    widths = "Mixtral-8x7B widths" if real else f"tiny widths (under {REAL_WIDTHS_FREE_GIB} GiB free)"
    return Bench("cuda", dtype, mixtral_config(LAYERS, small=not real), widths, real)


def with_lora(model, seed: int = 1):
    """LoRA r16 on every target, as the experts train; random A and B so that every gradient is non-zero."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=LORA_DROPOUT, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train()


def autocast(bench: Bench):
    import torch

    return torch.autocast(bench.device, dtype=bench.dtype) if bench.dtype != torch.float32 else contextlib.nullcontext()


def train_step(model, bench: Bench):
    """Forward (under mtg-train's autocast) and backward of one batch, with the dropout masks seeded."""
    import torch

    ids = bench.batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    with autocast(bench):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def relative_error(ours, reference) -> float:
    reference = reference.float()
    return ((ours.float() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def nf4_dequantisation(bench: Bench):
    """The grouped path's batched dequantisation against bitsandbytes' own, one matrix at a time."""
    import bitsandbytes.functional as bnbf
    import torch

    from mtg_core.moe.grouped import stacked_frozen_weights
    from mtg_core.moe.synthetic import random_matrix
    from mtg_core.moe.loading import quantized_linear

    hidden, inter = bench.config.hidden_size, bench.config.intermediate_size
    weights = [random_matrix(f"doctor.{i}", inter, hidden, bench.device, bench.dtype) for i in range(4)]
    groups = [(quantized_linear(weights[0]), quantized_linear(weights[1])), (quantized_linear(weights[2]), quantized_linear(weights[3]))]
    stacked = stacked_frozen_weights(groups, bench.dtype)
    one_by_one = torch.stack([torch.cat([bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in group])
                              for group in groups])
    if not torch.equal(stacked, one_by_one.to(bench.dtype)):
        return FAIL, f"batched dequantisation differs from bitsandbytes' per matrix (max {(stacked - one_by_one).abs().max().item():.3g})"
    error = relative_error(stacked.reshape(-1), torch.stack([torch.cat(weights[:2]), torch.cat(weights[2:])]).reshape(-1))
    if not 0.02 < error < 0.15:
        return FAIL, f"NF4 relative error {error:.3f}, expected about 0.1: bitsandbytes' kernels are not doing NF4"
    return PASS, f"{len(weights)} matrices {inter}x{hidden}: batched = per-matrix, NF4 relative error {error:.3f}"


def grouped_vs_loop(bench: Bench):
    """One MoE layer: the grouped path against peft's per-expert modules (outputs and LoRA gradients)."""
    import torch

    from mtg_core.moe import LinearExperts
    from mtg_core.moe.grouped import backend

    model = bench.resident()
    layer = next(m for m in model.modules() if isinstance(m, LinearExperts))
    generator = torch.Generator(device=bench.device).manual_seed(3)
    tokens = BATCH * SEQ
    x = torch.randn(tokens, bench.config.hidden_size, device=bench.device, dtype=bench.dtype, generator=generator)
    index = torch.randint(0, bench.config.num_local_experts, (tokens, 2), device=bench.device, generator=generator)
    weights = torch.rand(tokens, 2, device=bench.device, generator=generator).softmax(-1).to(bench.dtype)
    lora = [p for n, p in layer.named_parameters() if "lora_" in n]
    results = []
    # No dropout (eval): the two paths draw their masks differently by design. The input needs a gradient
    # anyway: without one, bitsandbytes' CPU Linear4bit.forward repacks an eval-mode weight in place
    # (bitsandbytes/nn/modules.py:614-620) into a layout only its own CPU kernel reads.
    layer.eval()
    try:
        for grouped in (True, False):
            layer.grouped = grouped
            inputs = x.detach().requires_grad_()
            for p in lora:
                p.grad = None
            y = layer(inputs, index, weights)
            (y.float() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
            results.append((y.detach(), [inputs.grad, *(p.grad.clone() for p in lora)]))
    finally:
        layer.grouped = True
        layer.train()
    (y_grouped, g_grouped), (y_loop, g_loop) = results
    tolerance = 1e-4 if bench.dtype == torch.float32 else 3e-2
    errors = [relative_error(y_grouped, y_loop)] + [relative_error(a, b) for a, b in zip(g_grouped, g_loop) if b.norm() > 0]
    name = backend(x.device, x.dtype)
    if max(errors) > tolerance:
        return FAIL, f"{name} backend: relative error up to {max(errors):.2g} against the per-expert loop (tolerance {tolerance:g})"
    return PASS, f"{name} backend: output, input and {len(errors) - 2} LoRA gradients within {max(errors):.2g} of the per-expert loop"


def streamed_vs_resident(bench: Bench):
    """Every layer's experts streamed from host memory: the same step, bit for bit, and the planned copies and host bytes."""
    import gc

    import torch

    from mtg_core.plan import expert_packed_bytes, pinned_bytes, plan_memory

    logits, grads = bench.resident_step()
    layers = bench.config.num_hidden_layers
    model = bench.build(streamed=range(layers))
    try:
        streamer = model.base_model.model.expert_streamer
        streamed_logits, streamed_grads = train_step(model, bench)
        before = streamer.copies
        train_step(model, bench)  # the steady state: the previous step's last layers are still in the buffers
        copies = streamer.copies - before
        host = sum(pinned_bytes(layer.host.numel()) for layer in streamer.layers)
    finally:
        del model
        gc.collect()
    plan = plan_memory(bench.config, TARGETS, 16, "nf4", BATCH, SEQ, bench.dtype.itemsize, bench.device, 1 << 50, offload="all")
    if not torch.equal(logits, streamed_logits) or grads.keys() != streamed_grads.keys() or not all(
            torch.equal(grads[n], streamed_grads[n]) for n in grads):
        return FAIL, "the streamed model's logits or LoRA gradients differ from the resident model's"
    layer_bytes = expert_packed_bytes(bench.config)
    if copies * layer_bytes != plan.transfer_bytes_per_step or host != plan.host_bytes:
        return FAIL, (f"{copies} copies per step and {host} host bytes; the plan says {plan.transfer_bytes_per_step // layer_bytes} "
                      f"and {plan.host_bytes}")
    pinned = "pinned" if bench.cuda else "host (pinned on CUDA)"
    return PASS, f"{layers} layers streamed: logits and {len(grads)} LoRA gradients identical; {copies} copies per step and {host / 1024**2:.1f} MiB {pinned}, as planned"


def no_host_sync(bench: Bench):
    """An MoE layer's forward and backward (checkpointed) on the fast path without a host sync."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from mtg_core.moe import LinearExperts
    from mtg_core.moe.grouped import backend

    model = bench.resident()
    layer = next(m for m in model.modules() if isinstance(m, LinearExperts))
    if backend(torch.device(bench.device), bench.dtype) != "grouped_mm":
        return SKIP, "this device runs the per-expert loop, which reads the routing on the host once per layer and pass by design"
    tokens = BATCH * SEQ
    x = torch.randn(tokens, bench.config.hidden_size, device=bench.device, dtype=bench.dtype, requires_grad=True)
    index = torch.randint(0, bench.config.num_local_experts, (tokens, 2), device=bench.device)
    weights = torch.rand(tokens, 2, device=bench.device).softmax(-1).to(bench.dtype)
    layer(x.detach(), index, weights)  # first use (layout, kernels' lazy set-up) outside the watched step
    with host_syncs_raise(bench):
        checkpoint(layer, x, index, weights, use_reentrant=False).float().square().sum().backward()
    how = "torch.cuda.set_sync_debug_mode('error')" if bench.cuda else "no .item()/.tolist() (the CPU has no device to sync with)"
    return PASS, f"forward, recompute and backward of one layer: {how}"


@contextlib.contextmanager
def host_syncs_raise(bench: Bench):
    import torch

    if bench.cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return

    def host_read(*args, **kwargs):
        raise RuntimeError("a host read of a tensor in the MoE layer")

    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item")}
    for name in saved:
        setattr(torch.Tensor, name, host_read)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def optimizer_syncs(bench: Bench):
    """One step of mtg-train's 8-bit AdamW over the model's LoRA tensors: host syncs counted (bitsandbytes' sync_gpu)."""
    import bitsandbytes as bnb
    import bitsandbytes.optim.optimizer as bnb_optimizer

    from mtg_core.optim import one_sync_per_step

    model = bench.resident()
    bench.resident_step()
    train_step(model, bench)  # gradients for every LoRA tensor
    params = [p for p in model.parameters() if p.requires_grad]
    kind = bnb.optim.PagedAdamW8bit if bench.cuda else bnb.optim.AdamW8bit  # mtg-train's optim= on each device
    counts = {}
    original = bnb_optimizer.sync_gpu
    for name, cls in (("ours", one_sync_per_step(kind)), ("bitsandbytes", kind)):
        calls = []
        optimizer = cls(params, lr=0.0)  # lr 0: the model stays as it was
        bnb_optimizer.sync_gpu = lambda t, calls=calls: (calls.append(1), original(t))
        try:
            optimizer.step()
        finally:
            bnb_optimizer.sync_gpu = original
        counts[name] = len(calls)
        del optimizer
    if counts["ours"] != 1:
        return FAIL, f"{counts['ours']} host syncs per step, expected 1"
    return PASS, f"1 host sync per step over {len(params)} LoRA tensors ({kind.__name__} alone: {counts['bitsandbytes']})"


def peak_vs_plan(bench: Bench):
    """A training step with the optimizer: peak device memory (allocator and outside it) against the plan."""
    import torch

    from mtg_core.device_memory import DevicePeak
    from mtg_core.optim import one_sync_per_step
    from mtg_core.plan import GIB, plan_memory

    if not bench.cuda:
        return SKIP, "no CUDA device: the plan is for device memory"
    if not bench.real_widths:
        return SKIP, f"under {REAL_WIDTHS_FREE_GIB} GiB free: on tiny widths fixed costs would decide the comparison"
    import bitsandbytes as bnb

    model = bench.resident()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    peak = DevicePeak()
    context = peak.outside  # the CUDA context and other processes: the plan's overhead term, not compared here
    optimizer = one_sync_per_step(bnb.optim.PagedAdamW8bit)([p for p in model.parameters() if p.requires_grad], lr=0.0)
    for _ in range(2):  # the optimizer state exists from the first step on
        train_step(model, bench)
        optimizer.step()
        peak.sample()
    free, _ = torch.cuda.mem_get_info()
    plan = plan_memory(bench.config, TARGETS, 16, "nf4", BATCH, SEQ, bench.dtype.itemsize, "cuda", free)
    planned = plan.total_bytes - plan.overhead_bytes
    allocated, device = torch.cuda.max_memory_allocated(), peak.peak() - context
    line = (f"peak {allocated / GIB:.3f} GiB allocated, {device / GIB:.3f} GiB on the device with what the allocator does "
            f"not see; planned {planned / GIB:.3f} GiB")
    if allocated > 1.1 * planned or device > 1.1 * planned + 0.5 * GIB:  # cuBLAS workspaces and allocator slack
        return FAIL, line
    return PASS, line


CHECKS = [
    ("NF4 dequantisation", nf4_dequantisation),
    ("grouped experts vs the per-expert loop", grouped_vs_loop),
    ("streamed vs resident training step", streamed_vs_resident),
    ("no host sync in an MoE layer", no_host_sync),
    ("optimizer step host syncs", optimizer_syncs),
    ("peak memory vs the plan", peak_vs_plan),
]


def run_checks(bench: Bench) -> list[dict]:
    """Every check, in order; an exception is that check's FAIL, in one line."""
    results = []
    for name, check in CHECKS:
        started = time.perf_counter()
        try:
            status, reason = check(bench)
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check, reported, and the others still run
            status, reason = FAIL, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        results.append({"check": name, "status": status, "reason": reason, "seconds": round(time.perf_counter() - started, 2)})
    return results
