"""Fixed-size columns read straight from Lance data files into memory the caller owns.

A cached hidden-state row is one 1.6 MB `fixed_size_list<float16>` value, and Lance 2.1+ stores
such values "full-zip": with no nulls and no compression, a page is one buffer holding the rows
back to back, so row `i` of the page is `row_bytes` at `position + i * row_bytes`. A Lance take
reads that buffer into memory of its own (fresh pages, each faulted in) and the loader then
copies it again into pinned memory; here each row is one `pread` into the batch's final buffer,
which is the plain sequential read's cost (`vlmspec bench reads`).

Only pages whose encoding is exactly that layout are read this way: the page encoding Lance
records in the file is matched in full, the buffer size checked against rows x row width, and
`SliceDataset` compares its first batch with a Lance take before trusting it. Anything else (a
nullable page, compression, a remote store, a file from another base path) makes `open` return
None with the reason, and the caller reads through Lance.
"""

from __future__ import annotations

import bisect
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

# A page of non-null, uncompressed fixed-size lists of a fixed-width type, as `LancePageMetadata.
# encoding` prints it (whitespace collapsed). `layers` has one all-valid item per nesting level
# (the list, and a struct parent if any); bits_rep/bits_def 0 means no repetition or null levels.
_FULL_ZIP_PLAIN = re.compile(
    r"PageLayout \{ layout: Some\( FullZipLayout\( FullZipLayout \{ bits_rep: 0, bits_def: 0, "
    r"num_items: (?P<items>\d+), num_visible_items: (?P<visible>\d+), value_compression: Some\( "
    r"CompressiveEncoding \{ compression: Some\( FixedSizeList\( FixedSizeList \{ "
    r"items_per_value: (?P<per_value>\d+), has_validity: false, values: Some\( CompressiveEncoding \{ "
    r"compression: Some\( Flat\( Flat \{ bits_per_value: (?P<bits>\d+), data: None, \}, \), \), \}, \), "
    r"\}, \), \), \}, \), layers: \[ (?:RepdefAllValidItem, )+\], "
    r"details: Some\( BitsPerValue\( (?P<row_bits>\d+), \), \), \}, \), \), \}")


def page_extent(encoding: str, buffers: list[tuple[int, int]], list_size: int, value_bits: int) -> tuple[int, int]:
    """(rows, byte position) of a page that holds plain fixed-size rows of this shape; ValueError else."""
    m = _FULL_ZIP_PLAIN.fullmatch(" ".join(encoding.split()))
    if m is None:
        raise ValueError("page is not an uncompressed, non-null full-zip page")
    items, per_value, bits = int(m["items"]), int(m["per_value"]), int(m["bits"])
    if int(m["visible"]) != items or per_value != list_size or bits != value_bits or \
            int(m["row_bits"]) != list_size * value_bits:
        raise ValueError(f"page shape {per_value} x {bits} bits does not match the column's {list_size} x {value_bits}")
    if len(buffers) != 1 or buffers[0][1] != items * list_size * value_bits // 8:
        raise ValueError("page buffer size does not match its row count")
    return items, buffers[0][0]


@dataclass(frozen=True)
class _Page:
    first: int  # first physical row of the fragment in this page
    rows: int
    file: int  # index into FixedColumnReader.paths
    position: int  # byte offset of the page's first row in that file


