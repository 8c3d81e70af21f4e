"""mtg-export on the tiny base: merged weights, vLLM adapters and llama.cpp GGUF adapters mean what the adapter means."""

import json
import shlex
import shutil
import subprocess
import sys

import attrs
import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from mtg_core.base_models import TINY_CONFIG, choose_base, ensure_tiny_mixtral
from mtg_core.commands.export import export_command
from mtg_core.commands.train import train_command
from mtg_core.export import ExportError, checkpoint_folder, load_adapter
from mtg_core.moe import MtgMixtralForCausalLM

LAYERS, EXPERTS = TINY_CONFIG["num_hidden_layers"], TINY_CONFIG["num_local_experts"]
HIDDEN, FFN = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]
HEADS, KV_HEADS = TINY_CONFIG["num_attention_heads"], TINY_CONFIG["num_key_value_heads"]
HEAD_DIM = HIDDEN // HEADS
RANK, ALPHA = 16, 32.0  # the explain expert's LoRA settings
IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])


def run_export(*args):
    return CliRunner().invoke(export_command, [str(a) for a in args])


def randomise_b(folder, seed):
    """Freshly trained B matrices are nearly zero; random ones make every adapted matrix change the output."""
    path = folder / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * 0.05 if ".lora_B." in k else v for k, v in load_file(path).items()}
    save_file(tensors, path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """adapters/explain as mtg-train writes it (one step), and adapters/teach, a copy with other B matrices."""
    out = tmp_path_factory.mktemp("adapters")
    result = CliRunner().invoke(train_command, ["--expert", "explain", "--output-dir", str(out), "--max-steps", "1",
                                                "--max-samples", "4", "--batch-size", "4", "--grad-accum", "1", "--seq-len", "128"])
    assert result.exit_code == 0, result.output
    shutil.copytree(out / "explain", out / "teach")
    randomise_b(out / "explain", seed=1)
    randomise_b(out / "teach", seed=2)
    return out


def stock_base():
    return MixtralForCausalLM.from_pretrained(ensure_tiny_mixtral(), dtype=torch.float32)


def through_peft(adapter_dir):
    return PeftModel.from_pretrained(stock_base(), adapter_dir).eval()


def adapter_modules(folder):
    """peft module name -> (A, B) of an adapter folder."""
    tensors = load_file(folder / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (v, tensors[k.replace("lora_A", "lora_B")])
            for k, v in tensors.items() if ".lora_A." in k}


def no_leftovers(out):
    return not [p for p in out.rglob(".*")]


# --- merged --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    result = run_export("--expert", "explain", "--format", "merged", "--adapters", adapters, "--out", out)
    assert result.exit_code == 0, result.output
    return out / "explain", result


def test_merged_model_loads_on_stock_mixtral_and_matches_peft(adapters, merged):
    folder, result = merged
    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = through_peft(adapters / "explain")
    with torch.no_grad():
        logits, expected, bare = model(IDS).logits, reference(IDS).logits, stock_base()(IDS).logits
    assert (expected - bare).abs().max() > 1e-2  # the adapter changes the output visibly
    assert (logits - expected).abs().max() <= 1e-5
    greedy = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(IDS, **greedy), reference.generate(IDS, **greedy))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is MixtralForCausalLM
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}
    marker = json.loads((folder / "export.json").read_text())
    assert marker["format"] == "merged" and marker["rank"] == RANK and marker["base_model"]["name"] == "tiny-mixtral"
    assert result.stdout.strip() == f"vllm serve {folder.resolve()}"
    assert no_leftovers(folder.parent)


def test_merged_is_peft_merge_and_unload_bit_for_bit(adapters, merged):
    folder, _ = merged
    ours = MtgMixtralForCausalLM.from_pretrained(ensure_tiny_mixtral(), dtype=torch.float32)  # per-expert Linear, as trained
    expected = PeftModel.from_pretrained(ours, adapters / "explain").merge_and_unload().state_dict()
    written = load_file(folder / "model.safetensors")
    assert {k.replace(".block_sparse_moe.", ".mlp.") for k in written} == set(expected)
    assert all(torch.equal(v, expected[k.replace(".block_sparse_moe.", ".mlp.")]) for k, v in written.items())
    base = load_file(ensure_tiny_mixtral() / "model.safetensors")
    changed = {k for k in written if not torch.equal(written[k], base[k])}
    assert len(changed) == LAYERS * (4 + 3 * EXPERTS)  # every adapted matrix, nothing else


