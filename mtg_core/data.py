"""Training data: strict JSONL reading with one-line errors, and tokenisation with prompt masking."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import attrs

from mtg_core.errors import DataError
from mtg_core.experts import FormattedExample

RECORD_KEYS = ("input", "output")
EXAMPLE = '{"input": "question ...", "output": "answer ..."}'
IGNORE_INDEX = -100  # label value that transformers' loss skips
MAX_UNTRAINED_FRACTION = 0.10
STDIN = "-"


def _line_of(raw: bytes, offset: int) -> int:
    return raw[:offset].count(b"\n") + 1


@attrs.frozen
class JsonlFile:
    """A data file as read: its records, the line each came from, and the SHA-256 of the bytes read."""

    records: list[dict[str, str]]
    lines: list[int]
    sha256: str


def read_jsonl(path: Path | str) -> JsonlFile:
    """Read a JSON Lines file of {"input", "output"} string records, once (a pipe or FIFO can only be read once;
    "-" reads stdin).

    Accepts what a user would call valid (UTF-8 BOM, CRLF, blank lines, extra keys); anything else
    raises DataError naming the file, the line and the fix.
    """
    if str(path) == STDIN:
        path, raw = Path("<stdin>"), sys.stdin.buffer.read()
    else:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no such file; give a JSON Lines file with one {EXAMPLE} per line")
        if path.is_dir():
            raise DataError(f"{path}: is a folder; give the .jsonl file inside it")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    if b"\x00" in raw:
        nul = raw.index(b"\x00")
        raise DataError(
            f"{path}:{_line_of(raw, nul)}: contains NUL bytes (binary or UTF-16?); save it as UTF-8 JSON Lines"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:{_line_of(raw, exc.start)}: byte 0x{raw[exc.start]:02x} is not UTF-8; re-save the file as UTF-8"
        ) from None
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: has no records; write one {EXAMPLE} per line")
    if lines[0][1].lstrip().startswith("["):
        raise DataError(
            f"{path}:{lines[0][0]}: starts a JSON array; JSON Lines needs one object per line, not a list "
            "(convert with: python -c \"import json,sys; [print(json.dumps(r)) for r in json.load(sys.stdin)]\" < in > out.jsonl)"
        )
    records = [_record(path, number, line) for number, line in lines]
    return JsonlFile(records, [number for number, _ in lines], hashlib.sha256(raw).hexdigest())


def read_records(path: Path | str) -> list[dict[str, str]]:
    return read_jsonl(path).records


def _record(path: Path, number: int, line: str) -> dict[str, str]:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one {EXAMPLE}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; each line must be one {EXAMPLE}") from None
    except ValueError as exc:  # Python refuses integers of more than sys.get_int_max_str_digits() digits
        raise DataError(f"{where}: a number too long to read ({exc}); quote it as a string or remove it") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: is a JSON {type(obj).__name__}, not an object; each line must be one {EXAMPLE}")
    for key in RECORD_KEYS:
        if key not in obj:
            raise DataError(f"{where}: no {key!r} key (keys: {', '.join(map(repr, obj)) or 'none'}); each line must be one {EXAMPLE}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} is a {type(obj[key]).__name__}, not a string; quote it")
        if not obj[key].strip():
            raise DataError(f"{where}: {key!r} is empty; write the text or delete the line")
        try:
            obj[key].encode("utf-8")
        except UnicodeEncodeError as exc:  # valid JSON ("\\ud800") but not text: no tokenizer takes it
            raise DataError(f"{where}: {key!r} holds a lone surrogate ({ascii(obj[key][exc.start])} at character {exc.start + 1}), "
                            "which is not text; fix or remove that escape") from None
    return {key: obj[key] for key in RECORD_KEYS}


@attrs.frozen
class TokenizedData:
    """Token ids with prompt tokens masked out of the labels, and what truncation cost."""

    rows: list[dict[str, list[int]]]
    truncated: int
    trained_tokens: int
    untrained_rows: list[int]  # indices of the examples left with no answer tokens
    shortest_trainable: int = 0  # the --seq-len that leaves every example an answer token: longest prompt + 1
    longest: int = 0  # the --seq-len that truncates nothing

    @property
    def untrained(self) -> int:
        return len(self.untrained_rows)


def max_token_chars(tokenizer) -> int:
    """The most characters one token of this vocabulary can stand for (SentencePiece's '▁' is one space)."""
    return max(len(token) for token in tokenizer.get_vocab())


def tokenize(examples: Iterable[FormattedExample], tokenizer, seq_len: int) -> TokenizedData:
    """Tokenise prompt (with BOS) and completion (with EOS); the loss sees only completion tokens.

    Text past what `seq_len` tokens can cover is cut before tokenising: a 50 MB record would otherwise
    cost a minute and gigabytes to tokenise only to be truncated. (The margin keeps the first `seq_len`
    tokens identical: no token spans more than `max_token_chars` characters.)
    """
    cap = (seq_len + 8) * max_token_chars(tokenizer)
    rows, truncated, trained, untrained_rows, shortest_trainable, longest = [], 0, 0, [], 0, 0
    for index, example in enumerate(examples):
        prompt = tokenizer(example.prompt[:cap], add_special_tokens=True)["input_ids"]
        completion = tokenizer(" " + example.completion[:cap], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = (prompt + completion)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:seq_len]
        truncated += len(prompt) + len(completion) > seq_len
        # measured on text cut at `cap`: beyond it the true length is larger still
        shortest_trainable, longest = max(shortest_trainable, len(prompt) + 1), max(longest, len(prompt) + len(completion))
        n_trained = sum(label != IGNORE_INDEX for label in labels)
        if n_trained == 0:
            untrained_rows.append(index)
        trained += n_trained
        rows.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return TokenizedData(rows, truncated, trained, untrained_rows, shortest_trainable, longest)


def describe_lines(numbers: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{f' (and {len(numbers) - limit} more)' if len(numbers) > limit else ''}"


def check_trainable(data: TokenizedData, seq_len: int, source: str, lines: list[int]) -> None:
    if data.untrained > MAX_UNTRAINED_FRACTION * len(data.rows):
        where = describe_lines([lines[i] for i in data.untrained_rows])
        raise DataError(
            f"{source}: {data.untrained} of {len(data.rows)} examples ({where}) have no answer tokens left after "
            f"truncation to --seq-len {seq_len}; --seq-len {data.shortest_trainable} leaves every example an answer token "
            f"and {data.longest} keeps every one whole, or shorten the prompts"
        )


def load_examples(
    path: Path, format_example: Callable[[dict[str, str]], FormattedExample], max_samples: int | None = None
) -> tuple[list[FormattedExample], list[int], str]:
    """The formatted examples, the line each came from, and the SHA-256 of the file as read."""
    data = read_jsonl(path)
    records, lines = data.records, data.lines
    if max_samples is not None:
        records, lines = records[:max_samples], lines[:max_samples]
    return [format_example(record) for record in records], lines, data.sha256
