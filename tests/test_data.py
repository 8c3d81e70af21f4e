"""JSONL reading: every malformed file is one DataError naming file and line; valid variants load."""

import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import EXPERTS
from mtg_core.data import IGNORE_INDEX, read_records, tokenize
from mtg_core.errors import DataError
from mtg_core.experts import FormattedExample
from mtg_core.plugins import Registry

RULE_NUMBER = re.compile(r"\b[1-9]\d{2}\.\d+[a-z]?\b")
GOOD = '{"input": "q", "output": "a"}'


@pytest.mark.parametrize(
    "content, message",
    [
        (GOOD + "\n{not json}\n", r"data.jsonl:2: invalid JSON"),
        (GOOD + '\n["a", "b"]\n', r"data.jsonl:2: is a JSON list, not an object"),
        ('{"input": "q"}\n', r"data.jsonl:1: no 'output' key"),
        ('{"input": 3, "output": "a"}\n', r"data.jsonl:1: 'input' is a int, not a string"),
        ('\n{"input": "q", "output": "  "}\n', r"data.jsonl:2: 'output' is empty"),
        ("", r"data.jsonl: has no records"),
        ("\n \n\r\n", r"data.jsonl: has no records"),
        ('[{"input": "q", "output": "a"}]', r"data.jsonl:1: starts a JSON array"),
        (b'{"input": "q", "output": "caf\xe9"}\n', r"data.jsonl:1: byte 0xe9 is not UTF-8"),
        (GOOD.encode() + b"\n" + GOOD.encode("utf-16"), r"data.jsonl:2: contains NUL bytes"),
        ("[" * 100000, r"data.jsonl:1: starts a JSON array"),
        ('{"input": ' * 100000, r"data.jsonl:1: (invalid JSON|JSON nested too deeply)"),
        (GOOD + '\n{"input": "q\\ud800", "output": "a"}\n', r"data.jsonl:2: 'input' holds a lone surrogate \('\\ud800' at character 2\)"),
        ('{"input": "q", "output": "a", "id": ' + "9" * 5000 + "}\n", r"data.jsonl:1: a number too long to read .*; quote it as a string"),
    ],
)
def test_malformed_files_name_file_line_and_fix(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as error:
        read_records(path)
    assert "\n" not in str(error.value)


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        read_records(tmp_path)


def test_what_users_consider_valid_is_accepted(tmp_path):
    path = tmp_path / "ok.jsonl"
    content = '\ufeff{"input": "q1", "output": "a1", "source": "x"}\r\n\r\n{"input": "q2", "output": "a2\u2028b"}\r\n\n\n'
    path.write_bytes(content.encode("utf-8"))
    assert read_records(path) == [{"input": "q1", "output": "a1"}, {"input": "q2", "output": "a2\u2028b"}]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["input", "output", "x"]) | st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
JSON_LINES = st.lists(JSON_VALUES, max_size=4).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), JSON_LINES))
def test_random_bytes_and_json_load_or_raise_data_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(content)
    try:
        records = read_records(path)
    except DataError:
        return
    assert records and all(set(r) == {"input", "output"} and r["input"].strip() and r["output"].strip() for r in records)


def test_prompt_tokens_are_masked_and_truncation_is_counted():
    from transformers import AutoTokenizer

    from mtg_core.base_models import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    example = FormattedExample("Question: what is trample? Answer:", "Excess combat damage goes to the player.")
    full = tokenize([example], tokenizer, seq_len=512)
    (row,) = full.rows
    prompt_len = len(tokenizer(example.prompt)["input_ids"])
    assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:] and row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][prompt_len:], skip_special_tokens=True).strip() == example.completion
    assert (full.truncated, full.untrained) == (0, 0)
    cut = tokenize([example], tokenizer, seq_len=prompt_len)
    assert (cut.truncated, cut.untrained, cut.trained_tokens) == (1, 1, 0)


def test_bundled_expert_data_is_valid_varied_and_unique():
    registry = Registry.discover()
    all_inputs = Counter()
    for name in EXPERTS:
        files = registry.data_files(registry.expert(name))
        train, heldout = read_records(files.train), read_records(files.heldout)
        assert len(train) >= 120 and len(heldout) >= 24, name
        for path in (files.train, files.heldout):
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            assert all({"input", "output", "cards"} <= set(row) <= {"input", "output", "cards", "checks"} for row in rows), path
        inputs = [r["input"].strip().lower() for r in train + heldout]
        assert len(set(inputs)) == len(inputs), f"{name}: duplicate inputs"
        outputs = [r["output"].strip().lower() for r in train + heldout]
        assert len(set(outputs)) == len(outputs), f"{name}: duplicate outputs"
        all_inputs.update(set(inputs))
        assert sum(bool(RULE_NUMBER.search(r["output"])) for r in train) >= 10, f"{name}: too few rule citations"
    assert max(all_inputs.values()) == 1, "the same question appears in two experts"


class CountingTokenizer:
    """The real tokenizer, recording the longest text it was asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_record_is_cut_before_tokenising_with_the_same_tokens_and_its_line_named(tmp_path):
    from transformers import AutoTokenizer

    from mtg_core.base_models import TOKENIZER_DIR
    from mtg_core.data import check_trainable, max_token_chars

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    words = " ".join(f"mana{i} trample" for i in range(40000))  # ~600 KB: still cheap to tokenise whole for reference
    reference = tokenize([FormattedExample("Q: " + words, "an answer")], tokenizer, seq_len=64)
    spy = CountingTokenizer(tokenizer)
    cut = tokenize([FormattedExample("Q: " + words, "an answer")], spy, seq_len=64)
    assert cut.rows == reference.rows and spy.longest <= (64 + 8) * max_token_chars(tokenizer) + 1
    examples = [FormattedExample("short question", "short answer")] * 8
    examples[1] = examples[5] = FormattedExample("Q: " + words, "an answer")
    data = tokenize(examples, tokenizer, seq_len=64)
    assert data.untrained_rows == [1, 5]
    with pytest.raises(DataError, match=r"data.jsonl: 2 of 8 examples \(lines 3, 9\) have no answer tokens left"):
        check_trainable(data, 64, "data.jsonl", [1, 3, 4, 5, 6, 9, 10, 11])
