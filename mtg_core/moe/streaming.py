"""NF4 experts streamed from pinned host memory: the layers that do not fit stay on the host, packed.

~96 % of Mixtral is experts (0.66 GiB of packed NF4 per layer). For a streamed layer only the packed
4-bit data lives on the host; its quantisation constants (absmax, ~3 % of it), its LoRA and everything
else stay on the device. When the layer runs, its packed experts are copied into one of two device
staging buffers and dequantised from there by the grouped path, which keeps the dequantised weights
for backward (it never reads the packed data again), so the buffer is free as soon as the layer's
dequantisations are issued.

Copies run on a side CUDA stream, one layer ahead, in execution order: the forward runs the streamed
layers up, the checkpoint recompute in backward runs them down, and at each turn the two end layers
are still in the buffers (so a steady-state micro-batch copies 2N - 4 layers, not 2N). The order is a
prediction only: each buffer knows which layer it holds, and a layer that is not there is copied on
demand. When the memory plan needs smaller buffers, they hold one matrix group each instead of a layer
(w1|w3 of every expert, then w2: what each dequantisation reads), copied and released group by group in
the same order. On the CPU the same code runs with the copies made synchronously (tests compare it with
the resident model).

Hand-written because no library streams bitsandbytes weights: accelerate's offload hooks move whole
modules to the device synchronously, keep no double buffer, and refuse 4-bit weights on the CPU.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from contextlib import contextmanager

import attrs
import torch

from mtg_core.errors import BaseModelError
from mtg_core.plan import STAGING_BUFFERS, pinned_bytes

log = logging.getLogger("mtg_core")


@attrs.define(eq=False)
class StreamedLayer:
    """One layer's packed experts on the host and the Params4bit that stand for them on the device."""

    index: int  # model layer index
    host: torch.Tensor  # uint8, pinned on CUDA machines: [w1, w3 of expert 0, w1, w3 of expert 1, ..., w2 of every expert]
    params: list  # (Params4bit, offset, shape) in host order


STAGINGS = ("layer", "group")  # what a staging buffer holds: a layer's packed experts, or one matrix group of them
GROUP_NAMES = ("w1|w3", "w2")  # the grouped path's two dequantisations of a layer, in the order the forward reads them


@attrs.define(eq=False)  # slots are compared by identity
class _Slot:
    buffer: torch.Tensor
    unit: tuple[int, int] | None = None  # (position in the streamed order, unit of that layer) it holds or is receiving
    ready: object = None  # CUDA event: the copy into it finished
    free: object = None  # CUDA event: the last dequantisation reading it was issued before this


