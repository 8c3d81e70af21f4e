"""The console scripts. A Ctrl-C while a command still imports its modules (before click runs and answers it with
exit 130) would print Python's bare KeyboardInterrupt traceback: here it ends the command quietly with 130.
Only the standard library is imported before that guard (--help stays torch-free: the command module is the CLI's)."""

import importlib
import sys


def _run(module: str, command: str):
    try:
        main = getattr(importlib.import_module(module), command)
    except KeyboardInterrupt:
        sys.exit(130)
    return main()


def train():
    return _run("mtg_core.commands.train", "train_command")


def new_expert():
    return _run("mtg_core.commands.new_expert", "new_expert_command")


def evaluate():
    return _run("mtg_core.commands.eval", "eval_command")


def ask():
    return _run("mtg_core.commands.ask", "ask_command")


def export():
    return _run("mtg_core.commands.export", "export_command")


def doctor():
    return _run("mtg_core.commands.doctor", "doctor_command")
