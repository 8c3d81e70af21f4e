"""mtg_core: the plugin host and generic QLoRA trainer for MTG reasoning-mode experts.

This module imports no torch: `mtg-train --help` and plugin discovery must stay fast.
"""

from mtg_core.experts import DataFiles, ExpertInfo, FormattedExample, LoraSettings, PackagedExpert
from mtg_core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["DataFiles", "ExpertInfo", "FormattedExample", "LoraSettings", "PackagedExpert", "hookimpl"]
