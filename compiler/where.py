"""`curation.where`: exactly one boolean SQL expression, checked against the table's column types.

Owns the SQL dialect Lance's filter is written in, the one parse both the compiler and the runtime
use (so what plan checked is what apply runs), and the plan-time checks: one expression (no `;`,
no statements), a boolean result, no aggregates, table functions, subqueries or `CASE`, only
functions Lance knows, and comparisons Lance can make. Types it cannot tell are let through:
a check here only refuses what Lance would refuse at apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.tokens import TokenType

from ._sql_functions import AGGREGATE_FUNCTIONS, SCALAR_FUNCTIONS
from .errors import did_you_mean
from .types import ArrowType, TypeSyntaxError, parse_type

__all__ = ["LanceSQL", "WhereCheck", "WhereError", "check_where", "is_quantile", "parse_where"]

_EXAMPLE = "Write one SQL boolean expression, e.g. `ocr_token_count >= 16 AND question_type = 'what'`"


class LanceSQL(DuckDB):
    """DuckDB SQL as Lance's filter parser reads it: quoted identifiers use backticks."""

    class Tokenizer(DuckDB.Tokenizer):
        IDENTIFIERS = ["`", '"']


class WhereError(ValueError):
    """`where` is not one SQL expression; `what` and `fix` make the problem."""

    def __init__(self, what: str, fix: str = _EXAMPLE):
        super().__init__(what)
        self.what, self.fix = what, fix


def parse_where(where: str) -> exp.Expression:
    """The one expression of `where`; raises `WhereError` for a `;`, a statement or bad SQL."""
    try:
        tokens = LanceSQL().tokenize(where)
        semis = [t for t in tokens if t.token_type == TokenType.SEMICOLON]
        if semis:
            rest = where[semis[0].end + 1:].strip()
            raise WhereError(f"`;` ends the expression{f' and `{rest}` follows it' if rest else ''}: `where` "
                             "is one boolean expression, not SQL statements",
                             "Remove the `;` and what follows it")
        tree = sqlglot.parse_one(where, read=LanceSQL)
    except sqlglot.errors.SqlglotError as e:
        raise WhereError(f"cannot parse the SQL predicate: {str(e).splitlines()[0]}") from None
    if isinstance(tree, (exp.Query, exp.DDL, exp.DML, exp.Command, exp.Block)):
        raise WhereError(f"`{_short(tree)}` is a SQL statement, not a boolean expression")
    if isinstance(tree, exp.Alias):  # `n > 1 b`: a missing AND, read as `n > 1 AS b`
        raise WhereError(f"`{tree.alias}` follows the expression `{_short(tree.this)}`",
                         "Join conditions with AND or OR")
    return tree


def is_quantile(node: exp.Expression) -> bool:
    """`quantile(col, q)`, which the runtime replaces by a number before Lance sees the filter."""
    return isinstance(node, exp.Quantile) or (isinstance(node, exp.Anonymous) and node.name.lower() == "quantile")


