"""--seq-len too short for an expert's data: the error names the length that keeps every example, and the
guide's table of those lengths for the shipped experts is what the tiny base's tokenizer measures."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import EXPERTS
from mtg_core.base_models import choose_base, load_tokenizer
from mtg_core.commands.train import train_command
from mtg_core.data import load_examples, tokenize
from mtg_core.plugins import Registry

GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "third-party-experts.md").read_text()


@pytest.fixture(scope="module")
def measured():
    """expert -> its training data tokenised without a cap that matters."""
    tokenizer, registry = load_tokenizer(choose_base("tiny-mixtral")), Registry.discover()
    found = {}
    for name in EXPERTS:
        expert = registry.expert(name)
        examples, _, _ = load_examples(registry.data_files(expert).train, lambda record, e=expert: registry.format_example(e, record))
        found[name] = (examples, tokenize(examples, tokenizer, 32768), tokenizer)
    return found


def test_the_guide_s_minimum_seq_len_per_shipped_expert_is_measured(measured):
    table = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \|$", GUIDE, re.M)}
    assert table == {name: (data.shortest_trainable, data.longest) for name, (_, data, _) in measured.items()}
    for name, (examples, data, tokenizer) in measured.items():
        assert tokenize(examples, tokenizer, data.shortest_trainable).untrained == 0, name
        assert tokenize(examples, tokenizer, data.shortest_trainable - 1).untrained > 0, name
        assert tokenize(examples, tokenizer, data.longest).truncated == 0, name
        assert tokenize(examples, tokenizer, data.longest - 1).truncated > 0, name
        assert tokenize(examples, tokenizer, 64).untrained == len(examples), name  # the guide: 64 leaves none an answer
    assert max(data.longest for _, data, _ in measured.values()) <= 512  # the guide: the default keeps every one whole


def test_a_seq_len_too_short_names_the_length_that_keeps_every_example(measured, tmp_path):
    _, data, _ = measured["explain"]
    result = CliRunner().invoke(train_command, ["--expert", "explain", "--seq-len", "64", "--max-steps", "1", "--output-dir",
                                                str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (f"have no answer tokens left after truncation to --seq-len 64; --seq-len {data.shortest_trainable} leaves every "
            f"example an answer token and {data.longest} keeps every one whole, or shorten the prompts") in result.output