class FixedColumnReader:
    """Row addresses -> bytes of one `fixed_size_list<fixed-width>` leaf column at a pinned version.

    Safe to share between threads (positional reads on shared descriptors) and to pickle into
    spawned workers (descriptors are reopened there).
    """

    def __init__(self, column: str, type: pa.FixedSizeListType, paths: list[str], pages: dict[int, list[_Page]]):
        self.column, self.type = column, type
        self.dtype = np.dtype(type.value_type.to_pandas_dtype())
        self.row_bytes = type.list_size * self.dtype.itemsize
        self.paths, self.pages = paths, pages
        self._starts = {f: [p.first for p in ps] for f, ps in pages.items()}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, ds, column: str, fragments: set[int] | None = None) -> "FixedColumnReader | str":
        """A reader for `column` ("name" or "struct.child") of `ds` (a pinned `lance.LanceDataset`)
        over `fragments` (default all), or the reason it cannot be read directly."""
        from lance.file import LanceFileReader

        uri = ds.uri
        if "://" in uri and not uri.startswith("file://"):
            return "the table is not on a local file system"
        root = Path(uri.removeprefix("file://"))
        field = _leaf(ds.lance_schema.fields(), column.split("."))
        typ = _arrow_type(ds.schema, column.split("."))
        if field is None or typ is None:
            return f"no column {column!r}"
        if not pa.types.is_fixed_size_list(typ) or not pa.types.is_primitive(typ.value_type) or \
                pa.types.is_boolean(typ.value_type):
            return f"{column} is {typ}, not a fixed-size list of a fixed-width type"
        list_size, bits = typ.list_size, typ.value_type.bit_width
        paths: list[str] = []
        pages: dict[int, list[_Page]] = {}
        for frag in ds.get_fragments():
            if fragments is not None and frag.fragment_id not in fragments:
                continue
            files = [df for df in frag.data_files() if field.id() in df.fields]
            if not files:
                return f"fragment {frag.fragment_id} has no data file for {column} (reads as null)"
            df = files[-1]
            if df.base_id is not None:
                return f"fragment {frag.fragment_id}'s file for {column} lives under another base path"
            col = df.column_indices[df.fields.index(field.id())]
            path = str(root / "data" / df.path)
            meta = LanceFileReader(path).metadata()
            first, out = 0, []
            for page in meta.columns[col].pages:
                try:
                    rows, pos = page_extent(page.encoding, [(b.position, b.size) for b in page.buffers],
                                            list_size, bits)
                except ValueError as e:
                    return f"{path}: {e}"
                out.append(_Page(first, rows, len(paths), pos))
                first += rows
            if first != frag.physical_rows:
                return f"{path}: pages hold {first} rows, the fragment {frag.physical_rows}"
            paths.append(path)
            pages[frag.fragment_id] = out
        return cls(column, typ, paths, pages)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _fd(self, file: int) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(self.paths[file], os.O_RDONLY)
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def read_into(self, addrs: np.ndarray, out: np.ndarray) -> None:
        """Rows at `addrs` (row addresses) into `out` (C-contiguous, `len(addrs) * row_bytes` bytes),
        row k at `out`'s k-th row slot. Consecutive rows of one page are read with one call."""
        mv = memoryview(out.reshape(-1).view(np.uint8))
        if len(mv) != len(addrs) * self.row_bytes:
            raise ValueError(f"buffer holds {len(mv)} bytes, {len(addrs)} rows need {len(addrs) * self.row_bytes}")
        addrs = np.asarray(addrs, dtype=np.uint64)
        frags, offs = (addrs >> np.uint64(32)).tolist(), (addrs & np.uint64(0xFFFFFFFF)).tolist()
        k, n, rb = 0, len(frags), self.row_bytes
        while k < n:
            frag, off = frags[k], offs[k]
            pages = self.pages.get(frag)
            if pages is None:
                raise KeyError(f"row address {int(addrs[k])}: fragment {frag} is not in the pinned version")
            page = pages[bisect.bisect_right(self._starts[frag], off) - 1]
            if not page.first <= off < page.first + page.rows:
                raise KeyError(f"row address {int(addrs[k])} is past fragment {frag}'s rows")
            run = 1  # extend over the following rows that sit right after this one in the same page
            while k + run < n and frags[k + run] == frag and offs[k + run] == off + run and \
                    off + run < page.first + page.rows:
                run += 1
            _pread_exact(self._fd(page.file), mv[k * rb:(k + run) * rb], page.position + (off - page.first) * rb)
            k += run

    def read_array(self, addrs: np.ndarray, out: np.ndarray) -> pa.FixedSizeListArray:
        """`read_into(addrs, out)`, then `out` as this column's Arrow array (no copy: the array
        holds `out`)."""
        self.read_into(addrs, out)
        n = len(addrs) * self.type.list_size
        return pa.FixedSizeListArray.from_arrays(
            pa.Array.from_buffers(self.type.value_type, n, [None, pa.py_buffer(out)]), type=self.type)


def _pread_exact(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise OSError(f"short read at byte {offset}: the data file ended early")
        buf, offset = buf[got:], offset + got


def _leaf(fields, parts: list[str]):
    for f in fields:
        if f.name() == parts[0]:
            return f if len(parts) == 1 else _leaf(f.children(), parts[1:])
    return None


def _arrow_type(schema: pa.Schema, parts: list[str]):
    idx = schema.get_field_index(parts[0])
    if idx < 0:
        return None
    typ = schema.field(idx).type
    for p in parts[1:]:
        if not pa.types.is_struct(typ) or typ.get_field_index(p) < 0:
            return None
        typ = typ.field(p).type
    return typ


def leaves(typ: pa.DataType, name: str) -> list[str] | None:
    """The leaf column paths a direct read of `name` (of type `typ`) takes: itself, or a struct's
    children; None when a child is a nested struct (not handled)."""
    if not pa.types.is_struct(typ):
        return [name]
    out = []
    for f in typ:
        if pa.types.is_struct(f.type):
            return None
        out.append(f"{name}.{f.name}")
    return out


class BufferPool:
    """Reusable host buffers for batches, so each read lands in memory that is already faulted in.

    A buffer is handed out again only when nothing else refers to it: every numpy view, Arrow
    buffer and tensor made from it holds a reference, so its reference count is exact.
    """

    def __init__(self):
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            bufs = self._free.setdefault(nbytes, [])
            for i in range(len(bufs)):
                # 2 = the list's reference + getrefcount's argument: no view of it is alive
                if sys.getrefcount(bufs[i]) == 2:
                    return bufs[i]
            buf = np.empty(nbytes, np.uint8)
            bufs.append(buf)
            return buf
