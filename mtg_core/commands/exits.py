"""How every command ends: one line for each error with its exit code (usage 2, stop signals 128 + N, a broken
stdout pipe 141), a stop signal that waits for the training step, and a stderr that outlives its reader."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from contextlib import contextmanager

import click

from mtg_core.errors import MtgError

log = logging.getLogger("mtg_core")


@contextmanager
def _quiet_broken_pipe():
    try:
        yield
    except BrokenPipeError:
        # Python would still flush stdout at exit and print "Exception ignored ... BrokenPipeError".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        sys.exit(141)


class OneLineCommand(click.Command):
    """click prints its usage errors (bad option values, unknown options) on four lines; ours are one line, exit 2.

    A broken stdout pipe (`mtg-eval | head -1`) ends the command quietly, as for other tools (exit 141: SIGPIPE)."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as exc:
            message = exc.format_message()
            click.echo(f"error: {message[:1].lower()}{message[1:]} (see --help)", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    # click answers a broken pipe with exit 1; tools killed by SIGPIPE exit 141. Help is printed while the context is made.
    def make_context(self, *args, **kwargs):
        with _quiet_broken_pipe():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _quiet_broken_pipe():
            return super().invoke(ctx)

    def parse_args(self, ctx, args):
        """An option given twice would silently keep the last value (`--expert a --expert b`): refused."""
        if not ctx.resilient_parsing:
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            seen = set()
            for param in order:
                if isinstance(param, click.Option) and not (param.multiple or param.count or param.is_flag):
                    if param.name in seen:
                        name = max(param.opts, key=len)  # --expert, not -e
                        raise click.UsageError(f"{name} is given more than once; give it once")
                    seen.add(param.name)
        return super().parse_args(ctx, args)



@contextmanager
def reported_errors(debug: bool = False):
    """The project's errors end the command with their one-line message and exit code (--debug: with the traceback).

    OSError is the last resort for a file problem no check foresaw: still one line, naming the file.
    """
    try:
        yield
    except BrokenPipeError:
        raise  # stdout's reader went away (`| head`): OneLineCommand ends quietly
    except (MtgError, OSError) as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, MtgError):
            click.echo(f"{exc.label}: {exc}", err=True)
            sys.exit(exc.exit_code)
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}; check that it exists and is readable/writable (--debug shows where)", err=True)
        sys.exit(2)


class StopNow(BaseException):
    """A stop signal outside a training step: unwinds at once. A BaseException, like KeyboardInterrupt, so that
    no library's `except Exception` swallows it while a model loads or a file is read."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the SSH session or terminal closed


@contextmanager
def stop_on_signals():
    """Before training: stop at once. During a step: finish it, checkpoint, exit 128 + signal (second Ctrl-C: at once).
    While an adapter is being saved: finish saving, then stop."""
    from mtg_core.train import STOP

    def request_stop(signum, frame):
        if STOP.phase == "setup":
            raise StopNow(signum)
        if STOP.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        STOP.signum = signum
        log.warning("%s received: %s (Ctrl-C again to abort)", signal.Signals(signum).name,
                    "stopping after this step and writing a checkpoint" if STOP.phase == "training" else "stopping once the adapter is saved")

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    STOP.signum, STOP.phase = None, "setup"
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StderrWithoutReader:
    """sys.stderr that survives its reader going away (closed SSH session, `2>&1 | head`): the first failed write
    points fd 2 at /dev/null and training goes on; training_log.txt keeps every line. Python has no such mode."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _detach(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ConnectionResetError):
            self._detach()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ConnectionResetError):
            self._detach()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_closed_stderr() -> None:
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (e.g. captured by a test runner): nothing can break
    if not isinstance(sys.stderr, StderrWithoutReader):
        sys.stderr = StderrWithoutReader(sys.stderr)
