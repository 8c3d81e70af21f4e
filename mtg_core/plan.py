"""The memory plan: what a run will need, computed from the config alone (a model on the meta device).

Each term follows what the libraries actually allocate, so it can be checked against a real run:
bitsandbytes NF4 with double quantisation, peft LoRA kept in fp32, bitsandbytes' 8-bit AdamW (32-bit
state for tensors under 4096 elements), non-reentrant gradient checkpointing (one saved hidden state
per layer, one layer recomputed at a time), and the logits' fp32 copies in the loss and its backward (logit_bytes).
"""

from __future__ import annotations

import math
import mmap

import attrs

GIB = 1024**3
NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantisation: absmax values quantised to 8-bit in blocks of 256
OPTIM_8BIT_MIN = 4096  # bitsandbytes keeps 32-bit Adam state for smaller tensors
OPTIM_8BIT_BLOCK = 256
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context and cuBLAS workspaces, measured order of magnitude


@attrs.frozen
class MemoryPlan:
    weights_4bit_bytes: int
    weights_other_bytes: int
    lora_params: int
    lora_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    logits_bytes: int
    dequantized_bytes: int  # a layer's experts dequantised at once: the whole layer, or one chunk (expert_chunk)
    overhead_bytes: int
    device_free_bytes: int
    device: str
    # Experts streamed from host memory (see mtg_core.moe.streaming); weights_4bit_bytes excludes their packed data.
    streamed_layers: tuple[int, ...] = ()
    staging_bytes: int = 0  # the device buffers streamed experts are copied into
    staging: str = "layer"  # what one holds: a layer's packed experts, or one matrix group of them (moe.streaming)
    host_bytes: int = 0  # pinned host memory holding the streamed experts, as pinned (whole pages)
    host_free_bytes: int | None = None
    transfer_bytes_per_step: int = 0  # host -> device per optimizer step (inference: per forward pass), in the steady state
    experts: int = 0  # experts per layer
    expert_chunk: int | None = None  # experts dequantised at a time (moe.grouped chunked path); None: the whole layer
    training: bool = True  # False: an inference plan (mtg-eval, mtg-ask): no gradients, optimizer state or checkpoints

    @property
    def weights_bytes(self) -> int:
        return self.weights_4bit_bytes + self.weights_other_bytes

    @property
    def offloaded_layers(self) -> int:
        return len(self.streamed_layers)

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.lora_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes + self.logits_bytes + self.dequantized_bytes + self.staging_bytes + self.overhead_bytes)

    @property
    def host_fits(self) -> bool:
        return self.host_free_bytes is None or self.host_bytes <= self.host_free_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_free_bytes and self.host_fits

    def as_dict(self) -> dict:
        return {**attrs.asdict(self), "streamed_layers": list(self.streamed_layers), "offloaded_layers": self.offloaded_layers,
                "weights_bytes": self.weights_bytes, "total_bytes": self.total_bytes, "fits": self.fits}


def nf4_bytes(numel: int) -> int:
    """Packed 4-bit weights plus double-quantised constants, as bitsandbytes stores them."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4 * 16


OFFLOAD_CHOICES = ("auto", "none", "all")
STAGING_BUFFERS = 2  # device buffers a streamed layer's packed experts are copied into (moe.streaming)
# --offload-experts auto plans to this share of the budget: the caching allocator reserves more than is
# allocated (fragmentation), and a 16 GB card must keep room for its CUDA context.
AUTO_SHARE = 0.9


def spread(count: int, layers: int) -> tuple[int, ...]:
    """`count` of `layers` layer indices, evenly spaced: streamed layers between resident ones give each copy
    more compute to hide behind than a block of streamed layers would."""
    return tuple(int((i + 0.5) * layers / count) for i in range(count))


def streamed_copies(streamed: int, training: bool = True, staging: str = "layer") -> int:
    """Copies per forward + backward of a micro-batch (inference: per forward pass) with two staging buffers, in
    the steady state, each of a unit: a layer, or (staging "group") one of its two matrix groups, w1|w3 or w2.
    Training: the forward runs the streamed units up, the checkpoint recompute down, and each turn finds its two
    end units still in the buffers (mtg_core.moe.streaming prefetches in that order); the chunked path's backward
    finds its units still there from the recompute. Inference runs them up every pass: the buffers keep them only
    when they hold all of them. By groups each layer's two copies come in pairs: they add up to the layer."""
    units = streamed * (2 if staging == "group" else 1)
    if not training:
        return 0 if units <= STAGING_BUFFERS else units
    return max(0, 2 * units - 2 * STAGING_BUFFERS)


