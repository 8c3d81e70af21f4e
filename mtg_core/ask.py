"""mtg-ask's run: one question, or an interactive session that keeps every usable adapter on one loaded base."""

from __future__ import annotations

from pathlib import Path

import click

from mtg_core.errors import ConfigError, MtgError
from mtg_core.plugins import Registry


def ask(question, name, interactive, base_model, adapters: Path, max_new_tokens: int, quant: str, offload="auto", gpu_memory=None,
        host_memory=None) -> None:
    """Answer `question` with expert `name`, or (interactive) each line of stdin, switching experts on '/expert NAME'."""
    from mtg_core.evaluate import attach_adapters, check_adapter, generate, prompt_for
    from mtg_core.run import base_for, finish_installs, inference_run

    if question is not None and not question.strip():
        raise ConfigError('the question is empty; ask one (e.g. mtg-ask --expert explain "What does trample do?")')
    if interactive == bool(question):
        raise ConfigError('give a question, or --interactive (e.g. mtg-ask --expert explain "What does trample do?")')
    registry = Registry.discover()
    finish_installs(adapters, [e.name for e in (registry.experts() if interactive else [registry.expert(name)] if name else [])])
    broken: dict[str, str] = {}
    if interactive:
        experts = _usable_experts(registry, adapters, broken)
    else:
        experts = [registry.expert(name)] if name else []
        if not experts:
            raise ConfigError("give --expert NAME (see mtg-train --list)")
    choice = base_for(adapters, experts, base_model)
    folders = {}
    for expert in experts:
        try:
            folders[expert.name] = check_adapter(adapters, expert.name, choice)
        except MtgError as exc:
            if not interactive:
                raise
            broken[expert.name] = str(exc)  # in a session, a bad adapter costs only its expert
            click.echo(f"warning: {expert.name} not loaded: {exc}", err=True)
    experts = [e for e in experts if e.name in folders]
    if name and name.lower() in broken:
        raise ConfigError(f"--expert {name}: {broken[name.lower()]}")
    if not experts:
        raise ConfigError(f"no usable adapters in {adapters}: every one has a problem (above); retrain with mtg-train --expert NAME")
    current = registry.expert(name) if name else experts[0]
    if current.name not in folders:  # before the base loads
        raise ConfigError(f"no adapter for {current.name} in {adapters}")
    run = inference_run(registry, experts, choice, quant, offload, gpu_memory, host_memory)
    base = run.load_base(lambda line: click.echo(line, err=True))
    model = attach_adapters(base.model, folders)
    from transformers import TextStreamer

    streamer = TextStreamer(base.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def answer(text: str) -> None:
        model.set_adapter(current.name)
        generate(model, base.tokenizer, prompt_for(registry, current, text), max_new_tokens, streamer)

    if not interactive:
        answer(question)
        return
    by_name = {e.name: e for e in experts}
    click.echo(f"experts loaded: {', '.join(folders)}; '/expert NAME' switches, '/quit' ends", err=True)
    stdin = click.get_binary_stream("stdin")  # bytes: one line that is not UTF-8 must not end the session
    for number, line in enumerate(_prompted_lines(stdin, lambda: current.name), 1):
        try:
            line = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            click.echo(f"error: input line {number} is not UTF-8 text (byte {line[exc.start]:#04x} at position "
                       f"{exc.start}); skipped it, ask again in UTF-8", err=True)
            continue
        if line == "/quit":
            return
        if line.startswith("/expert"):
            wanted = line.removeprefix("/expert").strip().lower()
            if wanted in by_name:
                current = by_name[wanted]
            elif wanted in broken:
                click.echo(f"{wanted} is not loaded: {broken[wanted]}; still {current.name}", err=True)
            else:
                click.echo(f"no adapter loaded for {wanted!r}; loaded: {', '.join(folders)}; still {current.name}", err=True)
        elif line:
            try:
                answer(line)
            except MtgError as exc:  # a plugin failing on one question costs that answer only
                click.echo(f"{exc.label}: {exc}", err=True)


def _usable_experts(registry: Registry, adapters: Path, broken: dict[str, str]) -> list:
    """--interactive: every expert with an adapter whose plugin passes the checks of --list (template, data,
    hooks) before the base loads; each broken one is a warning line, recorded in `broken`, and is not loaded."""
    experts = []
    for candidate in registry.experts():
        if not (adapters / candidate.name / "adapter_config.json").is_file():
            continue
        try:
            experts.append(registry.expert(candidate.name))
        except MtgError as exc:
            broken[candidate.name] = str(exc)
            click.echo(f"warning: {candidate.name} not loaded: {exc}", err=True)
    if not experts and not broken:
        raise ConfigError(f"no trained adapters in {adapters}; train one with mtg-train --expert NAME")
    return experts


def _prompted_lines(stdin, current):
    """Input lines as bytes, each after a '[expert]> ' prompt; ends the prompt's line at end of input."""
    while True:
        click.echo(f"[{current()}]> ", nl=False, err=True)
        line = stdin.readline()
        if not line:
            click.echo("", err=True)
            return
        yield line
