"""The template sandbox of spec files, with a budget on the work one render may do.

jinja's sandbox caps one `range()` and blocks attribute escapes, but not the total work: nested
loops, or text doubled in a loop, hang or exhaust memory. Every render here gets a budget of loop
iterations (+ `range` items), characters of text built or emitted, and wall-clock time; going over
raises `LimitExceeded`, which the caller locates at the template line that did it.
"""

from __future__ import annotations

import time
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.visitor import NodeTransformer
from jinja2.sandbox import SandboxedEnvironment, safe_range

__all__ = ["LimitExceeded", "MAX_ITERATIONS", "MAX_SECONDS", "MAX_TEXT", "bounded_render", "bounded_template",
           "environment"]

MAX_ITERATIONS = 1_000_000
"""Loop iterations plus `range()` items in one render (a real spec loops over tens of items)."""
MAX_TEXT = 1_000_000
"""Characters of text one render may emit, and the longest string or list built along the way."""
MAX_SECONDS = 5.0
"""Wall-clock time of one render (a real spec renders in milliseconds)."""
MAX_VALUES = 1_000_000
_PADDING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# Globals the bounded template calls (a template naming them only calls the budget itself).
_LOOP, _EMIT, _SIZE, _ARG = (f"_vlmspec_{n}" for n in ("loop", "emit", "size", "arg"))


class LimitExceeded(Exception):
    """A template went over its budget; `what` and `fix` make the located problem."""

    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix = what, fix


_LOOP_FIX = "Loop over fewer items: templates in a spec repeat small blocks, they do not compute"
_TEXT_FIX = "Build less text: a rendered spec is a page of YAML"


class _Budget:
    def __init__(self) -> None:
        self.iterations = 0
        self.emitted = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def tick(self, n: int = 1) -> None:
        self.iterations += n
        if self.iterations > MAX_ITERATIONS:
            raise LimitExceeded(f"the templates run more than {MAX_ITERATIONS:,} loop iterations "
                                "(`range` items count too); nested loops multiply", _LOOP_FIX)
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"rendering the templates took more than {MAX_SECONDS:g} s", _LOOP_FIX)

    def size(self, value: Any) -> Any:
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_TEXT:
            raise LimitExceeded(f"a template builds a value of {len(value):,} items or characters "
                                f"(the limit is {MAX_TEXT:,})", _TEXT_FIX)
        return value

    def emit(self, value: Any) -> Any:
        self.emitted += len(value) if isinstance(value, str) else len(str(value))
        if self.emitted > MAX_TEXT:
            raise LimitExceeded(f"the templates write more than {MAX_TEXT:,} characters", _TEXT_FIX)
        self.tick(0)
        return value

    def arg(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEXT:
            raise LimitExceeded(f"a template passes {value:,} to a filter or string method (the limit is {MAX_TEXT:,})", _TEXT_FIX)
        return value

    def loop(self, iterable: Any):
        for item in iterable:
            self.tick()
            yield item

    def range(self, *args: int) -> range:
        r = safe_range(*args)  # jinja's own cap on one range, then ours on the total
        self.tick(len(r))
        return r


class _Sandbox(SandboxedEnvironment):
    """The jinja sandbox, also refusing arithmetic and calls that would hang or exhaust memory."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    budget: _Budget

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        seqs = (str, bytes, list, tuple)
        if operator == "**":
            too_big = isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > 10**6
        elif operator == "*":  # "x" * 10**9 or [0] * 10**9
            too_big = any(isinstance(seq, seqs) and isinstance(n, int) and len(seq) * n > MAX_VALUES
                          for seq, n in ((left, right), (right, left)))
        elif operator == "+":
            too_big = isinstance(left, seqs) and isinstance(right, seqs) and len(left) + len(right) > MAX_TEXT
        else:  # "%": "%0*d" % (10**9, 1) pads to its width argument
            args = right if isinstance(right, tuple) else (right,)
            too_big = isinstance(left, str) and any(isinstance(a, int) and abs(a) > MAX_TEXT for a in args)
        if too_big:
            raise jinja2.exceptions.SecurityError(f"the result of `{operator}` would be too large")
        self.budget.tick(0)
        return self.budget.size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        if getattr(__obj, "__name__", "") in _PADDING and isinstance(getattr(__obj, "__self__", None), str):
            for a in (*args, *kwargs.values()):
                __self.budget.arg(a)
        __self.budget.tick(0)
        return __self.budget.size(super().call(__context, __obj, *args, **kwargs))


def environment() -> _Sandbox:
    """A fresh sandbox with its own budget (one per render)."""
    env = _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.optimized = False  # constant folding would run filters at compile time, outside the budget
    env.globals.pop("lipsum", None)  # lipsum(n) can generate unbounded text
    env.budget = budget = _Budget()
    env.globals.update({"range": budget.range, _LOOP: budget.loop, _EMIT: budget.emit, _SIZE: budget.size,
                        _ARG: budget.arg})
    return env


class _Bound(NodeTransformer):
    """Route every loop, emitted value, filter and `~` of a template through the budget."""

    def __init__(self, env: SandboxedEnvironment):
        self.env = env

    def _call(self, name: str, node: nodes.Node) -> nodes.Call:
        call = nodes.Call(nodes.Name(name, "load"), [node], [], None, None)
        return call.set_lineno(node.lineno).set_environment(self.env)

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._call(_LOOP, node.iter)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [self._call(_EMIT, n) for n in node.nodes]
        return node

    def _bound_args(self, node: nodes.Filter) -> None:
        node.args = [self._call(_ARG, a) for a in node.args]
        for kw in node.kwargs:
            kw.value = self._call(_ARG, kw.value)

    def visit_Filter(self, node: nodes.Filter) -> nodes.Node:
        node = self.generic_visit(node)
        self._bound_args(node)
        return self._call(_SIZE, node)

    def visit_FilterBlock(self, node: nodes.FilterBlock) -> nodes.FilterBlock:
        # The block's own filter must stay a Filter node: bound its arguments, not its result
        # (its body's output is counted where it is emitted).
        node.body = [self.visit(n) for n in node.body]
        self._bound_args(node.filter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        return self._call(_SIZE, self.generic_visit(node))


def bounded_template(env: _Sandbox, ast: nodes.Template) -> jinja2.Template:
    """Compile a parsed template so that rendering it spends `env`'s budget (rewrites `ast`)."""
    return env.from_string(_Bound(env).visit(ast))


def bounded_render(env: _Sandbox, ast: nodes.Template, context: dict[str, Any]) -> str:
    """Compile and render `ast` within `env`'s budget."""
    return "".join(bounded_template(env, ast).generate(context))