def test_merged_keeps_a_sharded_base_sharded_one_shard_at_a_time(adapters, merged, tmp_path, monkeypatch):
    sharded = tmp_path / "sharded-base"
    stock_base().save_pretrained(sharded, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_tiny_mixtral() / name, sharded / name)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 3
    saved = []

    def recording(tensors, path, metadata=None):  # the export imports save_file when it runs: this one
        saved.append((path.name, set(tensors)))
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", recording)
    out = tmp_path / "out"
    result = run_export("--expert", "explain", "--format", "merged", "--adapters", adapters, "--base-model", sharded,
                        "--out", out, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    for shard, keys in saved:  # each shard written once, holding exactly the keys it holds in the base
        assert keys == {k for k, v in index["weight_map"].items() if v == shard}
    assert sorted(name for name, _ in saved) == shards
    written = json.loads((out / "explain" / "model.safetensors.index.json").read_text())
    assert written["weight_map"] == index["weight_map"]
    assert written["metadata"]["total_size"] == sum(t.numel() * 2 for s in shards for t in load_file(out / "explain" / s).values())
    assert json.loads((out / "explain" / "config.json").read_text())["dtype"] == "bfloat16"
    single = load_file(merged[0] / "model.safetensors")
    for shard in shards:
        for key, tensor in load_file(out / "explain" / shard).items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, single[key].to(torch.bfloat16))


# --- vLLM ----------------------------------------------------------------------------------------------