class ExpertStreamer:
    """The streamed layers of one model, in layer order, and the two staging buffers they share.

    A buffer holds one unit: a whole layer's packed experts (staging "layer"), or, when the memory plan needs the
    buffers smaller, one of its two matrix groups (staging "group": w1|w3 of every expert, then w2 of every expert,
    each read by one dequantisation), copied and released group by group."""

    def __init__(self, layers: list[StreamedLayer], device: torch.device, staging: str = "layer") -> None:
        self.layers = layers
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.placeholder = torch.empty(0, dtype=torch.uint8, device=device)  # what a streamed weight holds between uses
        self.copies = 0  # host -> device copies (units) so far (benchmarks report it; tests check the order)
        self.copied_bytes = 0
        self.log: list[tuple] | None = None  # per copy, when a test asks: (layer, why), or (layer, group, why) by groups
        self.chunked = False  # the grouped path's backward reads the units again, w2's then w1|w3's (set_expert_chunk)
        for layer in layers:
            for param, _, _ in layer.params:
                param.data = self.placeholder
        self.restage(staging)

    def restage(self, staging: str) -> None:
        """Staging buffers for whole layers or for matrix groups (the memory plan's `staging`); nothing may be loaded."""
        self.staging = staging
        self.units = [self._ranges(layer, staging) for layer in self.layers]  # per layer: host (start, stop) of each unit
        self.per_layer = len(self.units[0])
        size = max(stop - start for ranges in self.units for start, stop in ranges)
        count = min(STAGING_BUFFERS, len(self.layers) * self.per_layer)
        if self.cuda and getattr(self, "slots", None):
            self.copy_stream.synchronize()  # a prefetch may still be writing into the old buffers
        self.slots = []  # the old buffers go before the new ones are allocated
        self.slots = [_Slot(torch.empty(size, dtype=torch.uint8, device=self.device)) for _ in range(count)]
        self._last: tuple[int, int, bool] | None = None  # the last access: (position, unit, backward)
        self._up = True
        self._training = True  # whether the layer being run has grad enabled (checkpointed training)
        self._recent: list[_Slot] = []  # least recently used first

    @staticmethod
    def _ranges(layer: StreamedLayer, staging: str) -> list[tuple[int, int]]:
        total = layer.host.numel()
        if staging == "layer":
            return [(0, total)]
        split = layer.params[len(layer.params) * 2 // 3][1]  # packing_order: w1, w3 of each expert, then every w2
        return [(0, split), (split, total)]

    @contextmanager
    def loaded(self, position: int, backward: bool = False):
        """Within the block the layer's packed experts can be staged: yields `stage`, where `stage(group)` (0: w1|w3,
        1: w2) is a context within which that group's Params4bit hold views of a staging buffer. Leaving it releases
        the buffer when nothing else of it is to be read (staging "layer": after w2), so that the next copy into it
        may run, overlapping the layer's GEMMs: the grouped path leaves it right after the group's dequantisation.
        backward: the chunked path's backward reading the layer again (its order differs from the forward's)."""
        held: dict[int, _Slot] = {}  # unit -> slot, acquired and not released
        params = self.layers[position].params
        self._training = backward or torch.is_grad_enabled()  # here, not in `stage`: autograd Functions' forwards run without grad

        @contextmanager
        def stage(group: int):
            unit = min(group, self.per_layer - 1)
            if unit not in held:
                slot = held[unit] = self._acquire(position, unit, backward)
                start, stop = self.units[position][unit]
                for param, offset, shape in params:
                    if start <= offset < stop:
                        param.data = slot.buffer[offset - start : offset - start + shape.numel()].view(shape)
                self._prefetch(position, unit, backward, slot)
            yield
            if group == len(GROUP_NAMES) - 1 or self.per_layer > 1:  # the unit's last reader is done
                self._release(held.pop(unit))

        try:
            yield stage
        finally:
            for param, _, _ in params:
                param.data = self.placeholder
            for slot in held.values():  # a path that never left its stage (an exception): the end of the layer
                self._release(slot)

    def _release(self, slot: _Slot) -> None:
        if self.cuda:
            slot.free = torch.cuda.current_stream(self.device).record_event()

    def _acquire(self, position: int, unit: int, backward: bool) -> _Slot:
        slot = next((s for s in self.slots if s.unit == (position, unit)), None)
        if slot is None:
            slot = self._copy((position, unit), self._victim(keep=None), "demand")
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self._recent = [s for s in self._recent if s is not slot] + [slot]
        if self._last is not None:
            if position != self._last[0]:
                self._up = position > self._last[0]
            elif unit == 0 and not backward and len(self.layers) > 1:  # the same layer's forward again: a turn at an end
                self._up = position == 0  # at the top the recompute goes down, at the bottom the next forward goes up
        self._last = (position, unit, backward)
        return slot

    def _after(self, position: int, unit: int, backward: bool) -> tuple[int, int, bool]:
        """The access that comes next. Training (grad enabled, checkpointed): up through the forward, then down through
        the recompute, turning at each end; with chunked experts each layer's recompute is followed by its backward,
        which reads the units down (w2's, then w1|w3's). Inference: every unit up, then the next forward."""
        last, final = len(self.layers) - 1, self.per_layer - 1
        if backward:  # autograd runs backward without grad mode: this comes first
            if unit > 0:
                return position, unit - 1, True
            return (position - 1 if position > 0 else 0), 0, False
        if not self._training:
            return (position, unit + 1, False) if unit < final else ((position + 1) % len(self.layers), 0, False)
        if unit < final:
            return position, unit + 1, False
        if self._up:
            return (position + 1 if position < last else last), 0, False
        if self.chunked:
            return position, final, True
        return (position - 1 if position > 0 else 0), 0, False

    def _prefetch(self, position: int, unit: int, backward: bool, slot: _Slot) -> None:
        """Copy the next unit needed after this one into the other buffer, unless it is there. The next access of
        another unit is the first one whose buffer matters: with two buffers, whatever the other holds is not needed
        before it."""
        access = (position, unit, backward)
        for _ in range(2 * self.per_layer + 2):  # past the accesses of this same unit (a chunked backward re-reads it)
            access = self._after(*access)
            if access[:2] != (position, unit):
                break
        else:
            return  # only this unit comes next (one streamed layer, or a turn)
        if not any(s.unit == access[:2] for s in self.slots):
            self._copy(access[:2], self._victim(keep=slot), "prefetch")

    def _victim(self, keep: _Slot | None) -> _Slot:
        for slot in self.slots:
            if slot not in self._recent:
                return slot
        return next(s for s in self._recent if s is not keep)

    def _copy(self, unit: tuple[int, int], slot: _Slot, why: str) -> _Slot:
        position, part = unit
        start, stop = self.units[position][part]
        host = self.layers[position].host[start:stop]
        slot.unit = unit
        self.copies += 1
        self.copied_bytes += stop - start
        if self.log is not None:
            index = self.layers[position].index
            self.log.append((index, why) if self.per_layer == 1 else (index, GROUP_NAMES[part], why))
        if not self.cuda:
            slot.buffer[: host.numel()].copy_(host)
            return slot
        with torch.cuda.stream(self.copy_stream):
            if slot.free is not None:
                self.copy_stream.wait_event(slot.free)  # the dequantisations reading its last unit come first
            slot.buffer[: host.numel()].copy_(host, non_blocking=True)
            slot.ready = self.copy_stream.record_event()
        return slot


def host_copy(params: list, pin: bool, share=None, index: int | None = None) -> tuple[torch.Tensor, list]:
    """One host buffer holding `params`' packed data back to back, and (param, offset, shape) for each.

    share: the node's shared copy (moe.shared_host, under torchrun): layer `index`'s buffer is then the file local
    rank 0 fills and the other local ranks map, instead of memory of this process's own."""
    entries, total = [], 0
    for param in params:
        entries.append((param, total, param.data.shape))
        total += param.data.numel()
    pinning = pin_mapping if pin else unpinned
    if share is not None:
        host = share.host(index, entries, total, fill_host, pinning)
        if host is not None:
            return host, entries
    host = pinned_empty(total) if pin else torch.empty(total, dtype=torch.uint8)
    fill_host(host, entries)
    return host, entries


def fill_host(host: torch.Tensor, entries: list) -> None:
    for param, offset, _ in entries:
        data = param.data.reshape(-1)
        host[offset : offset + data.numel()].copy_(data)


def pinned_empty(nbytes: int) -> torch.Tensor:
    """`nbytes` of page-locked host memory (uint8), pinning only the pages they span."""
    return pin_mapping(mmap.mmap(-1, pinned_bytes(max(nbytes, 1))), nbytes)


def unpinned(buffer: mmap.mmap, nbytes: int) -> torch.Tensor:
    """The first `nbytes` of `buffer` as a uint8 tensor (which keeps the mapping alive), on a machine without CUDA."""
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes)


