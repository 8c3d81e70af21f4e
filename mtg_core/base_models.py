"""Base models: presets, the embedded tiny Mixtral, and loading in NF4 with every weight matrix 4-bit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import attrs

from mtg_core.distributed import local_rank
from mtg_core.errors import BaseModelError

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
TINY = "tiny-mixtral"
PRESETS = {
    TINY: None,  # built locally, see ensure_tiny_mixtral
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x7b-instruct": "mistralai/Mixtral-8x7B-Instruct-v0.1",
}
# Mixtral's architecture (MoE block with a router over 8 experts, top-2) at a size that trains on a CPU.
TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
TINY_SEED = 1234
BASE_MODEL_ENV = "MTG_BASE_MODEL"  # the default base when --base-model is not given
TINY_LR = 2e-3  # default learning rate on the tiny base: its random weights need bigger LoRA steps than Mixtral
# Weight matrices that must be 4-bit under --quant nf4; router, norms, embeddings and lm_head may stay bf16.
QUANTIZED_PARTS = (".self_attn.", ".experts.")


@attrs.frozen
class BaseChoice:
    """Which base to use: `name` as the user gave it, `location` a folder or hub id, and why it was chosen."""

    name: str
    location: str
    reason: str

    @property
    def identity(self) -> str:
        """What adapters record as their base: presets and hub ids by name, local folders by path, so an
        adapter of a preset still matches under another HOME, MTG_CACHE_DIR, user or machine."""
        if self.name == TINY:
            return TINY
        return PRESETS.get(self.name) or self.location

    @property
    def fingerprint(self) -> str | None:
        """For the built tiny model: the hash of what determines its weights (two builds must not be confused)."""
        return tiny_dir().name.rsplit("-", 1)[-1] if self.name == TINY else None


@attrs.frozen
class QuantizationReport:
    method: str
    quantized_weights: int
    total_weights: int
    first_unquantized: str | None = None


@attrs.define
class LoadedBase:
    """A loaded base; `model` is swapped for the LoRA-free base after each expert of --all."""

    model: object
    tokenizer: object
    choice: BaseChoice
    quantization: QuantizationReport
    device: str
    compute_dtype: str


def cache_dir() -> Path:
    return Path(os.environ.get("MTG_CACHE_DIR") or Path.home() / ".cache" / "mtg_core")


def tiny_dir() -> Path:
    """The tiny model's folder, named by what determines its weights, so a changed recipe rebuilds."""
    recipe = json.dumps([TINY_CONFIG, TINY_SEED], sort_keys=True).encode() + (TOKENIZER_DIR / "tokenizer.json").read_bytes()
    return cache_dir() / f"{TINY}-{hashlib.sha256(recipe).hexdigest()[:12]}"


@contextmanager
def cache_errors():
    """A cache that cannot be written (HOME read-only, MTG_CACHE_DIR a file, disk full) is one clear line."""
    try:
        yield
    except OSError as exc:
        raise BaseModelError(
            f"cannot write the model cache {cache_dir()} ({exc.strerror or exc}); "
            "set MTG_CACHE_DIR to a writable folder"
        ) from None


def default_base() -> BaseChoice:
    import torch

    if os.environ.get(BASE_MODEL_ENV):
        name = os.environ[BASE_MODEL_ENV]
        return choose_base(name, reason=f"set by ${BASE_MODEL_ENV}", given_as=f"${BASE_MODEL_ENV}={name}")
    if torch.cuda.is_available():
        return choose_base("mixtral-8x7b", reason=f"a CUDA GPU is present ({torch.cuda.get_device_name(0)})")
    return choose_base(TINY, reason="no CUDA GPU: the embedded tiny Mixtral trains on the CPU; pass --base-model to change")