def vllm_lookup(adapter_dir):
    """vLLM 0.32's LoRA name rule for Mixtral, re-implemented (vLLM does not run on this CPU).

    LoRAModel.from_local_checkpoint keys every module by parse_fine_tuned_lora_name (strip `base_model.model.`
    and `.lora_A/B.weight`); LoRAModelManager then looks modules up by the names of vLLM's Mixtral: qkv_proj packs
    self_attn.{q,k,v}_proj, o_proj is its own, and the FusedMoE `model.layers.N.block_sparse_moe.experts` packs
    `experts.E.w1/w2/w3` (FusedMoE.make_expert_params_mapping). A name the lookup does not find is skipped silently.
    Returns (modules found, modules missed, modules check_unexpected_modules would refuse).
    """
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    loaded = {".".join(k.removeprefix("base_model.model.").split(".")[:-2]) for k in keys}
    expected_suffixes = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate", "lm_head", "embed_tokens"}
    expected_suffixes |= {f"experts.{e}.{w}" for e in range(EXPERTS) for w in ("w1", "w2", "w3")}
    unexpected = {m for m in loaded if (m[m.find(".experts") + 1:] if ".experts" in m else m.rsplit(".", 1)[-1]) not in expected_suffixes}
    wanted = {f"model.layers.{layer}.self_attn.{p}" for layer in range(LAYERS) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    wanted |= {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}" for layer in range(LAYERS) for e in range(EXPERTS) for w in ("w1", "w2", "w3")}
    return wanted & loaded, wanted - loaded, unexpected


@pytest.fixture(scope="module")
def vllm_all(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm")
    result = run_export("--all", "--format", "vllm", "--adapters", adapters, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_vllm_export_has_every_module_vllm_looks_up_with_the_right_shapes(adapters, vllm_all):
    out, _ = vllm_all
    folder = out / "explain"
    found, missed, unexpected = vllm_lookup(folder)
    assert not missed and not unexpected and len(found) == LAYERS * (4 + 3 * EXPERTS)
    tensors = load_file(folder / "adapter_model.safetensors")
    shapes = {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
              "o_proj": (HIDDEN, HEADS * HEAD_DIM), "w1": (FFN, HIDDEN), "w3": (FFN, HIDDEN), "w2": (HIDDEN, FFN)}
    original = adapter_modules(adapters / "explain")
    for module in found:
        out_features, in_features = shapes[module.rsplit(".", 1)[-1]]
        a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape == (RANK, in_features) and b.shape == (out_features, RANK)
        source = original[module.replace(".block_sparse_moe.experts.", ".mlp.experts.")]
        assert torch.equal(a, source[0]) and torch.equal(b, source[1])
    assert len(tensors) == 2 * len(found)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(ensure_tiny_mixtral()) and config["r"] == RANK


def test_vllm_lookup_misses_every_expert_of_the_training_format(adapters):
    found, missed, unexpected = vllm_lookup(adapters / "explain")
    assert not unexpected  # vLLM loads it without an error ...
    assert missed == {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}" for layer in range(LAYERS)
                      for e in range(EXPERTS) for w in ("w1", "w2", "w3")}  # ... and drops all 24 expert sub-LoRAs per layer
    assert found == {f"model.layers.{layer}.self_attn.{p}" for layer in range(LAYERS) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}


def test_vllm_export_still_loads_with_plain_peft_and_means_the_same(adapters, vllm_all):
    out, _ = vllm_all
    with torch.no_grad():
        torch.testing.assert_close(through_peft(out / "teach")(IDS).logits, through_peft(adapters / "teach")(IDS).logits, atol=0, rtol=0)


def test_vllm_all_prints_one_multi_lora_serve_command(vllm_all):
    out, result = vllm_all
    command = shlex.split(result.stdout.strip())
    assert command[:3] == ["vllm", "serve", str(ensure_tiny_mixtral())]
    assert command[3:9] == ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--lora-modules"]
    assert command[9:] == [f"explain={(out / 'explain').resolve()}", f"teach={(out / 'teach').resolve()}"]
    assert '"model": "<expert name>"' in result.stderr
    assert no_leftovers(out)


def test_vllm_dtype_casts_the_adapter(adapters, tmp_path):
    result = run_export("-e", "teach", "--format", "vllm", "--adapters", adapters, "--out", tmp_path, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    tensors = load_file(tmp_path / "teach" / "adapter_model.safetensors")
    original = load_file(adapters / "teach" / "adapter_model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert all(torch.equal(tensors[k.replace(".mlp.experts.", ".block_sparse_moe.experts.")], v.to(torch.bfloat16)) for k, v in original.items())


# --- GGUF ----------------------------------------------------------------------------------------------


def rotary_rows(b, heads):
    """llama.cpp's q/k row order, written out: per head of d rows, HF row j*d/2 + i goes to row 2i + j."""
    d = b.shape[0] // heads
    order = [h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)]
    return b[order]


def test_gguf_reads_back_with_every_tensor_stacked_and_permuted(adapters, tmp_path):
    result = run_export("--expert", "explain", "--format", "gguf", "--adapters", adapters, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(tmp_path / "explain" / "explain.gguf")
    fields = {name: reader.fields[name].contents() for name in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha")}
    assert fields == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora", "adapter.lora.alpha": ALPHA}
    tensors = {t.name: t for t in reader.tensors}
    original = adapter_modules(adapters / "explain")
    expected = {}
    for layer in range(LAYERS):
        for gguf_name, module in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            a, b = original[f"model.layers.{layer}.self_attn.{module}"]
            b = rotary_rows(b, {"q_proj": HEADS, "k_proj": KV_HEADS}[module]) if module in ("q_proj", "k_proj") else b
            expected[f"blk.{layer}.{gguf_name}.weight"] = (a, b)
        for gguf_name, matrix in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
            pairs = [original[f"model.layers.{layer}.mlp.experts.{e}.{matrix}"] for e in range(EXPERTS)]
            expected[f"blk.{layer}.{gguf_name}.weight"] = (torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]))
    assert set(tensors) == {f"{name}.lora_{x}" for name in expected for x in "ab"}
    for name, (a, b) in expected.items():
        for suffix, value in ((".lora_a", a), (".lora_b", b)):
            tensor = tensors[name + suffix]
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            assert [int(n) for n in tensor.shape] == list(value.shape)[::-1]  # GGUF lists ggml's ne: innermost first
            assert np.array_equal(tensor.data, value.numpy()), name + suffix
    # llama.cpp's checks (llama-adapter.cpp): a.ne[0] == base ne[0] (in), b.ne[1] == base ne[1] (out), a.ne[1] == b.ne[0] (rank)
    gate_a, gate_b = tensors["blk.0.ffn_gate_exps.weight.lora_a"], tensors["blk.0.ffn_gate_exps.weight.lora_b"]
    assert [int(n) for n in gate_a.shape] == [HIDDEN, RANK, EXPERTS] and [int(n) for n in gate_b.shape] == [RANK, FFN, EXPERTS]
    assert result.stdout.startswith("llama-server -m BASE.gguf --lora-init-without-apply --lora ")
    # the tiny base has no GGUF to serve these with: the hint says so instead of naming a conversion that fails
    assert "tiny-mixtral does not convert to GGUF" in result.stderr and "convert_hf_to_gguf" not in result.stderr


@pytest.mark.parametrize("dtype, ggml_type", [("f16", gguf.GGMLQuantizationType.F16), ("bf16", gguf.GGMLQuantizationType.BF16)])
def test_gguf_dtype(adapters, tmp_path, dtype, ggml_type):
    result = run_export("-e", "teach", "--format", "gguf", "--adapters", adapters, "--out", tmp_path, "--dtype", dtype)
    assert result.exit_code == 0, result.output
    tensor = {t.name: t for t in gguf.GGUFReader(tmp_path / "teach" / "teach.gguf").tensors}["blk.1.attn_v.weight.lora_b"]
    assert tensor.tensor_type == ggml_type
    expected = adapter_modules(adapters / "teach")["model.layers.1.self_attn.v_proj"][1]
    torch_dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert np.array_equal(gguf.quants.dequantize(tensor.data, ggml_type), expected.to(torch_dtype).float().numpy())


# --- refusals ------------------------------------------------------------------------------------------


def copy_adapter(adapters, tmp_path, edit_config=None, keep=None):
    """A copy of adapters/explain in tmp_path/adapters/bad with its config edited or only some modules kept."""
    folder = tmp_path / "adapters" / "bad"
    shutil.copytree(adapters / "explain", folder)
    if edit_config:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(edit_config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if keep:
        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({k: v for k, v in tensors.items() if keep(k)}, folder / "adapter_model.safetensors")
    return folder.parent


def quantised_base(tmp_path, how):
    base = tmp_path / "base"
    shutil.copytree(ensure_tiny_mixtral(), base)
    if how == "config":
        config = json.loads((base / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (base / "config.json").write_text(json.dumps(config))
    else:
        tensors = load_file(base / "model.safetensors")
        tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"] = torch.zeros(FFN * HIDDEN // 2, 1, dtype=torch.uint8)
        save_file(tensors, base / "model.safetensors")
    return base


def big_rank_adapter(tmp_path):
    """A rank-1024 adapter on one module: above vLLM's largest --max-lora-rank."""
    folder = tmp_path / "adapters" / "bad"
    folder.mkdir(parents=True)
    module = "base_model.model.model.layers.0.self_attn.v_proj"
    save_file({f"{module}.lora_A.weight": torch.zeros(1024, HIDDEN), f"{module}.lora_B.weight": torch.zeros(KV_HEADS * HEAD_DIM, 1024)},
              folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 1024, "lora_alpha": 2048, "target_modules": ["v_proj"], "base_model_name_or_path": "tiny-mixtral"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder.parent


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("missing", ["--expert", "nosuch", "--format", "vllm"], "adapters/nosuch: no adapter (adapter_config.json missing); train it with: mtg-train --expert nosuch"),
        ("format", ["--expert", "explain", "--format", "onnx"], "'onnx' is not one of 'vllm', 'gguf', 'merged'"),
        ("neither", ["--format", "gguf"], "give --expert NAME or --all"),
        ("traversal", ["--expert", "../adapters", "--format", "vllm"], "--expert '../adapters': not an expert name"),
        ("not_lora", ["--expert", "bad", "--format", "merged"], "adapter_config.json is not a peft LoRA config (peft_type, r, target_modules)"),
        ("rank", ["--expert", "bad", "--format", "vllm"], "rank 1024 is above vLLM's largest --max-lora-rank (1, 8, 16, 32, 64, 128, 256, 320, 512)"),
        ("dora", ["--expert", "bad", "--format", "gguf"], "use_dora is True; mtg-export converts plain LoRA adapters"),
        ("no_w3", ["--expert", "bad", "--format", "vllm"], "no LoRA for model.layers.0.mlp.experts.3.w3; vLLM packs the experts of a layer only when"),
        ("half_stack", ["--expert", "bad", "--format", "gguf"], "no LoRA for model.layers.1.mlp.experts.0.w2; llama.cpp stacks the experts"),
        ("quantised_config", ["--expert", "explain", "--format", "merged", "--base-model", "{base}"], "the base is quantised (bitsandbytes); merged export needs the original 16- or 32-bit checkpoint"),
        ("quantised_tensor", ["--expert", "explain", "--format", "merged", "--base-model", "{base}"], "model.layers.0.block_sparse_moe.experts.0.w1.weight is stored as U8; merged export needs the original"),
        ("uncached", ["--expert", "explain", "--format", "merged", "--base-model", "acme/not-cached"], "--base-model acme/not-cached: a hub id not in the local Hugging Face cache"),
        ("wrong_base", ["--expert", "explain", "--format", "gguf", "--base-model", "mixtral-8x7b"], "rank 16 on mixtral-8x7b needs (16, 4096) and (14336, 16); pass the --base-model it was trained on"),
        ("unwritable", ["--expert", "explain", "--format", "vllm", "--out", "{file}/out"], "cannot write there (Not a directory); choose a writable folder"),
        ("not_an_export", ["--expert", "explain", "--format", "gguf", "--out", "{user}"], "/explain exists and is not an mtg-export folder (no export.json); remove it or choose another --out"),
    ],
)
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(adapters, tmp_path, monkeypatch, case, args, message):
    monkeypatch.chdir(tmp_path)
    source = adapters
    if case == "rank":
        source = big_rank_adapter(tmp_path)
    elif case == "dora":
        source = copy_adapter(adapters, tmp_path, edit_config={"use_dora": True})
    elif case == "not_lora":
        source = copy_adapter(adapters, tmp_path, edit_config={"r": None})
    elif case == "no_w3":
        source = copy_adapter(adapters, tmp_path, keep=lambda k: ".experts.3.w3." not in k)
    elif case == "half_stack":
        source = copy_adapter(adapters, tmp_path, keep=lambda k: "layers.1.mlp.experts.0.w2." not in k)
    elif case == "missing":
        source = tmp_path / "adapters"
        source.mkdir()
    base = quantised_base(tmp_path, case.removeprefix("quantised_")) if case.startswith("quantised") else None
    (tmp_path / "a-file").write_text("not a folder")
    user = tmp_path / "user-folder"
    (user / "explain").mkdir(parents=True)
    (user / "explain" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a.format(base=base, file=tmp_path / "a-file", user=user) for a in args]
    if "--adapters" not in args:
        args += ["--adapters", str(source)]
    result = run_export(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    if case != "format":  # click's own usage errors add the usage line
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed
    assert (user / "explain" / "notes.txt").read_text() == "mine"


def test_a_hub_base_must_be_in_the_local_cache_for_merged(adapters):
    adapter = attrs.evolve(load_adapter(adapters, "explain", None), choice=choose_base("mixtral-8x7b"))
    with pytest.raises(ExportError, match=r"base mistralai/Mixtral-8x7B-v0.1 is not in the local Hugging Face cache; .*hf download"):
        checkpoint_folder(adapter)


def test_a_failed_export_leaves_the_earlier_export_byte_identical(adapters, tmp_path, monkeypatch):
    assert run_export("-e", "explain", "--format", "gguf", "--adapters", adapters, "--out", tmp_path).exit_code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "explain").iterdir()}

    def crash(self):
        raise RuntimeError("disk full, simulated")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        CliRunner().invoke(export_command, ["-e", "explain", "--format", "gguf", "--adapters", str(adapters), "--out", str(tmp_path)],
                           catch_exceptions=False)
    assert {p: p.read_bytes() for p in (tmp_path / "explain").iterdir()} == before
    assert no_leftovers(tmp_path)


def test_export_overwrites_its_own_earlier_export(adapters, tmp_path):
    for _ in range(2):
        result = run_export("-e", "explain", "--format", "vllm", "--adapters", adapters, "--out", tmp_path)
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explain"]


def test_help_imports_no_torch():
    code = ("import sys\nfrom mtg_core.commands.export import export_command\ntry:\n    export_command(['--help'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors', 'gguf', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
