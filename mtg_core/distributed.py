"""Where this process stands under torchrun / accelerate launch, from the environment they set (no torch import)."""

from __future__ import annotations

import os


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its node: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """The processes of this node (1 when not distributed)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
