"""What a command runs on, decided once before any weights load and carried down.

The experts, the base (the one walk of --base-model), the settings, the memory plans (and with them the
streamed layers and the expert chunk) and the tokenizer make a frozen `Run`; `Run.load_base` loads the
base that way. mtg-train, mtg-eval and mtg-ask build one; nothing below them decides these again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import attrs
import click

from mtg_core.errors import ConfigError, MtgError
from mtg_core.experts import LoraSettings
from mtg_core.plugins import ALLOW_LIST_ENV, Expert, Registry

log = logging.getLogger("mtg_core")


@attrs.frozen
class TrainOptions:
    """The settings of a run (eval and ask use the memory ones); ranges are checked by the CLI before anything loads."""

    epochs: float = 3.0
    max_steps: int | None = None
    max_samples: int | None = None
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    seed: int = 42
    quant: str = "nf4"
    save_steps: int | None = None
    offload_experts: str = "auto"  # stream NF4 experts from host memory: auto (as needed), none, all
    gpu_memory: float | None = None  # GiB to plan for; None: the device's free memory
    host_memory: float | None = None  # GiB of host RAM to plan for; None: what is available

    @classmethod
    def given(cls, hyper: dict) -> TrainOptions:
        """The options the command line or config file gave (None: not given, the default here applies)."""
        return cls(**{k: v for k, v in hyper.items() if v is not None})


@attrs.frozen
class Run:
    """One command's experts on one base: `plans` holds each expert's memory plan, made while the device was free."""

    registry: Registry
    experts: tuple[Expert, ...]
    choice: object  # base_models.BaseChoice
    options: TrainOptions
    plans: tuple
    tokenizer: object = None  # None: load_base loads it

    @classmethod
    def planned(cls, registry: Registry, experts, choice, options: TrainOptions, tokenizer=None, inference: bool = False,
                loras: list[LoraSettings] | None = None) -> Run:
        loras = loras or [registry.lora_settings(expert) for expert in experts]
        return cls(registry, tuple(experts), choice, options, tuple(memory_plans(choice, experts, loras, options, inference)), tokenizer)

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        """The layers whose experts stream from host memory: the most any expert's plan needs (one base serves all)."""
        return max((plan.streamed_layers for plan in self.plans), key=len, default=())

    def load_base(self, say):
        """The base, loaded as the plans say: their streamed layers, and experts dequantised in the smallest chunk any needs."""
        from mtg_core.base_models import load_base
        from mtg_core.moe.streaming import set_expert_chunk

        base = load_base(self.choice, self.options.quant, say, self.tokenizer, streamed_layers=self.streamed_layers)
        chunks = [plan.expert_chunk for plan in self.plans if plan.expert_chunk is not None]
        if chunks:
            say(f"experts dequantised {min(chunks)} of {self.plans[0].experts} at a time (the memory plan's chunk)")
        set_expert_chunk(base.model, min(chunks, default=None), "group" if any(plan.staging == "group" for plan in self.plans) else "layer")
        return base


def select_experts(registry: Registry, name: str | None, all_experts: bool) -> list[Expert]:
    """--expert NAME or --all; under --all a broken third-party expert costs only itself (a warning)."""
    if bool(name) == bool(all_experts):
        raise ConfigError("give --expert NAME or --all (see --list for the installed experts)")
    if name:
        return [registry.expert(name)]
    experts = []
    for candidate in registry.experts():
        try:
            experts.append(registry.expert(candidate.name))
        except MtgError as exc:
            click.echo(f"warning: --all skips {candidate.name}: {exc}", err=True)
    if not experts:
        raise ConfigError(f"no experts installed; pip install ./mtg_expert_<name> (or check ${ALLOW_LIST_ENV})")
    return experts


def base_for(adapters: Path | None, experts, base_model: str | None):
    """The base: --base-model, else the one the (first) adapter in `adapters` was trained on, else the machine's default."""
    from mtg_core.base_models import choose_base, default_base
    from mtg_core.evaluate import check_adapter_files, recorded_base

    if base_model:
        return choose_base(base_model)
    for expert in experts if adapters is not None else ():  # training has no adapters to ask
        if (adapters / expert.name / "adapter_config.json").is_file():
            recorded = recorded_base(check_adapter_files(adapters, expert.name))
            if recorded is not None:
                return recorded
    return default_base()