def plan_memory(model_config, target_modules, rank: int, quant: str, batch_size: int, seq_len: int,
                compute_bytes: int, device: str, device_free_bytes: int, *, offload: str = "none", grad_accum: int = 1,
                host_free_bytes: int | None = None, training: bool = True) -> MemoryPlan:
    """Plan one run; `model_config` is a transformers config (nothing is allocated).

    offload: "none" keeps every expert on the device, "all" streams every layer's NF4 experts from host
    memory, "auto" streams the fewest layers that make the run fit `device_free_bytes`. When that is not
    enough ("auto" and "all"), the experts are dequantised in the largest chunk of experts that fits (the whole
    layer when it does).
    """
    plan = _plan_memory(model_config, target_modules, rank, quant, batch_size, seq_len, compute_bytes, device,
                        device_free_bytes, host_free_bytes, training)
    layers = model_config.num_hidden_layers
    target = AUTO_SHARE * device_free_bytes if offload == "auto" else device_free_bytes
    if not getattr(model_config, "num_local_experts", 0):
        return plan
    if quant == "nf4" and offload != "none":
        for streamed in ([layers] if offload == "all" else range(1, layers + 1)):
            if offload == "auto" and plan.total_bytes <= target:
                break  # auto: as many layers resident as fit
            plan = streaming(plan, model_config, streamed, grad_accum)
    if offload != "none" and plan.total_bytes > target:  # "none": the run as it is (benchmarks plan with no budget)
        plan = largest_chunk(plan, model_config, compute_bytes, target)
        if plan.streamed_layers and plan.total_bytes > target:  # the last resort: buffers for a matrix group, not a layer
            plan = largest_chunk(streaming(plan, model_config, plan.offloaded_layers, grad_accum, "group"),
                                 model_config, compute_bytes, target)
    return plan


def largest_chunk(plan: MemoryPlan, model_config, compute_bytes: int, target: float) -> MemoryPlan:
    """`plan` with the largest chunk of experts that fits `target`, or the smallest there is."""
    for chunk in range(plan.experts - 1, 0, -1):
        plan = chunked(plan, model_config, chunk, compute_bytes)
        if plan.total_bytes <= target:
            break
    return plan


def streaming(plan: MemoryPlan, model_config, streamed: int, grad_accum: int, staging: str = "layer") -> MemoryPlan:
    """`plan` with the experts of `streamed` layers in pinned host memory instead of on the device, staged through
    two device buffers of a layer's packed experts each, or (staging "group") of its larger matrix group, w1|w3."""
    layer_bytes = expert_packed_bytes(model_config)
    unit_bytes = layer_bytes if staging == "layer" else 2 * layer_bytes // 3
    units = streamed * (1 if staging == "layer" else 2)
    copies = streamed_copies(streamed, plan.training, staging)
    resident = plan.weights_4bit_bytes + plan.offloaded_layers * layer_bytes
    return attrs.evolve(
        plan,
        weights_4bit_bytes=resident - streamed * layer_bytes,
        streamed_layers=spread(streamed, model_config.num_hidden_layers),
        staging=staging,
        staging_bytes=min(units, STAGING_BUFFERS) * unit_bytes,
        host_bytes=streamed * pinned_bytes(layer_bytes),
        transfer_bytes_per_step=(grad_accum if plan.training else 1) * copies * layer_bytes // (units // streamed),
    )


def chunked(plan: MemoryPlan, model_config, chunk: int, compute_bytes: int) -> MemoryPlan:
    """`plan` with `chunk` experts dequantised at a time (re-dequantised in backward instead of kept)."""
    return attrs.evolve(plan, expert_chunk=chunk, dequantized_bytes=dequantized_bytes(model_config, compute_bytes, chunk, plan.training))


