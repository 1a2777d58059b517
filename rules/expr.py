"""The safe expression compiler: a small Python-like subset compiled once into nested closures.

Owns ``compile_expr`` and the expression limits. Source text is parsed with ``ast`` and every node is checked
against an allowlist before anything runs; there is no ``eval``, no ``exec``, no ``getattr``. Dotted point names
(``zone3.co2``) become dictionary look-ups in the dict of current values passed to the compiled function.

Types are checked at compile time: every expression is ``num``, ``bool`` or ``str`` (``any`` only when the point
registry is unknown, as in ``rules check`` without a site). ``and``/``or``/``not`` need booleans, arithmetic needs
numbers, so ``zone3.co2 and 5`` is a load error rather than a surprise at 3 a.m.

Limits (source length, node count, nesting depth, string length, constant size, power exponent) are checked before
compiling, so hostile input is rejected in well under a millisecond. ``**`` is computed as float with ``math.pow``:
it can overflow (an error) but never builds a huge integer.

Imports nothing from the gateway runtime: it is a pure function of text and a name -> kind mapping.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["num", "bool", "str", "any"]
Values = dict[str, Any]
Evaluator = Callable[[Values], Any]

MAX_SOURCE_CHARS = 2000
#: a sum of 100 meters is about 500 nodes (names and contexts count)
MAX_NODES = 1000
MAX_DEPTH = 100
MAX_STRING_CHARS = 256
#: integers beyond this are almost certainly a typo, and keep every value a float-representable number
MAX_INT_CONSTANT = 2**53
#: a constant exponent beyond this is rejected at load ("huge power"); math.pow would overflow anyway
MAX_POWER_EXPONENT = 1000

#: the only functions an expression may call: name -> (min args, max args)
FUNCTIONS: dict[str, tuple[int, int]] = {
    "abs": (1, 1),
    "min": (2, 8),
    "max": (2, 8),
    "round": (1, 2),
    "clamp": (3, 3),
    "sqrt": (1, 1),
}

_BOOL_NAMES = {"true": True, "false": False}


class ExprError(Exception):
    """An expression is invalid; ``line`` and ``col`` are 1-based positions inside the expression text."""

    def __init__(self, message: str, line: int = 1, col: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.col = col


class ExprRuntimeError(Exception):
    """A compiled expression failed while evaluating (division by zero, overflow, sqrt of a negative)."""


@dataclass(frozen=True, slots=True)
class CompiledExpr:
    """A checked, compiled expression. ``evaluate(values)`` reads point ids and let names from ``values``."""

    source: str
    evaluate: Evaluator
    kind: Kind
    #: point ids (``device.point``) the expression reads
    points: frozenset[str]
    #: let names the expression reads
    lets: frozenset[str]

    def run(self, values: Values) -> Any:
        """Evaluate, turning every failure into ``ExprRuntimeError`` (the engine calls ``evaluate`` directly)."""
        try:
            return self.evaluate(values)
        except (ArithmeticError, ValueError, TypeError, KeyError) as exc:
            raise ExprRuntimeError(f"{type(exc).__name__}: {exc}") from exc


def _clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def _pow(base: float, exponent: float) -> float:
    return math.pow(base, exponent)


def _round(value: float, digits: int = 0) -> float:
    return round(value, digits)


_CALLS: dict[str, Callable[..., Any]] = {
    "abs": abs,
    "min": min,
    "max": max,
    "round": _round,
    "clamp": _clamp,
    "sqrt": math.sqrt,
}

_ARITH: dict[type[ast.operator], tuple[str, Callable[[Any, Any], Any]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
    ast.FloorDiv: ("//", operator.floordiv),
    ast.Mod: ("%", operator.mod),
    ast.Pow: ("**", _pow),
}

_COMPARE: dict[type[ast.cmpop], tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Lt: ("<", operator.lt),
    ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt),
    ast.GtE: (">=", operator.ge),
    ast.Eq: ("==", operator.eq),
    ast.NotEq: ("!=", operator.ne),
}

#: what a user wrote, in words, for nodes we refuse
_REFUSED_WORDS: dict[type[ast.AST], str] = {
    ast.Subscript: "indexing (x[...])",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions",
    ast.JoinedStr: "f-strings",
    ast.NamedExpr: "assignment (:=)",
    ast.Starred: "*-unpacking",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}


@dataclass(frozen=True, slots=True)
class _Node:
    fn: Evaluator
    kind: Kind
    #: set for constants (so ``-5`` folds and comparisons against constants get a fast path)
    constant: Any = None
    is_constant: bool = False
    #: set for a bare point or let look-up (fast path for ``zone3.co2 > 1000``)
    name: str | None = None


class _Compiler:
    def __init__(self, source: str, points: Mapping[str, Kind], lets: Mapping[str, Kind]) -> None:
        self.source = source
        self.lines = source.splitlines() or [""]
        self.points = points
        self.lets = lets
        self.used_points: set[str] = set()
        self.used_lets: set[str] = set()

    def error(self, node: ast.AST, message: str) -> ExprError:
        line = getattr(node, "lineno", 1)
        byte_col = getattr(node, "col_offset", 0)
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        # ast columns count UTF-8 bytes; people count characters
        col = len(text.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore")) + 1
        return ExprError(message, line, col)

    def compile(self, node: ast.AST) -> _Node:
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.Attribute):
            return self.attribute(node)
        if isinstance(node, ast.BinOp):
            return self.binop(node)
        if isinstance(node, ast.UnaryOp):
            return self.unaryop(node)
        if isinstance(node, ast.BoolOp):
            return self.boolop(node)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.IfExp):
            return self.ifexp(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        words = _REFUSED_WORDS.get(type(node), type(node).__name__)
        raise self.error(node, f"{words} not allowed in rule expressions")

    # leaves ---------------------------------------------------------------------------------------------------

    def constant(self, node: ast.Constant) -> _Node:
        value = node.value
        if isinstance(value, bool):
            return _const(value, "bool")
        if isinstance(value, int):
            if abs(value) > MAX_INT_CONSTANT:
                raise self.error(node, f"number too large (limit {MAX_INT_CONSTANT})")
            return _const(value, "num")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.error(node, "number too large")
            return _const(value, "num")
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise self.error(node, f"string is {len(value)} characters long; the limit is {MAX_STRING_CHARS}")
            return _const(value, "str")
        raise self.error(node, f"constant {value!r} not allowed (use numbers, true/false or 'text')")

    def name(self, node: ast.Name) -> _Node:
        ident = node.id
        if ident.startswith("__"):
            raise self.error(node, f"name {ident!r} not allowed (names starting with __ are reserved)")
        if ident in _BOOL_NAMES:
            return _const(_BOOL_NAMES[ident], "bool")
        if ident in self.lets:
            self.used_lets.add(ident)
            return _lookup(ident, self.lets[ident])
        if ident in FUNCTIONS:
            raise self.error(node, f"{ident} is a function: call it, like {ident}(...)")
        lets = ", ".join(sorted(self.lets)) or "none defined"
        raise self.error(node, f"unknown name {ident!r}: points are written device.point; let names here: {lets}")

    def attribute(self, node: ast.Attribute) -> _Node:
        if node.attr.startswith("__") or (isinstance(node.value, ast.Name) and node.value.id.startswith("__")):
            raise self.error(node, f"attribute {node.attr!r} not allowed (names starting with __ are reserved)")
        if not isinstance(node.value, ast.Name):
            raise self.error(node, "attribute access not allowed: only device.point names can contain a dot")
        point = f"{node.value.id}.{node.attr}"
        kind = self.points.get(point)
        if kind is None:
            raise self.error(node, f"unknown point {point!r}{_suggest(point, self.points)}")
        self.used_points.add(point)
        return _lookup(point, kind)

    # operators ------------------------------------------------------------------------------------------------

    def need(self, node: ast.AST, part: _Node, kind: Kind, what: str) -> None:
        if part.kind not in (kind, "any"):
            raise self.error(node, f"{what} needs {_KIND_WORDS[kind]}, got {_KIND_WORDS[part.kind]}")

    def binop(self, node: ast.BinOp) -> _Node:
        entry = _ARITH.get(type(node.op))
        if entry is None:
            raise self.error(node, f"operator {type(node.op).__name__} not allowed (use + - * / // % **)")
        symbol, op = entry
        left = self.compile(node.left)
        right = self.compile(node.right)
        self.need(node.left, left, "num", f"'{symbol}'")
        self.need(node.right, right, "num", f"'{symbol}'")
        if symbol == "**" and right.is_constant and abs(right.constant) > MAX_POWER_EXPONENT:
            raise self.error(node.right, f"huge power: the exponent limit is {MAX_POWER_EXPONENT}")
        if symbol in ("/", "//", "%") and right.is_constant and right.constant == 0:
            raise self.error(node.right, "division by zero")
        if left.is_constant and right.is_constant:
            # folded now, so a constant exponent like 10 ** 10 is seen by the huge-power check above it
            try:
                folded = op(left.constant, right.constant)
            except (ArithmeticError, ValueError) as exc:
                raise self.error(node, f"cannot compute this constant: {exc}") from None
            if isinstance(folded, float) and not math.isfinite(folded):
                raise self.error(node, "number too large")
            if isinstance(folded, int) and abs(folded) > MAX_INT_CONSTANT:
                raise self.error(node, f"number too large (limit {MAX_INT_CONSTANT})")
            return _const(folded, "num")
        lf, rf = left.fn, right.fn
        if right.is_constant:
            c = right.constant
            if left.name is not None:
                key = left.name
                return _Node(lambda v: op(v[key], c), "num")
            return _Node(lambda v: op(lf(v), c), "num")
        return _Node(lambda v: op(lf(v), rf(v)), "num")

    def unaryop(self, node: ast.UnaryOp) -> _Node:
        operand = self.compile(node.operand)
        if isinstance(node.op, ast.Not):
            self.need(node.operand, operand, "bool", "'not'")
            f = operand.fn
            return _Node(lambda v: not f(v), "bool")
        if isinstance(node.op, ast.USub | ast.UAdd):
            self.need(node.operand, operand, "num", "unary minus")
            if isinstance(node.op, ast.UAdd):
                return operand
            if operand.is_constant:
                return _const(-operand.constant, "num")
            f = operand.fn
            return _Node(lambda v: -f(v), "num")
        raise self.error(node, "operator ~ not allowed")

    def boolop(self, node: ast.BoolOp) -> _Node:
        word = "'and'" if isinstance(node.op, ast.And) else "'or'"
        parts = [self.compile(value) for value in node.values]
        for value, part in zip(node.values, parts, strict=True):
            self.need(value, part, "bool", word)
        fns = tuple(p.fn for p in parts)
        if isinstance(node.op, ast.And):
            if len(fns) == 2:
                a, b = fns
                return _Node(lambda v: bool(a(v)) and bool(b(v)), "bool")
            return _Node(lambda v: all(f(v) for f in fns), "bool")
        if len(fns) == 2:
            a, b = fns
            return _Node(lambda v: bool(a(v)) or bool(b(v)), "bool")
        return _Node(lambda v: any(f(v) for f in fns), "bool")

    def compare(self, node: ast.Compare) -> _Node:
        operands = [node.left, *node.comparators]
        parts = [self.compile(o) for o in operands]
        steps: list[tuple[Callable[[Any, Any], bool], Evaluator, Evaluator]] = []
        for index, cmp in enumerate(node.ops):
            entry = _COMPARE.get(type(cmp))
            if entry is None:
                raise self.error(node, f"comparison {type(cmp).__name__} not allowed (use < <= > >= == !=)")
            symbol, op = entry
            left, right = parts[index], parts[index + 1]
            if symbol in ("==", "!="):
                if "any" not in (left.kind, right.kind) and left.kind != right.kind:
                    raise self.error(
                        operands[index + 1],
                        f"'{symbol}' compares {_KIND_WORDS[left.kind]} with {_KIND_WORDS[right.kind]}",
                    )
            else:
                self.need(operands[index], left, "num", f"'{symbol}'")
                self.need(operands[index + 1], right, "num", f"'{symbol}'")
            steps.append((op, left.fn, right.fn))
        if len(steps) == 1:
            op, lf, rf = steps[0]
            left, right = parts
            if left.name is not None and right.is_constant:
                key, c = left.name, right.constant
                return _Node(lambda v: op(v[key], c), "bool")
            if right.is_constant:
                c = right.constant
                return _Node(lambda v: op(lf(v), c), "bool")
            return _Node(lambda v: op(lf(v), rf(v)), "bool")
        fns = tuple(p.fn for p in parts)
        ops = tuple(s[0] for s in steps)

        def chained(v: Values) -> bool:
            left_value = fns[0](v)
            for op, f in zip(ops, fns[1:], strict=True):
                right_value = f(v)
                if not op(left_value, right_value):
                    return False
                left_value = right_value
            return True

        return _Node(chained, "bool")

    def ifexp(self, node: ast.IfExp) -> _Node:
        test = self.compile(node.test)
        self.need(node.test, test, "bool", "'if' condition")
        body = self.compile(node.body)
        orelse = self.compile(node.orelse)
        if "any" not in (body.kind, orelse.kind) and body.kind != orelse.kind:
            raise self.error(
                node.orelse,
                f"both branches of 'if' must have one type: {_KIND_WORDS[body.kind]} vs {_KIND_WORDS[orelse.kind]}",
            )
        t, b, o = test.fn, body.fn, orelse.fn
        return _Node(lambda v: b(v) if t(v) else o(v), body.kind if body.kind != "any" else orelse.kind)

    def call(self, node: ast.Call) -> _Node:
        func = node.func
        if isinstance(func, ast.Attribute):
            self.attribute_call_guard(func)
        if not isinstance(func, ast.Name):
            raise self.error(node, "only the built-in functions can be called: " + ", ".join(FUNCTIONS))
        if func.id.startswith("__") or func.id not in FUNCTIONS:
            raise self.error(func, f"function {func.id!r} not allowed; available: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise self.error(node.keywords[0].value, f"{func.id}() takes no keyword arguments")
        low, high = FUNCTIONS[func.id]
        if not low <= len(node.args) <= high:
            expected = str(low) if low == high else f"{low} to {high}"
            raise self.error(node, f"{func.id}() takes {expected} arguments, got {len(node.args)}")
        args = [self.compile(a) for a in node.args]
        for arg_node, arg in zip(node.args, args, strict=True):
            self.need(arg_node, arg, "num", f"{func.id}()")
        if func.id == "round" and len(args) == 2:
            digits = args[1]
            if not digits.is_constant or not isinstance(digits.constant, int) or not 0 <= digits.constant <= 12:
                raise self.error(node.args[1], "round() digits must be a whole number from 0 to 12")
        target = _CALLS[func.id]
        fns = tuple(a.fn for a in args)
        if len(fns) == 1:
            (a,) = fns
            return _Node(lambda v: target(a(v)), "num")
        if len(fns) == 2:
            a, b = fns
            return _Node(lambda v: target(a(v), b(v)), "num")
        if len(fns) == 3:
            a, b, c = fns
            return _Node(lambda v: target(a(v), b(v), c(v)), "num")
        return _Node(lambda v: target(*[f(v) for f in fns]), "num")

    def attribute_call_guard(self, func: ast.Attribute) -> None:
        if func.attr.startswith("__"):
            raise self.error(func, f"attribute {func.attr!r} not allowed (names starting with __ are reserved)")
        raise self.error(func, "method calls not allowed: only " + ", ".join(FUNCTIONS) + " can be called")


_KIND_WORDS: dict[Kind, str] = {"num": "a number", "bool": "true/false", "str": "text", "any": "a value"}


def _const(value: Any, kind: Kind) -> _Node:
    return _Node(lambda v: value, kind, constant=value, is_constant=True)


def _lookup(key: str, kind: Kind) -> _Node:
    return _Node(lambda v: v[key], kind, name=key)


def _suggest(name: str, known: Mapping[str, Kind]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_shape(tree: ast.AST, compiler: _Compiler) -> None:
    """Count nodes and nesting without recursion, before the (recursive) compiler sees the tree."""
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise compiler.error(node, f"expression too large: more than {MAX_NODES} parts")
        if depth > MAX_DEPTH:
            raise compiler.error(node, f"expression nested too deeply: more than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def compile_expr(
    source: str,
    points: Mapping[str, Kind],
    lets: Mapping[str, Kind] | None = None,
    *,
    want: Kind | None = None,
) -> CompiledExpr:
    """Check and compile ``source``; raise ``ExprError`` (with a position inside ``source``) when it is refused.

    ``points`` maps each known point id to its kind; ``lets`` the let names in scope. ``want`` is the kind the
    caller needs (``bool`` for ``when:``), checked here so the error points at the expression.
    """
    if not isinstance(source, str):
        raise ExprError("an expression must be text")
    if len(source) > MAX_SOURCE_CHARS:
        raise ExprError(f"expression is {len(source)} characters long; the limit is {MAX_SOURCE_CHARS}")
    if not source.strip():
        raise ExprError("empty expression")
    if "\x00" in source:
        raise ExprError("expression contains a NUL character", 1, source.index("\x00") + 1)
    # A multi-line YAML scalar is one logical line: newlines become spaces, so character offsets stay the same and
    # an error maps back to its own line and column of the original text.
    flat = source.replace("\r", " ").replace("\n", " ")
    body = flat.lstrip()
    lead = len(flat) - len(body)
    body = body.rstrip()
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as exc:
        # offset 0 (or past the end) means "at the end of the input": an unfinished expression
        offset = exc.offset if exc.offset and 0 < exc.offset <= len(body) else len(body) + 1
        raise ExprError(f"syntax error: {exc.msg}", *_position(source, lead + offset - 1)) from None
    except (RecursionError, MemoryError, ValueError, OverflowError) as exc:
        raise ExprError(f"expression refused: {type(exc).__name__}") from None
    compiler = _Compiler(body, points, lets or {})
    try:
        _check_shape(tree.body, compiler)
        node = compiler.compile(tree.body)
        if want is not None and node.kind not in (want, "any"):
            raise ExprError(f"this expression must give {_KIND_WORDS[want]}, it gives {_KIND_WORDS[node.kind]}")
    except ExprError as exc:
        exc.line, exc.col = _position(source, lead + exc.col - 1)
        raise
    except RecursionError:
        raise ExprError("expression nested too deeply", *_position(source, lead)) from None
    return CompiledExpr(
        source=source,
        evaluate=node.fn,
        kind=node.kind,
        points=frozenset(compiler.used_points),
        lets=frozenset(compiler.used_lets),
    )


def _position(source: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of character ``index`` of ``source``."""
    index = max(0, min(index, len(source)))
    line_start = source.rfind("\n", 0, index) + 1
    return source.count("\n", 0, index) + 1, index - line_start + 1


def kind_of_value(value: Any) -> Kind:
    """The expression kind of a literal YAML value (``40`` -> num, ``true`` -> bool)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "num"
    return "str"