@dataclass
class WhereCheck:
    """What `check_where` found: the columns read (top-level names) and the problems."""

    reads: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(what, fix) pairs."""


def check_where(where: str, types: dict[str, str]) -> WhereCheck:
    """Check `where` against `types` (column -> canonical Arrow type, those known)."""
    out = WhereCheck()
    try:
        tree = parse_where(where)
    except WhereError as e:
        out.problems.append((e.what, e.fix))
        return out
    out.reads = sorted({_root(c) for c in tree.find_all(exp.Column)})
    checker = _Types({k: t for k, v in types.items() if (t := _parse(v)) is not None}, out.problems)
    checker.shape(tree)
    kind = checker.kind(tree)
    if kind not in (None, "bool"):
        out.problems.append((f"`{_short(tree)}` is {_article(kind)} value, not a boolean: `where` keeps the rows "
                             "for which it is true", "Compare it, e.g. `x > 3`, or test it with `IS NOT NULL`"))
    return out


# --- types ---------------------------------------------------------------------------------

_INT_BITS = {f"{s}int{b}": b for s in ("", "u") for b in (8, 16, 32, 64)}
_KIND = {**{k: "int" for k in _INT_BITS}, "halffloat": "float", "float": "float", "double": "float",
         "string": "string", "large_string": "string", "bool": "bool", "binary": "binary",
         "large_binary": "binary", "list": "list", "large_list": "list", "fixed_size_list": "list",
         "struct": "struct", "date32[day]": "temporal"}
_CAST = {"int": ("TINYINT", "SMALLINT", "INT", "BIGINT", "UTINYINT", "USMALLINT", "UINT", "UBIGINT"),
         "float": ("FLOAT", "DOUBLE", "DECIMAL"), "string": ("VARCHAR", "TEXT", "CHAR"), "bool": ("BOOLEAN",)}
_RETURNS = {"int": "length char_length character_length octet_length bit_length strpos instr array_length "
                   "cardinality list_length array_position levenshtein",
            "string": "lower upper trim btrim ltrim rtrim concat concat_ws replace substr substring left right "
                      "lpad rpad initcap reverse repeat translate to_hex md5 array_to_string",
            "bool": "starts_with ends_with contains contains_tokens array_has array_contains list_has list_contains "
                    "array_has_all array_has_any list_has_all list_has_any arrays_overlap regexp_like isnan iszero "
                    "json_exists json_array_contains"}
_RETURN = {f: k for k, names in _RETURNS.items() for f in names.split()}
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ)
_BOOLEAN = (*_COMPARISONS, exp.And, exp.Or, exp.Not, exp.Xor, exp.In, exp.Between, exp.Like, exp.ILike, exp.Is,
            exp.Boolean, exp.RegexpLike, exp.RegexpILike, exp.SimilarTo)
_NAMES = {"int": "an integer", "float": "a floating-point", "string": "a string", "bool": "a boolean",
          "binary": "a binary", "list": "a list", "struct": "a struct", "temporal": "a date/time", "null": "a NULL"}


def _parse(t: str) -> ArrowType | None:
    try:
        return parse_type(t)
    except TypeSyntaxError:
        return None


def _kind(t: ArrowType | None) -> str | None:
    if t is None:
        return None
    return "temporal" if t.kind.startswith(("timestamp", "date")) else _KIND.get(t.kind)


def _article(kind: str) -> str:
    return _NAMES.get(kind, f"a {kind}")


def _short(node: exp.Expression, width: int = 60) -> str:
    text = node.sql(dialect=LanceSQL)
    return text if len(text) <= width else text[: width - 3] + "..."


def _root(col: exp.Column) -> str:
    parts = col.parts
    return parts[0].name if parts else col.name


def _function_name(node: exp.Func) -> str | None:
    """The name Lance receives for a call (sqlglot's DuckDB spelling), or None for syntax like CAST.

    sqlglot models some operators as functions (`~` is `RegexpLike`, rendered `REGEXP_MATCHES(..)`),
    so what counts is the rendering: a call is `NAME(...)` whose parenthesis closes at the end."""
    if isinstance(node, exp.Anonymous):
        return node.name.lower()
    text = node.sql(dialect=LanceSQL)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(", text)
    if not m or m.group(1).lower() in ("cast", "try_cast") or _closing(text, m.end() - 1) != len(text) - 1:
        return None
    return m.group(1).lower()


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start` (quotes skipped), or -1."""
    depth, quote = 0, ""
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if not depth:
                return i
    return -1


class _Types:
    """Infers what it can of each sub-expression's type and records what Lance would refuse."""

    def __init__(self, columns: dict[str, ArrowType], problems: list[tuple[str, str]]):
        self.columns, self.problems = columns, problems

    def refuse(self, what: str, fix: str) -> None:
        if (what, fix) not in self.problems:
            self.problems.append((what, fix))

    # -- shape: what Lance's filter can never run, whatever the types --------------------------
    def shape(self, tree: exp.Expression) -> None:
        for node in tree.walk(prune=lambda n: isinstance(n, (exp.Subquery, exp.Query))):
            if isinstance(node, (exp.Subquery, exp.Query)):
                self.refuse(f"`{_short(node)}` is a subquery: `where` filters the rows of this table alone",
                            "Compute the value into a column, or use `quantile(col, q)` for a table-wide threshold")
            elif isinstance(node, exp.Case):
                self.refuse("Lance's filter does not support `CASE`", "Write it with AND / OR / NOT")
            elif isinstance(node, exp.UDTF) or (isinstance(node, exp.Func) and _function_name(node) == "unnest"):
                self.refuse(f"`{_short(node)}` is a table function: it returns rows, and `where` tests one row at "
                            "a time", "Test the list with a scalar function, e.g. `array_has(col, 'x')`")
            elif isinstance(node, exp.Window):
                self.refuse(f"`{_short(node)}` is a window function: `where` tests one row at a time",
                            "Compute the value into a column first")
            elif isinstance(node, exp.Func) and not is_quantile(node):
                self.function(node)
            elif isinstance(node, exp.Quantile) or is_quantile(node):
                self.quantile(node)

    def function(self, node: exp.Func) -> None:
        name = _function_name(node)
        if name is None:
            return
        if isinstance(node, exp.AggFunc) or name in AGGREGATE_FUNCTIONS:
            self.refuse(f"`{name}` is an aggregate function: `where` tests one row at a time",
                        "For a threshold over the whole table use `quantile(col, q)`, e.g. "
                        "`n >= quantile(n, 0.5)`")
        elif name not in SCALAR_FUNCTIONS:
            self.refuse(f"unknown function `{name}` in `{_short(node)}`: Lance's filter has no such function",
                        did_you_mean(name, SCALAR_FUNCTIONS) or "Lance runs DataFusion's scalar functions, e.g. "
                        "`length`, `lower`, `starts_with`, `array_has`, `regexp_like`")

    def quantile(self, node: exp.Expression) -> None:
        args = list(node.expressions) if isinstance(node, exp.Anonymous) else [node.this, node.args.get("quantile")]
        ok = len(args) == 2 and isinstance(args[0], exp.Column) and isinstance(args[1], exp.Literal) \
            and not args[1].is_string and 0.0 <= float(args[1].this) <= 1.0
        if not ok:
            self.refuse(f"`{_short(node)}` is not `quantile(column, q)` with 0 <= q <= 1",
                        "Write e.g. `quantile(ocr_token_count, 0.75)`")
            return
        kind = self.kind(args[0])
        if kind not in (None, "int", "float"):
            self.refuse(f"`quantile({args[0].sql()}, ...)` needs a numeric column; `{args[0].sql()}` is "
                        f"{_article(kind)} column", "Pick a numeric column")

    # -- types ----------------------------------------------------------------------------------
    def column(self, node: exp.Expression) -> ArrowType | None:
        """The Arrow type of a column or struct-field reference (None when unknown)."""
        if isinstance(node, exp.Dot):
            base, name = self.column(node.this), node.expression.name
        elif isinstance(node, exp.Column):
            parts = [p.name for p in node.parts]
            t = self.columns.get(parts[0])
            for name in parts[1:]:
                t = dict(t.fields).get(name) if t is not None and t.kind == "struct" else None
            return t
        else:
            return None
        return dict(base.fields).get(name) if base is not None and base.kind == "struct" else None

    def kind(self, node: exp.Expression) -> str | None:
        """`int`, `float`, `string`, `bool`, ..., `null`, or None when it cannot tell."""
        if isinstance(node, exp.Paren):
            return self.kind(node.this)
        if isinstance(node, (exp.Column, exp.Dot)):
            return _kind(self.column(node))
        if isinstance(node, exp.Literal):
            return "string" if node.is_string else ("int" if node.is_int else "float")
        if isinstance(node, exp.Null):
            return "null"
        if isinstance(node, _BOOLEAN):
            self.operands(node)
            return "bool"
        if isinstance(node, exp.Neg):
            return self.kind(node.this)
        if isinstance(node, (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Mod)):
            kinds = {self.kind(node.left), self.kind(node.right)}
            return None if not kinds <= {"int", "float"} else ("float" if "float" in kinds else "int")
        if isinstance(node, exp.DPipe):
            return "string"
        if isinstance(node, (exp.Cast, exp.TryCast)):
            to = node.to.sql(dialect=LanceSQL).upper()
            return next((k for k, names in _CAST.items() if to.split("(")[0] in names), None)
        if isinstance(node, exp.Bracket):
            t = self.column(node.this)
            return _kind(t.item) if t is not None and t.item is not None else None
        if is_quantile(node):
            return "float"
        if isinstance(node, exp.Func):
            name = _function_name(node)
            if name == "abs":
                return self.kind(node.this)
            return _RETURN.get(name or "")
        return None

    def operands(self, node: exp.Expression) -> None:
        """Check the operands of a boolean-valued node."""
        if isinstance(node, (exp.And, exp.Or, exp.Xor)):
            for side in (node.left, node.right):
                self.boolean(side, node)
        elif isinstance(node, exp.Not):
            self.boolean(node.this, node)
        elif isinstance(node, _COMPARISONS):
            self.compare(node.left, node.right, node)
        elif isinstance(node, exp.In):
            for item in node.expressions:
                self.compare(node.this, item, node)
        elif isinstance(node, exp.Between):
            self.compare(node.this, node.args["low"], node)
            self.compare(node.this, node.args["high"], node)
        elif isinstance(node, (exp.Like, exp.ILike)):
            kind = self.kind(node.this)
            if kind not in (None, "string", "null"):
                self.refuse(f"`{_short(node)}` matches a pattern against {_article(kind)} value",
                            "LIKE compares strings; compare numbers with = < >")

    def boolean(self, side: exp.Expression, node: exp.Expression) -> None:
        kind = self.kind(side)
        if kind not in (None, "bool", "null"):
            self.refuse(f"`{_short(side)}` in `{_short(node)}` is {_article(kind)} value, not a boolean",
                        "Compare it, e.g. `x > 3`, or test it with `IS NOT NULL`")

    def compare(self, left: exp.Expression, right: exp.Expression, node: exp.Expression) -> None:
        lk, rk = self.kind(left), self.kind(right)
        if None in (lk, rk) or "null" in (lk, rk):
            return
        for col, lit in ((left, right), (right, left)):
            if self.literal(col, lit, node):
                return
        numeric = {"int", "float"}
        if lk != rk and not ({lk, rk} <= numeric) and {lk, rk} <= numeric | {"string", "bool"}:
            self.refuse(f"`{_short(node)}` compares {_article(lk)} value with {_article(rk)} one",
                        "Compare values of one type, or CAST one side")

    def literal(self, col: exp.Expression, lit: exp.Expression, node: exp.Expression) -> bool:
        """A column (or field) compared with a literal: Lance converts the literal to the column's
        type and refuses what does not convert. True when it judged the pair."""
        value = lit.this if isinstance(lit, exp.Neg) else lit
        if not isinstance(value, (exp.Literal, exp.Boolean)) or not isinstance(col, (exp.Column, exp.Dot)):
            return False
        t = self.column(col)
        kind, lkind = _kind(t), ("bool" if isinstance(value, exp.Boolean) else self.kind(value))
        name = f"`{col.sql(dialect=LanceSQL)}`"
        if kind is None or kind == "temporal":
            return True
        if kind == "int" and lkind == "int":
            n = int(value.this) * (-1 if isinstance(lit, exp.Neg) else 1)
            bits = _INT_BITS[t.kind]
            lo, hi = (0, 2**bits - 1) if t.kind.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if not lo <= n <= hi:
                self.refuse(f"`{_short(node)}`: {n} does not fit {name}, which is `{t.kind}` ({lo} to {hi})",
                            "Compare with a value in the column's range")
            return True
        if kind == "int" and lkind == "float":
            self.refuse(f"`{_short(node)}` compares the integer column {name} with the decimal {lit.sql()}: "
                        "Lance does not convert it", f"Compare with an integer, or write "
                        f"`CAST({col.sql(dialect=LanceSQL)} AS DOUBLE)`")
            return True
        if kind == lkind or (kind == "float" and lkind == "int"):
            return True
        self.refuse(f"`{_short(node)}` compares {name}, {_article(kind)} column (`{t}`), with "
                    f"{_article(lkind)} literal", _LITERAL_FIX.get(kind, "Compare it with a value of its type"))
        return True


_LITERAL_FIX = {"string": "Quote the value, e.g. `question = 'what'`, or compare a number such as "
                          "`length(question) > 3`",
                "int": "Compare with a number", "float": "Compare with a number",
                "bool": "Compare with TRUE or FALSE, or use the column alone",
                "list": "Test the list with a function, e.g. `array_has(col, 'x')` or `array_length(col) > 3`",
                "struct": "Compare one of its fields, e.g. `col.width > 100`",
                "binary": "Test it with `IS NULL` / `IS NOT NULL`"}