def dequantized_bytes(model_config, compute_bytes: int, chunk: int | None, training: bool) -> int:
    """A layer's dequantised experts alive at once. Whole layer: training keeps both groups (w1|w3 and w2 of every
    expert) for backward; inference holds one group at a time, w1|w3 the larger. Chunked: one chunk's w1|w3."""
    c = model_config
    per_expert = c.hidden_size * c.intermediate_size * compute_bytes
    if chunk is None:
        return c.num_local_experts * (3 if training else 2) * per_expert
    return chunk * 2 * per_expert


def pinned_bytes(nbytes: int) -> int:
    """What pinning `nbytes` locks (moe.streaming.pinned_empty): whole pages, nothing rounded to a power of two."""
    return -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE


def expert_packed_bytes(model_config) -> int:
    """One layer's experts as packed NF4 data (two weights a byte): what streaming copies; constants stay resident."""
    return model_config.num_local_experts * 3 * model_config.hidden_size * model_config.intermediate_size // 2


def logit_bytes(compute_bytes: int) -> int:
    """Bytes per logit at the step's peak (transformers 5, accelerate 1.x), the larger of:

    - forward: the compute-dtype logits, the log-probabilities cross_entropy keeps for backward (fp32), and
      one fp32 copy when the logits are not fp32: first ForCausalLMLoss's upcast (`logits.float()`,
      transformers/loss/loss_utils.py:62), then, once the loss is done, accelerate's
      convert_outputs_to_fp32 around the mixed-precision forward (accelerate/accelerator.py:1796,
      accelerate/utils/operations.py:884);
    - backward through log_softmax: the saved log-probabilities, their gradient and the logits' fp32 gradient
      (the outputs are gone by then: Trainer.compute_loss returns only the loss).
    12 bytes in bf16 and fp32 alike; the plan counted 10 for bf16 before.
    """
    forward = compute_bytes + 4 + (4 if compute_bytes < 4 else 0)
    backward = 3 * 4
    return max(forward, backward)