def pin_mapping(buffer: mmap.mmap, nbytes: int) -> torch.Tensor:
    """The first `nbytes` of `buffer` (a page-aligned mapping: anonymous, or a layer file of moe.shared_host, which
    each process pins in its own address space) as a uint8 tensor, its pages locked for CUDA copies.

    Not torch.empty(pin_memory=True): that goes through torch's caching host allocator, which rounds every
    block up to a power of two (torch/include/ATen/core/CachingHostAllocator.h:300-306, with no threshold by
    default: c10/core/AllocatorConfig.h:361), so one Mixtral layer's 672 MiB would pin 1 GiB and 16 GiB of
    streamed layers ~32 GiB. A mapping is page-aligned; cudaHostRegister locks exactly its pages, and they are
    unregistered when the tensor goes.
    """
    cudart = torch.cuda.cudart()
    host = unpinned(buffer, nbytes)
    pointer = host.data_ptr()
    status = cudart.cudaHostRegister(pointer, len(buffer), 0)
    if int(status) != 0:
        raise BaseModelError(f"cannot pin {len(buffer) / 1024**3:.2f} GiB of host memory for streamed experts ({status}); "
                             "free host memory or stream fewer layers (--offload-experts auto with a larger budget)")
    weakref.finalize(host, _unpin, cudart, pointer)
    return host


