"""The generic trainer: any registered expert, the seed's memory-optimised QLoRA recipe, on transformers' Trainer.

`recipe.py` reads top to bottom: prepare (data and settings, before any weights load: `prepare.py`, and
`resume.py` for --resume), train (peft LoRA on the loaded base, transformers' Trainer as `trainer.py` sets it
up), save (adapter, metadata, TensorBoard) into a work folder that replaces the old adapter only when
everything succeeded.
"""

from mtg_core.train.recipe import train_expert, train_experts
from mtg_core.train.resume import continue_command
from mtg_core.train.trainer import STOP

__all__ = ["STOP", "continue_command", "train_expert", "train_experts"]