def choose_base(name: str, reason: str = "chosen with --base-model", given_as: str | None = None) -> BaseChoice:
    """Resolve a preset, a local folder or a hub id, checking a local folder has what loading needs.

    `given_as`: where the name came from, for messages (default: --base-model NAME)."""
    given_as = given_as or f"--base-model {name}"
    if name in PRESETS:
        return BaseChoice(name, PRESETS[name] or str(tiny_dir()), f"{reason} (preset)")
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):  # hub ids look like "org/name"
        if path.exists() and not path.is_dir():
            raise BaseModelError(f"{given_as}: is a file; give the model's folder (config.json, *.safetensors, tokenizer), a hub id or a preset ({', '.join(PRESETS)})")
        if not path.is_dir():
            raise BaseModelError(f"{given_as}: no such folder; give a model folder, a hub id or a preset ({', '.join(PRESETS)})")
        if not (path / "config.json").is_file():
            raise BaseModelError(f"{given_as}: {path / 'config.json'} is missing; the folder must hold a transformers model (config.json, *.safetensors, tokenizer)")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            raise BaseModelError(f"{given_as}: no tokenizer (tokenizer.json or tokenizer.model) in {path}; copy the tokenizer files of the model into it")
        return BaseChoice(name, str(path.resolve()), f"{reason} (local folder)")
    _require_hub_download(name, given_as)
    return BaseChoice(name, name, f"{reason} (hub id)")


def _require_hub_download(repo_id: str, given_as: str) -> None:
    """A hub id not in the local cache needs the hub: offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), or with the
    hub unreachable, say so at once, instead of huggingface_hub's retries and transformers' long error."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    fix = f"download it where the hub is reachable (hf download {repo_id}), or give a local folder or a preset ({', '.join(PRESETS)})"
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except HFValidationError:
        raise BaseModelError(f"{given_as}: not a preset, a folder or a hub id (org/name); give one of those") from None
    if constants.HF_HUB_OFFLINE:
        raise BaseModelError(f"{given_as}: a hub id not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; {fix}")
    try:
        model_info(repo_id, timeout=10)
    except Exception as exc:  # any failure here (no network, no such repo, no access) stops before minutes of work
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BaseModelError(f"{given_as}: a hub id not in the local Hugging Face cache, and the hub cannot serve it ({reason}); {fix}") from None


def base_config(choice: BaseChoice):
    """The transformers config of a base, without its weights: shipped for the presets, so offline."""
    from transformers import AutoConfig, AutoTokenizer, MixtralConfig

    if choice.name == TINY:
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        return MixtralConfig(vocab_size=len(tokenizer), **TINY_CONFIG)
    if choice.name in PRESETS:
        return MixtralConfig.from_json_file(ASSETS / "configs" / "mixtral-8x7b.json")
    try:
        return AutoConfig.from_pretrained(choice.location, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot read the config of {choice.name!r}: {str(exc).splitlines()[0]}") from None


def device_and_dtype():
    """("cuda" or "cpu", compute dtype): bf16 where the GPU supports it, fp32 on the CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return "cpu", torch.float32


def free_memory(device: str) -> int:
    import psutil
    import torch

    return torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available


