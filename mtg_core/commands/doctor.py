"""`mtg-doctor`: does this machine run mtg_core's GPU path right? (mtg_core.doctor: the environment and the checks.)"""

from __future__ import annotations

import json
import sys
import time

import click

from mtg_core.commands.exits import OneLineCommand


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="One JSON object: environment, checks, ok.")
def doctor_command(as_json: bool) -> None:
    """Check that this machine runs mtg_core's GPU path right: environment, then PASS/FAIL/SKIP per check.

    Include its output in a bug report. Exit 1 when a check fails."""
    from mtg_core.doctor import environment
    from mtg_core.doctor.checks import FAIL, bench, run_checks

    started = time.perf_counter()
    setup = bench()
    env = environment(setup)
    results = run_checks(setup)
    ok = not any(r["status"] == FAIL for r in results)
    if as_json:
        click.echo(json.dumps({"environment": env, "checks": results, "ok": ok, "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    else:
        width = max(map(len, env))
        for key, value in env.items():
            click.echo(f"{key:<{width}}  {value}")
        click.echo("")
        for result in results:
            click.echo(f"{result['status']}  {result['check']}: {result['reason']} ({result['seconds']:.1f}s)")
        click.echo(f"\n{'all checks passed' if ok else 'a check FAILED'} in {time.perf_counter() - started:.0f}s")
    sys.exit(0 if ok else 1)