def _unpin(cudart, pointer: int) -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # a prefetch from these pages may still be running
    cudart.cudaHostUnregister(pointer)


def pack_contiguously(experts) -> None:
    """Lay a resident layer's NF4 experts out back to back in one device buffer, in packing_order, so that
    the grouped path dequantises each group straight from it (dequantize.adjacent), as it does from a
    streaming buffer, instead of concatenating the packed w1|w3 (0.44 GiB per Mixtral layer) every pass.
    Runs once per layer, on its first use; experts that are not all NF4 stay as they are."""
    params = packing_order(experts)
    if not params or any(type(p).__name__ != "Params4bit" for p in params) or len({(p.dtype, p.device) for p in params}) > 1:
        return
    sizes = [p.data.numel() for p in params]
    with torch.inference_mode(False), torch.no_grad():  # a first use under inference_mode must not make inference tensors
        buffer = torch.empty(sum(sizes), dtype=params[0].dtype, device=params[0].device)
        for param, target in zip(params, buffer.split(sizes)):
            target.copy_(param.data.reshape(-1))
            param.data = target.view(param.data.shape)
    if buffer.is_cuda:  # the per-matrix blocks just freed cannot hold the next layer's buffer: give them back
        torch.cuda.empty_cache()


def attach(model, layers: list[StreamedLayer]) -> ExpertStreamer:
    """Give each streamed layer's experts the model's streamer (LinearExperts.forward enters `loaded`)."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    streamer = ExpertStreamer(sorted(layers, key=lambda layer: layer.index), device)
    for position, layer in enumerate(streamer.layers):
        experts = model.model.layers[layer.index].mlp.experts
        experts.stream = (streamer, position)
    model.expert_streamer = streamer
    return streamer


def set_expert_chunk(model, chunk: int | None, staging: str = "layer") -> None:
    """Dequantise every MoE layer's experts `chunk` at a time (the memory plan's expert_chunk; None: the whole layer),
    and stage streamed experts by whole layers or by matrix groups (the plan's `staging`)."""
    from mtg_core.moe.layout import LinearExperts

    experts = 0
    for module in model.modules():
        if isinstance(module, LinearExperts):
            module.chunk = chunk
            experts = max(experts, len(module))
    streamer = getattr(model, "expert_streamer", None)
    if streamer is not None:
        streamer.chunked = chunk is not None and chunk < experts
        if staging != streamer.staging:
            streamer.restage(staging)
            log.info("streamed experts staged by matrix group (w1|w3, then w2): the memory plan's staging")


def packing_order(experts) -> list:
    """The Params4bit of a layer's experts in the order the grouped path reads them: w1, w3 of each
    expert (one dequantisation), then w2 of each (another), so each group is one contiguous range."""
    first = [getattr(expert, name).weight for expert in experts for name in ("w1", "w3")]
    return first + [expert.w2.weight for expert in experts]
