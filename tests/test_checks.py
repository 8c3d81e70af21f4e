"""Numbers in the expert data are recomputed: each record's "checks" evaluate to the values its output shows.

A check is {"expr": "<arithmetic with comb, perm, ...>", "shown": "<text in the output, e.g. '80.2%' or '1.30'>"}.
The expression must round to the shown value at the shown precision (a percentage is compared as expr x 100),
and the shown text must stand in the output as a whole number, not as part of a longer one ("2.2%" is not
found in "12.2%"). PREDICT states probabilities, so every percentage in a PREDICT output must be backed by a check.
"""

import ast
import json
import math
import re

import pytest

from conftest import EXPERTS, ROOT


class CheckError(ValueError):
    """A check that cannot be evaluated; the message names what is wrong in it."""


MAX_ARGUMENT = 10_000  # decks and draws are a few hundred cards; comb(10**7, 5 * 10**6) would hang the test


def bounded(function):
    """The math function, refusing arguments no card count needs (a typo like 10**7 must fail, not hang)."""

    def call(*args):
        if any(isinstance(a, int) and abs(a) > MAX_ARGUMENT for a in args):
            raise CheckError(f"{function.__name__}{args} is beyond any card count (limit {MAX_ARGUMENT})")
        return function(*args)

    return call


# The only names an expression may use: the arithmetic of card odds, nothing that reaches the interpreter.
ALLOWED_CALLS = {
    "comb": bounded(math.comb),
    "perm": bounded(math.perm),
    "factorial": bounded(math.factorial),
    "sum": sum,
    "range": bounded(range),
    "min": min,
    "max": max,
    "round": round,
    "abs": abs,
}
ALLOWED_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Store, ast.Call,
    ast.GeneratorExp, ast.comprehension, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
    ast.USub, ast.UAdd,
)
MAX_EXPONENT = 1000  # (1 - p) ** n over a few hundred draws is the most the data needs; 9 ** 9 ** 9 would hang the test
SHOWN = re.compile(r"^-?\d{1,3}(?:,\d{3})*(?:\.\d+)?%?$|^-?\d+(?:\.\d+)?%?$")
PERCENTAGE = re.compile(r"(?<![\d.,])\d[\d,]*(?:\.\d+)?%")