def finish_installs(adapters: Path, names) -> None:
    """Before reading adapters: finish an install a kill interrupted (unless a live run is doing it), telling the user."""
    from mtg_core.outputs import recover_unlocked

    for name in names:
        recover_unlocked(adapters, name, lambda line: click.echo(f"warning: {line}", err=True))


def memory_plan(choice, lora: LoraSettings, options: TrainOptions, *, rent: bool = False, inference: bool = False,
                expert: Expert | None = None):
    """The run's memory plan on this machine (or the --gpu-memory / --host-memory budgets), and settings that
    would fit when it does not. rent: on a machine without a GPU, --gpu-memory stands for a CUDA GPU about to be
    rented (bf16, CUDA context) and --host-memory for that machine's RAM (mtg-train --plan). `expert`: whose LoRA
    settings these are, named when its target_modules match no layer."""
    import psutil

    from mtg_core.base_models import base_config, device_and_dtype, free_memory
    from mtg_core.moe.shared_host import node_host_budget
    from mtg_core.plan import GIB, meta_model, plan_memory, settings_that_fit
    from mtg_core.plugins.targets import check_targets

    config = base_config(choice)
    who = f"plugin {expert.plugin!r} ({expert.distribution}), expert {expert.name!r}: " if expert else ""
    check_targets(lora.target_modules, meta_model(config), choice.name, who)  # peft would skip a wrong one silently
    device, dtype = device_and_dtype()
    compute_bytes = dtype.itemsize
    host = psutil.virtual_memory().available
    if rent and device == "cpu" and options.gpu_memory is not None:
        device, compute_bytes, budget = "cuda", 2, int(options.gpu_memory * GIB)  # the GPUs mtg-train targets run bf16
        if options.host_memory is not None:
            host = int(options.host_memory * GIB)
    else:
        budget = free_memory(device)
        if options.gpu_memory is not None:
            budget = min(budget, int(options.gpu_memory * GIB))
        if options.host_memory is not None:
            host = min(host, int(options.host_memory * GIB))
        host = node_host_budget(host)  # one copy of the streamed experts per node, in its shared-memory folder

    def plan_for(batch_size: int, seq_len: int, offload: str = options.offload_experts):
        return plan_memory(config, lora.target_modules, lora.rank, options.quant, batch_size, seq_len, compute_bytes,
                           device, budget, offload=offload, grad_accum=options.grad_accum, host_free_bytes=host,
                           training=not inference)

    plan = plan_for(options.batch_size, options.seq_len)
    if plan.fits:
        return plan, None
    if options.offload_experts == "none" and options.quant == "nf4":  # what streaming experts would make fit
        streamed = plan_for(options.batch_size, options.seq_len, "auto")
        if streamed.fits:
            return plan, (f"--offload-experts auto (streams the experts of {streamed.offloaded_layers} of "
                          f"{config.num_hidden_layers} layers from host memory)")
        smaller = settings_that_fit(lambda batch, seq: plan_for(batch, seq, "auto"), options.batch_size, options.grad_accum, options.seq_len)
        return plan, f"--offload-experts auto {smaller}" if smaller else None
    return plan, settings_that_fit(plan_for, options.batch_size, options.grad_accum, options.seq_len)


def memory_plans(choice, experts, loras, options: TrainOptions, inference: bool = False) -> list:
    """Each expert's memory plan, made before the base loads (while the device's memory is still free)."""
    plans = []
    for expert, lora in zip(experts, loras):
        plan, advice = memory_plan(choice, lora, options, inference=inference, expert=expert)
        if not plan.fits:
            log.warning("%s: the memory plan (%.2f GiB) does not fit the %.2f GiB %s; %s", expert.name, plan.total_bytes / 1024**3,
                        plan.device_free_bytes / 1024**3, "budget" if options.gpu_memory else "free", f"to fit: {advice}" if advice else "see --plan")
        plans.append(plan)
    return plans


def inference_run(registry: Registry, experts, choice, quant: str, offload: str, gpu_memory: float | None, host_memory: float | None = None,
                  seq_len: int = 512, batch_size: int = 1, tokenizer=None) -> Run:
    """mtg-eval's and mtg-ask's run: the inference plan of `batch_size` sequences of `seq_len` tokens (no LoRA gradients,
    no optimizer state, no checkpointed hidden states: see plan.plan_memory's `training`)."""
    options = TrainOptions(batch_size=batch_size, grad_accum=1, seq_len=seq_len, quant=quant, offload_experts=offload, gpu_memory=gpu_memory,
                           host_memory=host_memory)
    return Run.planned(registry, experts, choice, options, tokenizer, inference=True)
