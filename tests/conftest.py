import json
import os
import shutil
import sys
from pathlib import Path

import pytest

# Set before anything imports huggingface_hub, which reads them once at import.
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")

from mtg_core import ExpertInfo, LoraSettings, hookimpl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = ("reason", "explain", "teach", "predict", "retrospect")


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory):
    """Tests never touch the network or the user's cache: the tiny model is built once per session."""
    os.environ["MTG_CACHE_DIR"] = str(tmp_path_factory.mktemp("mtg-cache"))
    os.environ["MTG_BASE_MODEL"] = "tiny-mixtral"  # on a CUDA machine the default would be Mixtral-8x7B
    os.environ.pop("MTG_PLUGINS", None)


class ToyExpert:
    """A minimal hand-written plugin (no PackagedExpert), as a third party might write one."""

    def __init__(self, name="toy", rank=4, data_dir=None):
        self.name, self.rank, self.data_dir = name, rank, data_dir

    @hookimpl
    def mtg_register_experts(self):
        return [ExpertInfo(self.name, "A toy expert for tests")]

    @hookimpl
    def mtg_lora_settings(self, expert):
        return LoraSettings(rank=self.rank, alpha=2 * self.rank, dropout=0.0) if expert == self.name else None


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_dist(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None) -> Path:
    """Install a distribution the way pip would leave it: modules plus a .dist-info with real entry points."""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[mtg_core]\n{lines}")
    for relative, source in (modules or {}).items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_text(source)
    return site


def cli_env(*sites: Path, **extra) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, sites), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def count_base_loads(monkeypatch):
    """The paths every base-model load read from (MtgMixtralForCausalLM.from_pretrained calls)."""
    from mtg_core.moe import MtgMixtralForCausalLM

    loads = []
    original = MtgMixtralForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(MtgMixtralForCausalLM, "from_pretrained", classmethod(counting))
    return loads


def add_plugin(monkeypatch, plugin, name="test-plugin"):
    """Make Registry.discover() also register `plugin`, as if it were installed."""
    from mtg_core.plugins import Registry

    discover = Registry.discover.__func__

    def patched(cls):
        registry = discover(cls)
        registry.register(plugin, name)
        return registry

    monkeypatch.setattr(Registry, "discover", classmethod(patched))


MTG_TRAIN = [sys.executable, "-c", "from mtg_core.commands.train import train_command; train_command()"]


# A 2-step explain run on 8 examples: the quickest real training.
QUICK = ["--expert", "explain", "--max-samples", "8", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "128", "--max-steps", "2"]


def with_option(args, option: str, value: str) -> list[str]:
    """`args` with `option`'s value replaced (every command refuses an option given twice)."""
    at = args.index(option)
    return [*args[:at + 1], value, *args[at + 2:]]


def tiny_mixtral_folder(folder: Path, layers: int, **save) -> Path:
    """A random tiny Mixtral (seed 0) of `layers` layers with the shipped tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from mtg_core.base_models import TINY_CONFIG, TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), **{**TINY_CONFIG, "num_hidden_layers": layers})).save_pretrained(folder, **save)
    tokenizer.save_pretrained(folder)
    return folder


def adapters_with(tmp_path: Path, trained: Path, name: str = "adapters") -> Path:
    """A fresh adapters folder holding a copy of the `trained` explain adapter."""
    out = tmp_path / name
    shutil.copytree(trained, out / "explain")
    return out