def meta_model(model_config):
    """The base's module tree on the meta device: names and shapes, no memory, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    from mtg_core.moe import MtgMixtralForCausalLM

    with torch.device("meta"):
        if model_config.model_type in ("mixtral", "mtg_mixtral"):
            return MtgMixtralForCausalLM(model_config)
        return AutoModelForCausalLM.from_config(model_config)


def _plan_memory(model_config, target_modules, rank: int, quant: str, batch_size: int, seq_len: int,
                 compute_bytes: int, device: str, device_free_bytes: int, host_free_bytes: int | None, training: bool) -> MemoryPlan:
    from torch import nn

    from mtg_core.base_models import QUANTIZED_PARTS

    model = meta_model(model_config)
    quantized, other, lora_tensors = 0, 0, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
            if quant == "nf4" and any(part in f".{name}." for part in QUANTIZED_PARTS):
                quantized += nf4_bytes(module.weight.numel())
            if name.rsplit(".", 1)[-1] in target_modules:
                lora_tensors += [rank * in_features, rank * out_features]
    for name, param in model.named_parameters():
        counted_as_4bit = quant == "nf4" and any(part in f".{name}" for part in QUANTIZED_PARTS) and param.dim() == 2
        if not counted_as_4bit:
            other += param.numel() * compute_bytes
    lora_params = sum(lora_tensors)
    optimizer = sum(2 * n + 2 * 4 * math.ceil(n / OPTIM_8BIT_BLOCK) if n >= OPTIM_8BIT_MIN else 8 * n for n in lora_tensors)

    c = model.config
    tokens = batch_size * seq_len
    hidden, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (getattr(c, "head_dim", None) or hidden // c.num_attention_heads)
    top_k = getattr(c, "num_experts_per_tok", 1)
    experts = getattr(c, "num_local_experts", 1)
    # Checkpointing keeps each layer's input; backward recomputes one layer at a time, holding its
    # attention tensors (norm, q, k, v, output, LoRA dropout copies), router logits in fp32, and for each
    # routed token the expert's w1/w3 outputs, activation, product, w2 output and dropout copies.
    attention = tokens * (6 * hidden + 2 * kv + 3 * hidden) * compute_bytes
    moe = tokens * top_k * (2 * hidden + 5 * inter + hidden) * compute_bytes + tokens * experts * 4
    if training:
        activation = layers * tokens * hidden * compute_bytes + 2 * (attention + moe)  # forward recompute + its gradients
        logits = tokens * c.vocab_size * logit_bytes(compute_bytes)
    else:  # one layer's forward at a time, the KV cache of every layer, and the loss (mtg-eval) over fp32 logits
        activation = layers * tokens * 2 * kv * compute_bytes + attention + moe
        logits = tokens * c.vocab_size * (compute_bytes + 2 * 4)
    # The grouped expert path dequantises a layer's experts stacked in the compute dtype straight from one
    # contiguous buffer (resident layers are laid out so on first use, streamed ones sit so in their staging
    # buffer): no packed copy.
    dequantized = dequantized_bytes(c, compute_bytes, None, training) if getattr(c, "num_local_experts", 0) else 0
    return MemoryPlan(
        weights_4bit_bytes=quantized,
        weights_other_bytes=other,
        lora_params=lora_params,
        lora_bytes=4 * lora_params,
        gradient_bytes=4 * lora_params if training else 0,
        optimizer_bytes=optimizer if training else 0,
        activation_bytes=activation,
        logits_bytes=logits,
        dequantized_bytes=dequantized,
        overhead_bytes=CUDA_CONTEXT_BYTES if device == "cuda" else 0,
        device_free_bytes=device_free_bytes,
        device=device,
        host_free_bytes=host_free_bytes,
        experts=getattr(c, "num_local_experts", 0),
        training=training,
    )


def settings_that_fit(plan_for, batch_size: int, grad_accum: int, seq_len: int) -> str | None:
    """The first of: smaller batches (same global batch via --grad-accum), then shorter sequences."""
    batch, accum, length = batch_size, grad_accum, seq_len
    while True:
        if batch > 1:
            batch, accum = batch // 2, accum * 2
        elif length > 128:
            length //= 2
        else:
            return None
        if plan_for(batch, length).fits:
            return f"--batch-size {batch} --grad-accum {accum} --seq-len {length}"


def describe(plan: MemoryPlan) -> list[str]:
    rows = [
        ("weights, 4-bit NF4 incl. constants", plan.weights_4bit_bytes),
        ("weights, other (router, norms, embeddings, lm_head)", plan.weights_other_bytes),
        (f"LoRA parameters ({plan.lora_params:,}, fp32)", plan.lora_bytes),
        ("LoRA gradients (fp32)", plan.gradient_bytes),
        ("optimizer state (8-bit AdamW)", plan.optimizer_bytes),
        ("activations (gradient checkpointing)" if plan.training else "activations and KV cache", plan.activation_bytes),
        ("logits and their gradient" if plan.training else "logits and the loss", plan.logits_bytes),
        (f"staging buffers for streamed experts (2 {plan.staging}s)", plan.staging_bytes),
        ("CUDA context", plan.overhead_bytes),
    ]
    if plan.experts:
        rows.insert(-2, (f"dequantised experts ({chunk_label(plan)})", plan.dequantized_bytes))
    lines = [f"  {label:<52} {value / GIB:9.3f} GiB" for label, value in rows]
    lines.append(f"  {'total':<52} {plan.total_bytes / GIB:9.3f} GiB")
    lines.append(f"  {'budget on ' + plan.device:<52} {plan.device_free_bytes / GIB:9.3f} GiB  -> "
                 f"{'fits' if plan.total_bytes <= plan.device_free_bytes else 'does NOT fit'}")
    if plan.streamed_layers:
        lines.append(f"  experts of {plan.offloaded_layers} layers streamed from host memory (layers "
                     f"{', '.join(map(str, plan.streamed_layers))}), the others resident")
        free = "" if plan.host_free_bytes is None else f" of {plan.host_free_bytes / GIB:.3f} GiB available"
        lines.append(f"  {'pinned host memory' + free:<52} {plan.host_bytes / GIB:9.3f} GiB  -> "
                     f"{'fits' if plan.host_fits else 'does NOT fit'}")
        per = "optimizer step" if plan.training else "forward pass"
        lines.append(f"  {'copied host -> device per ' + per:<52} {plan.transfer_bytes_per_step / GIB:9.3f} GiB")
    return lines


def chunk_label(plan: MemoryPlan) -> str:
    if plan.expert_chunk is None:
        return f"whole layer, {plan.experts} experts"
    return f"{plan.expert_chunk} of {plan.experts} experts at a time"
