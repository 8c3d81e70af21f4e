"""The streamed layers' experts, loaded from the checkpoint straight into host memory (moe.streaming streams them).

transformers cannot do this: bitsandbytes quantisation refuses a device map that sends modules to the CPU
(it would keep them unquantised in fp32), so the streamed layers' experts are left out of its load
(LinearExperts without experts) and quantised here, one matrix at a time on the device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mtg_core.errors import BaseModelError
from mtg_core.moe.streaming import ExpertStreamer, StreamedLayer, attach, host_copy, packing_order
from mtg_core.plan import expert_packed_bytes


EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight")


def checkpoint_shards(location: str) -> list[Path]:
    """The safetensors files of a local folder or of a hub id already in the local cache."""
    from transformers.utils import cached_file

    folder = Path(location)
    if not folder.is_dir():
        index = cached_file(location, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        single = None if index else cached_file(location, "model.safetensors")
        folder = Path(index or single).parent
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in names]
    return [folder / "model.safetensors"]


def load_streamed_experts(model, location: str, streamed: list[int], dtype: torch.dtype, log) -> ExpertStreamer:
    """Quantise the streamed layers' experts from the checkpoint, one matrix at a time on the device, as
    transformers + bitsandbytes quantise the resident ones, and move each layer's packed data to (pinned)
    host memory as soon as the layer is complete: the device never holds more than a layer of them.

    transformers cannot do this: bitsandbytes quantisation refuses a device map that sends modules to
    the CPU (it would keep them unquantised in fp32), so the streamed layers' experts are left out of
    its load (LinearExperts without experts) and loaded here.
    """
    from safetensors import safe_open

    config = model.config
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    from mtg_core.moe.shared_host import node_share

    pin = device.type == "cuda"
    wanted = set(streamed)
    pending = {index: {} for index in streamed}  # layer -> {(expert, name): Linear4bit}
    done = []
    share = node_share(location, streamed, expert_packed_bytes(config), log)  # None: a single process on this node
    try:
        for shard in checkpoint_shards(location):
            with safe_open(str(shard), framework="pt", device="cpu") as tensors:
                for key in tensors.keys():
                    match = EXPERT_KEY.fullmatch(key)
                    if not match or int(match[1]) not in wanted:
                        continue
                    layer, expert, name = int(match[1]), int(match[2]), match[3]
                    pending[layer][(expert, name)] = quantized_linear(tensors.get_tensor(key).to(device=device, dtype=dtype))
                    if len(pending[layer]) == 3 * config.num_local_experts:
                        done.append(install_streamed_layer(model, layer, pending.pop(layer), pin, share))
        if pending:
            layer, found = next(iter(pending.items()))
            raise BaseModelError(f"{location}: the checkpoint has {len(found)} of the {3 * config.num_local_experts} expert matrices of "
                                 f"layer {layer}; it must hold model.layers.N.block_sparse_moe.experts.E.w1/w2/w3")
        if share is not None:
            share.finish()
    finally:
        if share is not None:
            share.close()  # on success finish() removed them already; after a failure no half-written file stays
    where = f", one copy for the {share.ranks} processes of this node in {share.folder}" if share is not None else ""
    log(f"{len(done)} layers' experts in {'pinned ' if pin else ''}host memory "
        f"({sum(layer.host.numel() for layer in done) / 1024**3:.2f} GiB{where}), streamed to the device as they run")
    return attach(model, done)


def quantized_linear(weight: torch.Tensor):
    """A bitsandbytes Linear4bit holding `weight` in NF4, made as transformers' bitsandbytes loading makes it."""
    import bitsandbytes as bnb

    linear = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=weight.dtype, compress_statistics=True,
                               quant_type="nf4", quant_storage=torch.uint8, device="meta")
    linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, **linear.weight.__dict__).to(weight.device)
    linear.source_cls = torch.nn.Linear
    return linear.requires_grad_(False)


def install_streamed_layer(model, index: int, linears: dict, pin: bool, share=None) -> StreamedLayer:
    """Give layer `index` its experts ({(expert, "w1"|"w2"|"w3"): Linear4bit}) with their packed data in host memory
    (the node's shared copy when `share`, moe.shared_host, is given)."""
    from mtg_core.moe.layout import ExpertMLP

    experts = model.model.layers[index].mlp.experts
    for expert in range(model.config.num_local_experts):
        with torch.device("meta"):
            mlp = ExpertMLP(model.config)
        for name in ("w1", "w2", "w3"):
            setattr(mlp, name, linears[(expert, name)])
        experts.append(mlp)
    host, params = host_copy(packing_order(experts), pin, share, index)
    for param, _, _ in params:
        param.data = param.data.new_empty(0)  # frees the device copy; ExpertStreamer keeps a shared placeholder
    return StreamedLayer(index, host, params)
