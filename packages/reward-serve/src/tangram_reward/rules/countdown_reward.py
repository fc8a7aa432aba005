"""The Countdown reward: does the answer's equation reach the target with the given numbers?

The equation is read from the last ``<answer>`` block (else the last line that looks like an
expression, with any ``= target`` tail dropped). It is parsed with :mod:`ast`, never evaluated
by Python: only integers, ``+ - * /``, unary minus and parentheses are allowed, and arithmetic is
exact (fractions), so ``7 / 2 * 2`` is 7, not 7.000000000000001. Each given number may be used at
most once (as a multiset): using 5 twice when one 5 was given scores 0.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_EXPR_LINE = re.compile(r"^[\d\s+\-*/().=]+$")
_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__}


def _equation(response: str) -> str | None:
    tagged = _ANSWER.findall(response)
    candidates = [tagged[-1]] if tagged else reversed(response.strip().splitlines())
    for text in candidates:
        text = text.strip().rstrip(".")
        if text and _EXPR_LINE.match(text):
            return text.split("=")[0].strip() or None
    return None


def _value(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand, used)
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left, used), _value(node.right, used)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise ZeroDivisionError
            return left / right
        op = _OPS.get(type(node.op))
        if op is not None:
            return op(left, right)
    raise ValueError(f"not allowed in a Countdown equation: {ast.dump(node)[:60]}")


def countdown_score(response: str, numbers: list[int] | tuple[int, ...], target: int) -> float:
    """1.0 if the equation equals ``target`` using each of ``numbers`` at most once, else 0.0."""
    equation = _equation(response)
    if equation is None or len(equation) > 256:
        return 0.0
    used: list[int] = []
    try:
        value = _value(ast.parse(equation, mode="eval").body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    if Counter(used) - Counter(numbers):
        return 0.0
    return 1.0 if value == target else 0.0