def ensure_tiny_mixtral() -> Path:
    """Build the embedded tiny Mixtral once (fixed seed, shipped tokenizer) and return its folder."""
    target = tiny_dir()
    if (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    torch.manual_seed(TINY_SEED)
    model = MixtralForCausalLM(config)
    # Build beside the target and rename, so a concurrent or interrupted build never leaves half a model.
    with cache_errors():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{TINY}-", dir=target.parent))
        model.save_pretrained(staging)  # transformers writes the hub layout: block_sparse_moe.experts.N.w1/w2/w3
        tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process built it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def count_quantized(model) -> QuantizationReport:
    """Count the attention and expert weight matrices, and how many of them are 4-bit.

    A fused 3-D expert tensor (the stock transformers 5 layout) counts one matrix per expert.
    """
    quantized = total = 0
    first = None
    for name, param in model.named_parameters():
        if not name.endswith(("weight", "_proj")) or not any(part in f".{name}" for part in QUANTIZED_PARTS) or "lora_" in name:
            continue
        matrices = param.shape[0] if param.dim() == 3 else 1
        total += matrices
        if type(param).__name__ == "Params4bit":
            quantized += matrices
        elif first is None:
            first = name
    method = "nf4" if quantized else "none"
    return QuantizationReport(method, quantized, total, first)


def _unloadable(choice: BaseChoice, exc: Exception) -> BaseModelError:
    return BaseModelError(
        f"cannot load base model {choice.name!r}: {str(exc).splitlines()[0]}; without network give a local "
        f"folder (config.json, *.safetensors, tokenizer) or the preset {TINY}"
    )


def load_tokenizer(choice: BaseChoice):
    """The base's tokenizer (cheap: lets the data be checked before any weights load)."""
    from transformers import AutoTokenizer

    if choice.name == TINY:
        ensure_tiny_mixtral()
    elif PRESETS.get(choice.name):  # the first download a preset needs (its config ships with mtg_core)
        _require_hub_download(choice.location, f"the preset {choice.name} ({choice.location})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(choice.location, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _unloadable(choice, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def unfused_copy(folder: Path, log: Callable[[str], None]) -> Path:
    """The hub-layout copy of a fused-expert checkpoint, made once in the cache (see moe.unfuse_checkpoint)."""
    from mtg_core.moe import unfuse_checkpoint

    stamp = "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.glob("*.safetensors")))
    target = cache_dir() / "unfused" / hashlib.sha256(f"{folder.resolve()}|{stamp}".encode()).hexdigest()[:16]
    if not (target / "model.safetensors.index.json").is_file():
        log(f"{folder} stores its experts fused; writing a per-expert copy once to {target}")
        with cache_errors():
            cache_dir().mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".unfused-", dir=cache_dir()))
            unfuse_checkpoint(folder, staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return target


def load_base(choice: BaseChoice, quant: str, log: Callable[[str], None] = print, tokenizer=None,
              streamed_layers: tuple[int, ...] = ()) -> LoadedBase:
    """Load the base for training: per-expert Linear layout for Mixtral, NF4 quantised while loading.

    `streamed_layers`: layers whose NF4 experts go to host memory as they are quantised (the memory plan's
    choice for --offload-experts); they never sit on the device all at once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from mtg_core.moe import MtgMixtralForCausalLM, has_fused_experts

    device, dtype = device_and_dtype()
    cuda = device == "cuda"
    tokenizer = tokenizer or load_tokenizer(choice)
    try:
        config = AutoConfig.from_pretrained(choice.location, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _unloadable(choice, exc) from None
    model_class = MtgMixtralForCausalLM if config.model_type == "mixtral" else AutoModelForCausalLM
    location = choice.location
    if model_class is MtgMixtralForCausalLM and Path(location).is_dir() and has_fused_experts(location):
        location = unfused_copy(Path(location), log)
    if streamed_layers and (model_class is not MtgMixtralForCausalLM or quant != "nf4"):
        raise BaseModelError(f"{choice.name}: streaming experts from host memory needs a Mixtral model in nf4; use --offload-experts none")
    if streamed_layers:
        config.mtg_streamed_layers = list(streamed_layers)  # MtgMixtralModel leaves their experts to moe.streaming
    quantization_config = None
    if quant == "nf4":
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model, info = model_class.from_pretrained(
            location,
            config=config,
            dtype=dtype,
            quantization_config=quantization_config,
            device_map={"": local_rank()} if cuda else None,  # each torchrun rank: its own GPU
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot load the weights of {choice.name!r}: {str(exc).splitlines()[0]}") from None
    if info["missing_keys"]:
        raise BaseModelError(
            f"{choice.name}: the checkpoint lacks {len(info['missing_keys'])} weights (e.g. {sorted(info['missing_keys'])[0]}); "
            "the 4-bit Mixtral loads the hub layout (experts.N.w1/w2/w3) or fused experts (experts.gate_up_proj/down_proj)"
        )
    if streamed_layers:
        from mtg_core.moe.loading import load_streamed_experts

        load_streamed_experts(model, location, list(streamed_layers), dtype, log)
    report = count_quantized(model)
    if quant == "nf4" and report.quantized_weights < report.total_weights:
        raise BaseModelError(
            f"{choice.name}: only {report.quantized_weights} of {report.total_weights} attention/expert weight matrices "
            f"are 4-bit (first bf16 one: {report.first_unquantized}); refusing to train a half-quantised model. "
            "Use --quant none, or a model whose layers are nn.Linear"
        )
    log(
        f"loaded {choice.name} on {device} ({str(dtype).removeprefix('torch.')} compute): "
        f"{report.quantized_weights}/{report.total_weights} attention and expert weight matrices in {report.method}"
    )
    return LoadedBase(model, tokenizer, choice, report, device, str(dtype).removeprefix("torch."))