def evaluate(expr: str) -> float:
    """Evaluate a check expression, allowing only arithmetic, constants and the ALLOWED_CALLS.

    ast is used (not a bare eval) so that attribute access, imports and unknown names are refused before
    anything runs; eval then sees no builtins, only the allowed functions and the comprehension's own names.
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as error:
        raise CheckError(f"not a Python expression ({error.msg})") from None
    bound = {target.id for node in ast.walk(tree) if isinstance(node, ast.comprehension) for target in ast.walk(node.target)
             if isinstance(target, ast.Name)}
    for node in ast.walk(tree):
        if not isinstance(node, ALLOWED_NODES):
            raise CheckError(f"{type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id not in ALLOWED_CALLS and node.id not in bound:
            raise CheckError(f"name {node.id!r} is not allowed (only {', '.join(sorted(ALLOWED_CALLS))})")
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.keywords):
            raise CheckError("only plain calls of the allowed functions are allowed")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise CheckError(f"constant {node.value!r} is not a number")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            if not (isinstance(node.right, ast.Constant) and abs(node.right.value) <= MAX_EXPONENT):
                raise CheckError(f"exponents must be number constants up to {MAX_EXPONENT}")
    # The names go in as globals: a generator expression's own scope sees globals, not eval's locals.
    value = eval(compile(tree, "<check>", "eval"), {"__builtins__": {}, **ALLOWED_CALLS})  # noqa: S307 - vetted above
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckError(f"evaluates to {value!r}, not a number")
    return value


def matches(value: float, shown: str) -> bool:
    """True when value, written at the precision of shown (x 100 for a percentage), reads as shown."""
    number = shown.rstrip("%").replace(",", "")
    decimals = len(number.partition(".")[2])
    scaled = value * 100 if shown.endswith("%") else value
    return abs(scaled - float(number)) <= 0.5 * 10**-decimals + 1e-9


def stands_in(shown: str, text: str) -> bool:
    return re.search(rf"(?<![\d.,]){re.escape(shown)}(?![\d%]|[.,]\d)", text) is not None


def records(expert: str) -> list[tuple[str, dict]]:
    folder = ROOT / f"mtg_expert_{expert}" / f"mtg_expert_{expert}" / "data"
    found = []
    for split, path in (("training", folder / "training" / f"{expert}_examples.jsonl"),
                        ("held-out", folder / "heldout" / f"{expert}_heldout.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        found += [(f"{expert} {split} {i}", json.loads(line)) for i, line in enumerate(lines, 1) if line.strip()]
    return found


ALL = [item for expert in EXPERTS for item in records(expert)]
CHECKED = [(where, record) for where, record in ALL if "checks" in record]


@pytest.mark.parametrize("where, record", CHECKED, ids=[where for where, _ in CHECKED])
def test_checks_recompute_the_numbers_shown(where, record):
    checks = record["checks"]
    assert isinstance(checks, list) and checks, f"{where}: 'checks' must be a non-empty list"
    for check in checks:
        assert isinstance(check, dict) and set(check) == {"expr", "shown"}, f"{where}: {check!r} needs exactly 'expr' and 'shown'"
        expr, shown = check["expr"], check["shown"]
        assert SHOWN.match(shown), f"{where}: shown {shown!r} is not a number or percentage"
        try:
            value = evaluate(expr)
        except (CheckError, ArithmeticError, ValueError, TypeError) as error:
            pytest.fail(f"{where}: check {expr!r} cannot be evaluated: {error}")
        assert matches(value, shown), f"{where}: {expr} = {value!r}, which does not read as {shown}"
        assert stands_in(shown, record["output"]), f"{where}: shows {shown!r} in its check but not in its output"


@pytest.mark.parametrize("where, record", [(w, r) for w, r in ALL if w.startswith("predict ")],
                         ids=[w for w, _ in ALL if w.startswith("predict ")])
def test_every_predict_percentage_is_checked(where, record):
    shown = {check["shown"] for check in record.get("checks", [])}
    unchecked = [p for p in PERCENTAGE.findall(record["output"]) if p not in shown]
    assert not unchecked, f"{where}: {unchecked} in the output have no check recomputing them"


@pytest.mark.parametrize(
    "expr, message",
    [
        ("__import__('os')", "name '__import__' is not allowed"),
        ("().__class__.__bases__", "Attribute is not allowed"),
        ("comb.__globals__", "Attribute is not allowed"),
        ("open('x')", "name 'open' is not allowed"),
        ("9 ** 9 ** 9", "exponents must be number constants"),
        ("comb(n=5, k=2)", "only plain calls"),
        ("'80.2%'", "is not a number"),
        ("[1, 2]", "List is not allowed"),
        ("comb(5,", "not a Python expression"),
        ("lambda: 1", "Lambda is not allowed"),
        ("comb(10**7, 5 * 10**6)", "beyond any card count"),
        ("sum(k for k in range(10**12))", "beyond any card count"),
    ],
)
def test_unsafe_or_malformed_checks_are_refused(expr, message):
    with pytest.raises(CheckError, match=re.escape(message)):
        evaluate(expr)


def test_checks_compare_at_the_shown_precision():
    assert evaluate("sum(comb(22, k) * comb(38, 7 - k) for k in range(2, 6)) / comb(60, 7)") == pytest.approx(0.80228, abs=1e-5)
    assert matches(evaluate("1 - comb(56, 7) / comb(60, 7)"), "39.9%")
    assert not matches(evaluate("1 - comb(56, 7) / comb(60, 7)"), "40.0%")
    assert matches(52 / 40, "1.30") and not matches(52 / 40, "1.3%") and matches(8347680, "8,347,680")
    assert stands_in("2.2%", "P = 2.2%.") and not stands_in("2.2%", "P = 12.2%.") and not stands_in("2.2%", "2.25%")
