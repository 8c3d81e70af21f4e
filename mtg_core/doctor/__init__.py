"""`mtg-doctor`: does this machine run mtg_core's GPU path right? The environment, then one line per check.

Like `accelerate env` and `python -m bitsandbytes`, plus a correctness test of our own path on a small
Mixtral-shaped model (mtg_core.doctor.checks). Runs on the CPU too: the checks that need CUDA say SKIP and why.
Exit 1 when a check fails.
"""

from __future__ import annotations

import platform
import resource
from importlib.metadata import PackageNotFoundError, version

GIB = 1024**3


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as file:
            return " ".join(file.readline().split()[:8])
    except OSError:
        return "unknown (no /proc/driver/nvidia/version)"


def bitsandbytes_kernels(device: str) -> str:
    """Whether bitsandbytes' NF4 kernels run here: one quantise/dequantise round trip."""
    import torch

    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as exc:  # noqa: BLE001 - any failure to load or run them is what this line reports
        return f"do NOT load on {device}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return f"load and run on {device}"


def pinned_bandwidth() -> str:
    """Host -> device GB/s from 256 MiB of pinned memory (pinned as streaming pins it)."""
    import torch

    from mtg_core.moe.streaming import pinned_empty

    size = 256 * 1024**2
    host = pinned_empty(size)
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(4):
        device.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return f"{4 * size / (start.elapsed_time(end) / 1000) / 1e9:.1f} GB/s"


def environment(bench) -> dict[str, str]:
    import psutil
    import torch

    from mtg_core.doctor.checks import BATCH, LORA_DROPOUT, SEQ
    from mtg_core.moe.grouped import _choose_backend

    env = {
        "python": f"{platform.python_version()} ({platform.platform()})",
        "torch": f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}",
    }
    if bench.cuda:
        major, minor = torch.cuda.get_device_capability()
        free, total = torch.cuda.mem_get_info()
        env.update({
            "driver": _driver(),
            "gpu": f"{torch.cuda.get_device_name()} (sm{major}{minor}), {free / GIB:.1f} of {total / GIB:.1f} GiB free",
            "bf16": "native" if torch.cuda.is_bf16_supported(including_emulation=False) else "emulated or absent: training runs in fp32",
        })
    else:
        env.update({"driver": "no CUDA device", "gpu": "none: the checks run on the CPU", "bf16": "not used on the CPU (fp32)"})
    memory = psutil.virtual_memory()
    memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    env.update({
        "bitsandbytes": f"{_version('bitsandbytes')}, kernels {bitsandbytes_kernels(bench.device)}",
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "accelerate": _version("accelerate"),
        "moe backend": "{} ({})".format(*_choose_backend(torch.device(bench.device), bench.dtype)),
        "host ram": f"{memory.available / GIB:.1f} of {memory.total / GIB:.1f} GiB available (streamed experts are pinned "
                    "from it; mtg-train --plan checks the pinned total against it)",
        "memlock limit": "unlimited" if memlock == resource.RLIM_INFINITY else f"{memlock / GIB:.2f} GiB (CUDA pins through its driver, not mlock)",
        "h2d bandwidth": pinned_bandwidth() if bench.cuda else "not measured: no CUDA device",
        "model": f"{bench.config.num_hidden_layers} Mixtral layers, {bench.widths}, {str(bench.dtype).removeprefix('torch.')}, "
                 f"{BATCH} x {SEQ} tokens, LoRA r16 dropout {LORA_DROPOUT}",
    })
    return env
