"""Calling UDFs: import them, call them on a batch under the column's error policy, and bind class
UDFs (models) to their context. Shared by every executor; knows nothing of tables or commits.

A batch that raises is retried row by row to isolate the bad rows (`on_error: null` keeps the
others and records the failures; `fail` raises `RowError` naming the first), except a CUDA
out-of-memory error, which halves the batch first: too big a batch is not a bad row.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa

from .arrow_types import to_pyarrow
from .udfs.base import UdfContext

if TYPE_CHECKING:  # not at run time: worker processes must not pay for importing the compiler
    from vlmspec.compiler.compile import ColumnNode

__all__ = ["BoundInstance", "RowError", "describe", "RowFailure", "call", "compute", "instantiate", "is_cuda_oom", "load_udf"]


@dataclass(frozen=True)
class RowFailure:
    """A row a UDF failed on: its offset in the batch (or chunk) and the error text."""

    offset: int
    error: str


def load_udf(node: ColumnNode) -> Any:
    """Import the implementation: builtins by module path, user UDFs from the file the spec named."""
    module, _, attr = node.impl.partition(":")
    if node.udf == node.impl:  # user UDF: import from the resolved file, under a private name
        # The name covers the file's content, not just its path: a long-lived process (a notebook,
        # tests, a second apply) that edits the UDF must run the new code, which is what the new
        # fingerprint was compiled from, not the module cached from the old file.
        content = hashlib.sha256(Path(node.impl_file).read_bytes()).hexdigest()[:16]
        name = f"vlmspec_user_udf_{abs(hash(node.impl_file))}_{content}"
        mod = sys.modules.get(name)
        if mod is None:
            spec = importlib.util.spec_from_file_location(name, node.impl_file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    return getattr(mod, attr)


def call(fn: Callable, arrays: list[pa.Array], params: dict, out_type: pa.DataType, batch: bool) -> pa.Array:
    if batch:
        result = fn(*arrays, **params)
    else:
        cols = [a.to_pylist() for a in arrays]
        result = [fn(*row, **params) for row in zip(*cols)]
    if isinstance(result, pa.ChunkedArray):
        result = result.combine_chunks()
    if not isinstance(result, pa.Array):
        result = pa.array(result, type=out_type)
    elif result.type != out_type:
        result = result.cast(out_type)
    if len(result) != len(arrays[0]):
        raise ValueError(f"UDF returned {len(result)} values for {len(arrays[0])} rows")
    return result


def compute(fn: Callable, arrays: list[pa.Array], params: dict, out_type: pa.DataType, batch: bool,
            on_error: str) -> tuple[pa.Array, list[RowFailure]]:
    """Run the UDF on a batch; on failure isolate the bad rows (`null`) or report the first (`fail`)."""
    try:
        return call(fn, arrays, params, out_type, batch), []
    except Exception as e:
        if len(arrays[0]) > 1 and is_cuda_oom(e):  # too big a batch, not a bad row: halve it
            return halve(fn, arrays, params, out_type, batch, on_error)
        if len(arrays[0]) == 1 and on_error == "fail":
            raise
    values, failures = [], []
    for i in range(len(arrays[0])):
        try:
            values.append(call(fn, [a.slice(i, 1) for a in arrays], params, out_type, batch))
        except Exception as e:
            if on_error == "fail":
                raise RowError(i, e) from e
            failures.append(RowFailure(i, describe(e)))
            values.append(pa.nulls(1, out_type))
    return pa.concat_arrays(values), failures


def describe(e: BaseException) -> str:
    """A row's error as recorded: the exception type and message, less the `row 0: ` a UDF puts in
    front when it is called, as here, on that one row alone (the engine names the row by its key)."""
    return f"{type(e).__name__}: {_ROW_PREFIX.sub('', str(e), count=1)}"


_ROW_PREFIX = re.compile(r"^row 0: ")


class RowError(Exception):
    """A row failed under `on_error: fail`; `offset` is its place in the batch."""

    def __init__(self, offset: int, error: Exception):
        super().__init__(describe(error))
        self.offset, self.error = offset, error


# CUDA out-of-memory retry (a small local addition to `compute`): a GPU UDF given more rows than fit
# is retried on each half of the batch, down to single rows, before the column's policy applies.
def is_cuda_oom(e: Exception) -> bool:
    torch = sys.modules.get("torch")  # only a UDF that imported torch can run out of GPU memory
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return oom is not None and isinstance(e, oom)


def halve(fn: Callable, arrays: list[pa.Array], params: dict, out_type: pa.DataType, batch: bool,
           on_error: str) -> tuple[pa.Array, list[RowFailure]]:
    torch = sys.modules["torch"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # release what the failed call cached before the smaller retries
    n = len(arrays[0])
    values, failures = [], []
    for start, length in ((0, n // 2), (n // 2, n - n // 2)):
        try:
            v, f = compute(fn, [a.slice(start, length) for a in arrays], params, out_type, batch, on_error)
        except RowError as e:  # offsets are relative to the half: make them relative to the batch
            raise RowError(start + e.offset, e.error) from e.error
        except Exception as e:  # a single row failed under `fail`
            raise RowError(start, e) from e
        values.append(v)
        failures += [RowFailure(start + x.offset, x.error) for x in f]
    return pa.concat_arrays(values), failures


def instantiate(node: ColumnNode, model_spec: Any, device: str) -> tuple[Callable, dict[str, str]]:
    """A callable for the UDF, plus field metadata a class UDF wants stored (e.g. the vision grid)."""
    obj = load_udf(node)
    if isinstance(obj, type):
        ctx = UdfContext(node.name, to_pyarrow(node.output), dict(node.params), model_spec, device, node.batch_size,
                         dict(node.tuning))
        inst = obj(ctx)
        meta = dict(inst.field_metadata()) if hasattr(inst, "field_metadata") else {}
        # Params went to the constructor; the call takes arrays only.
        return BoundInstance(inst), meta
    return obj, {}


class BoundInstance:
    def __init__(self, inst):
        self.inst = inst
        self.prefetch = getattr(inst, "prefetch", None)  # the optional hook `compute_chunk` calls
        self.stats = getattr(inst, "stats", None)  # optional, kept in `ColumnRun.udf_stats`

    def __call__(self, *arrays, **_params):
        return self.inst(*arrays)

    def close(self):
        if hasattr(self.inst, "close"):
            self.inst.close()
