"""mtg-ask: an interactive session survives a broken expert and bad input lines; with --quant none it answers
what a server of the merged export answers (docs/serving.md)."""

import shutil

import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, MixtralForCausalLM

from conftest import ToyExpert, add_plugin
from mtg_core.commands.ask import ask_command
from mtg_core.evaluate import prompt_for
from mtg_core.plugins import Registry
from test_export import adapters, merged  # noqa: F401 (fixtures: adapters/explain and teach, explain merged)


def test_interactive_session_leaves_a_broken_expert_out_and_survives_a_bad_switch_and_a_non_utf8_line(adapters, monkeypatch):
    add_plugin(monkeypatch, ToyExpert("judge"), "judge")  # registers judge, but has no data files: broken
    shutil.copytree(adapters / "explain", adapters / "judge")  # an adapter trained earlier, when it worked
    session = b"/expert judge\n\xff\xfe question\nWhat is trample?\n/expert teach\nWhat is ward?\n/expert nosuch\n/quit\n"
    result = CliRunner().invoke(ask_command, ["--interactive", "--adapters", str(adapters), "--max-new-tokens", "4"], input=session)
    assert result.exit_code == 0, result.output
    lines = result.stderr.replace("]> ", "]> \n").splitlines()
    assert lines[0].startswith("warning: judge not loaded: plugin 'judge' (not installed) registers expert 'judge' but "
                               "implements no mtg_data_files")
    assert "experts loaded: explain, teach; '/expert NAME' switches, '/quit' ends" in lines
    assert any(line.startswith("judge is not loaded: plugin 'judge'") and line.endswith("; still explain") for line in lines)
    assert "error: input line 2 is not UTF-8 text (byte 0xff at position 0); skipped it, ask again in UTF-8" in lines
    assert "no adapter loaded for 'nosuch'; loaded: explain, teach; still teach" in lines
    assert result.stderr.count("[explain]> ") == 4 and result.stderr.count("[teach]> ") == 3  # the session went on
    assert "Traceback" not in result.output


def test_ask_with_quant_none_answers_what_the_merged_export_answers(adapters, merged):  # noqa: F811
    folder, _ = merged
    question = "What does trample do?"
    answered = CliRunner().invoke(ask_command, ["--expert", "explain", "--adapters", str(adapters), "--quant", "none",
                                                "--max-new-tokens", "12", question])
    assert answered.exit_code == 0, answered.output
    # what a server of the merged folder computes: plain transformers, greedy, the prompt as training formatted it
    registry = Registry.discover()
    prompt = prompt_for(registry, registry.expert("explain"), question)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    served = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = served.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert expected and answered.stdout.strip() == expected
