"""The real QLoRA path end to end on the embedded tiny Mixtral: NF4 weights, 8-bit optimizer, Trainer, peft."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, Trainer

from conftest import EXPERTS
from mtg_core.base_models import TINY, choose_base, ensure_tiny_mixtral, load_base
from mtg_core.commands.train import train_command
from mtg_core.errors import BaseModelError
from mtg_core.moe import MtgMixtralForCausalLM

FAST = ["--max-samples", "32", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3", "--seq-len", "256"]


def train(*args):
    result = CliRunner().invoke(train_command, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def explain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    result = train("--expert", "EXPLAIN", "--output-dir", str(out), "--max-steps", "12", *FAST)
    assert result.exit_code == 0, result.output
    return out, result


def test_training_lowers_the_loss_and_writes_every_output(explain_run):
    out, result = explain_run
    adapter = out / "explain"
    assert {"adapter_model.safetensors", "adapter_config.json", "training_meta.json", "runs"} <= {p.name for p in adapter.iterdir()}
    meta = json.loads((adapter / "training_meta.json").read_text())
    assert meta["steps"] == 12 and meta["final_loss"] < meta["first_loss"] - 0.1
    assert meta["quantization"] == {"method": "nf4", "quantized_weights": 56, "total_weights": 56}
    assert meta["plugin"] == {"name": "explain", "distribution": "mtg-expert-explain", "version": "0.1.0"}
    assert meta["hyperparameters"]["rank"] == 16 and meta["hyperparameters"]["lr"] == 3e-3
    assert meta["data"]["examples"] == 32 and len(meta["data"]["sha256"]) == 64
    assert meta["peak_memory"]["rss_gib"] > 0 and meta["wall_time_s"] > 0
    log = (out / "training_log.txt").read_text()
    assert "base model: tiny-mixtral" in log.splitlines()[0]
    assert "step 12/12 loss=" in log and "rss_gib=" in log
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no work folders left behind


def test_adapter_loads_with_plain_peft_on_the_stock_base_and_changes_logits(explain_run):
    out, _ = explain_run
    tiny = ensure_tiny_mixtral()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    stock = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    base_logits = stock(ids).logits
    with_adapter = PeftModel.from_pretrained(stock, out / "explain")(ids).logits
    ours = PeftModel.from_pretrained(MtgMixtralForCausalLM.from_pretrained(tiny, dtype=torch.float32), out / "explain")
    assert (with_adapter - base_logits).abs().max() > 1e-2
    # the per-expert adapter means exactly the same on transformers' fused experts
    torch.testing.assert_close(ours(ids).logits, with_adapter, atol=1e-4, rtol=1e-4)


def test_tensorboard_scalars_read_back(explain_run):
    out, _ = explain_run
    (run_dir,) = (out / "explain" / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/memory/rss_gib"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_every_attention_and_expert_weight_of_tiny_mixtral_is_4bit():
    base = load_base(choose_base(TINY), "nf4", log=lambda _: None)
    linear = [n for n, m in base.model.named_modules() if type(m) is torch.nn.Linear]
    assert linear == ["lm_head"]
    assert base.quantization.quantized_weights == base.quantization.total_weights == 2 * (4 + 8 * 3)
    packed = [p for p in base.model.parameters() if type(p).__name__ == "Params4bit"]
    assert len(packed) == 56 and all(p.dtype == torch.uint8 for p in packed)  # never cast to a float type


def test_stock_4bit_load_leaves_experts_unquantised_and_is_refused(monkeypatch):
    monkeypatch.setattr("mtg_core.moe.MtgMixtralForCausalLM", AutoModelForCausalLM)
    with pytest.raises(BaseModelError, match=r"only 8 of 40 .* are 4-bit .*experts.gate_up_proj.*refusing"):
        load_base(choose_base(TINY), "nf4", log=lambda _: None)


def test_tiny_mixtral_is_built_identically_from_its_seed(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first = load_file(ensure_tiny_mixtral() / "model.safetensors")
    monkeypatch.setenv("MTG_CACHE_DIR", str(tmp_path))
    second = load_file(ensure_tiny_mixtral() / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_all_trains_every_expert_on_one_base_load(tmp_path, count_base_loads):
    result = train("--all", "--output-dir", str(tmp_path), "--max-steps", "1", "--max-samples", "4", "--seq-len", "384")
    assert result.exit_code == 0, result.output
    assert len(count_base_loads) == 1
    for name in EXPERTS:
        meta = json.loads((tmp_path / name / "training_meta.json").read_text())
        assert meta["expert"] == name and meta["hyperparameters"]["rank"] in (8, 16)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["r"] == meta["hyperparameters"]["rank"] and config["lora_dropout"] == 0.0


def test_a_failed_run_leaves_the_existing_adapter_byte_identical(explain_run, monkeypatch):
    out, _ = explain_run
    before = {p: p.read_bytes() for p in (out / "explain").rglob("*") if p.is_file()}

    calls, step = [], Trainer.training_step

    def crash(self, *args, **kwargs):  # a crash inside the training loop itself (plugin callbacks are isolated)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash mid-training")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train("--expert", "explain", "--output-dir", str(out), "--max-steps", "5", *FAST)
    after = {p: p.read_bytes() for p in (out / "explain").rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_examples_without_answer_tokens_are_refused(tmp_path):
    result = CliRunner().invoke(train_command, ["--expert", "reason", "--seq-len", "16", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "have no answer tokens left after truncation to --seq-len 16" in result.output
    assert "loaded tiny-mixtral" not in result.output  # refused before the weights load
    assert not (tmp_path / "reason").exists()


@pytest.mark.parametrize(
    "base, message",
    [
        ("./no/such/folder", "no such folder"),
        ("{empty}", "config.json is missing"),
        ("{config_only}", "no tokenizer (tokenizer.json or tokenizer.model)"),
        ("acme/not-a-real-model", "--base-model acme/not-a-real-model: a hub id not in the local Hugging Face cache"),
    ],
)
def test_unloadable_base_models_are_one_clear_error(tmp_path, base, message):
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    base = base.format(empty=tmp_path, config_only=tmp_path / "config_only")
    result = CliRunner().invoke(train_command, ["--expert", "teach", "--base-model", base, "--output-dir", str(tmp_path / "a")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_checkpoint_with_fused_experts_loads_into_the_4bit_layout(tmp_path):
    import shutil

    from safetensors.torch import save_file

    tiny = ensure_tiny_mixtral()
    fused = tmp_path / "fused"
    fused.mkdir()
    for item in tiny.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy2(item, fused / item.name)
    stock = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in stock.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)  # the transformers 5 in-memory layout
    save_file(state, fused / "model.safetensors")
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    plain = load_base(choose_base(str(fused)), "none", log=lambda _: None)
    torch.testing.assert_close(plain.model(ids).logits, stock(ids).logits)
    lines = []
    quantized = load_base(choose_base(str(fused)), "nf4", log=lines.append)
    assert quantized.quantization.quantized_weights == quantized.quantization.total_weights == 56
    assert sum("stores its experts fused" in line for line in lines) == 0  # the per-expert copy was made once, above
