"""Training loader: the pinned slice, shuffled per epoch, read zero-copy into tensors.

Each epoch is a deterministic shuffle of the slice's row addresses (seed + epoch), sharded across
data-parallel ranks. Plain fixed-size columns (the cached hiddens) are read straight from the
version's data files into the batch's buffer (`direct_read`); other columns come through the
LanceDB Permutation API. Workers are spawned (lance is not fork-safe) and open their readers
lazily (the Permutation holds Rust async state and must not be pickled open). A batch is one Arrow
RecordBatch of the projected columns only; collate views its buffers as tensors with no per-row
Python objects. Reads stay on the pinned version whatever is committed meanwhile (data files are
immutable; for the Permutation see `pinned_clone`)."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler


def epoch_order(row_addrs: np.ndarray, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This rank's row addresses for `epoch`, shuffled deterministically (same for any worker count)."""
    order = np.random.default_rng([seed, epoch]).permutation(np.asarray(row_addrs, dtype=np.uint64))
    if world > 1:  # equal shards (drop the remainder) so ranks step in lockstep
        n = len(order) // world * world
        order = order[:n][rank::world]
    return order


class SliceDataset(Dataset):
    """Rows of a pinned table version, in a given order, fetched a batch at a time (each batch's
    rows in row-address order).

    Columns whose pages are plain fixed-size rows (the cached hiddens, and at real sequence
    lengths the token struct's children) are read straight from their data files into the batch's
    own buffer (`direct_read`): pinned memory when `pin`, else a reused host buffer. The rest
    come through lancedb's Permutation API.
    """

    def __init__(self, uri: str, version: int, row_addrs: np.ndarray, columns: list[str], *,
                 direct: bool = True, pin: bool = False):
        self.uri, self.version, self.columns = str(uri), int(version), list(columns)
        self.row_addrs = np.asarray(row_addrs, dtype=np.uint64)
        self.direct_enabled, self.pin = direct, pin
        self._perm = None
        self._direct: dict[str, tuple[pa.DataType, list]] | None = None  # column -> (type, leaf readers)
        self.why_not_direct: dict[str, str] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self.row_addrs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_perm"], state["_direct"], state["_pool"] = None, None, None  # reopened in each worker
        return state

    def _open(self) -> None:
        import lance

        from .direct_read import BufferPool, leaves

        self._pool = BufferPool()
        self._direct = {}
        if self.direct_enabled:
            ds = lance.dataset(self.uri, version=self.version)
            frags = set((self.row_addrs >> np.uint64(32)).tolist())  # only the slice's fragments
            # The data files' names (unique per write) identify the version's content too: a table
            # deleted and written again at the same path restarts its version numbers.
            files = tuple(df.path for f in ds.get_fragments() if f.fragment_id in frags for df in f.data_files())
            for col in self.columns:
                typ = ds.schema.field(col).type
                paths = leaves(typ, col)
                readers = [_reader(ds, p, frags, files) for p in paths] if paths else ["a nested struct"]
                bad = [r for r in readers if isinstance(r, str)]
                if bad:
                    self.why_not_direct[col] = bad[0]
                else:
                    self._direct[col] = (typ, readers)
            if self._direct and not self._direct_matches_lance(ds):
                self._direct = {}
        if set(self._direct) != set(self.columns):
            self._open_permutation([c for c in self.columns if c not in self._direct])

    def _direct_matches_lance(self, ds) -> bool:
        """Read a couple of the slice's rows both ways before trusting the direct path."""
        probe = np.sort(self.row_addrs[:2])
        if not len(probe):
            return True
        cols = list(self._direct)
        try:
            want = ds._take_rows(probe.tolist(), columns=cols)
        except Exception as e:  # noqa: BLE001 - a private pylance API: without it, no direct reads
            for c in cols:
                self.why_not_direct[c] = f"could not check against a Lance take ({type(e).__name__}: {e})"
            return False
        got = self._read_direct(probe, cols)
        if all(pa.chunked_array([got.column(c)]).equals(want.column(c)) for c in cols):
            return True
        warnings.warn(f"direct reads of {cols} in {self.uri} differ from Lance's; reading through Lance")
        for c in cols:
            self.why_not_direct[c] = "the direct read differed from Lance's take"
        return False

    def _open_permutation(self, columns: list[str]) -> None:
        import lance
        import lancedb
        from lancedb.permutation import Permutation

        perm = lancedb.connect("memory://").create_table("perm", pa.table({
            "row_id": pa.array(self.row_addrs, pa.uint64()),
            "split_id": pa.array(np.zeros(len(self.row_addrs), np.uint64)),
        }))
        # lancedb's permutation reader reads the version its base table handle loaded when it was
        # opened, and ignores `open_table(version=...)` / `checkout`: opened after a commit, it would
        # read rows that were since deleted, overwritten or recomputed. So read the table itself
        # only when nothing moved past the pinned version while it opened; else a pinned clone.
        if lance.dataset(self.uri).version == self.version:
            base = _open_table(self.uri)
            if lance.dataset(self.uri).version == self.version:
                self._perm = Permutation.from_tables(base, perm, 0).select_columns(columns).with_format("arrow")
                return
        base = _open_table(pinned_clone(self.uri, self.version))
        self._perm = Permutation.from_tables(base, perm, 0).select_columns(columns).with_format("arrow")

    def _buffer(self, nbytes: int) -> np.ndarray:
        if self.pin:  # torch's pinned-memory cache reuses it once the batch's copies to the GPU are done
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        return self._pool.get(nbytes)

    def _read_direct(self, addrs: np.ndarray, columns: list[str]) -> pa.RecordBatch:
        n, out = len(addrs), []
        for col in columns:
            typ, readers = self._direct[col]
            arrays = [r.read_array(addrs, self._buffer(n * r.row_bytes)) for r in readers]
            out.append(pa.StructArray.from_arrays(arrays, fields=list(typ)) if pa.types.is_struct(typ) else arrays[0])
        return pa.RecordBatch.from_arrays(out, names=columns)

    def __getitems__(self, indices: list[int]) -> pa.RecordBatch:
        if self._direct is None:
            self._open()
        idx = np.asarray(indices, dtype=np.int64)
        # The batch comes back in row-address order: the epoch's shuffle decides which rows form
        # each batch and the order of batches; the order inside a batch changes nothing but
        # floating-point summation order. Lance takes 1.6 MB rows 3-5x faster in address order,
        # and putting them back in drawn order (an Arrow take, which gathers fixed-size lists value
        # by value) cost 40 % of the loader's throughput (`vlmspec bench reads`).
        idx = idx[np.argsort(self.row_addrs[idx], kind="stable")]
        direct = [c for c in self.columns if c in self._direct]
        if len(direct) == len(self.columns):
            return self._read_direct(self.row_addrs[idx], direct)
        rest = self._perm.__getitems__(idx.tolist())
        if not direct:
            return rest
        got = self._read_direct(self.row_addrs[idx], direct)
        return pa.RecordBatch.from_arrays(
            [got.column(c) if c in self._direct else rest.column(c) for c in self.columns], names=self.columns)

    def __getitem__(self, index: int) -> pa.RecordBatch:
        return self.__getitems__([int(index)])


_READERS: dict[tuple, Any] = {}  # (uri, version, column, data files) -> reader or reason, per process


def _reader(ds, column: str, frags: set[int], files: tuple[str, ...]):
    """`FixedColumnReader.open`, once per process for a version's data files, column and fragment
    set: a new loader each epoch reuses the page map (and open files) instead of reading every
    file's footer."""
    from .direct_read import FixedColumnReader

    key = (ds.uri, ds.version, column, files)
    if key not in _READERS:
        if len(_READERS) >= 32:
            _READERS.pop(next(iter(_READERS)))
        _READERS[key] = FixedColumnReader.open(ds, column, frags)
    return _READERS[key]


def _open_table(uri: str):
    import lancedb

    path = Path(uri)
    return lancedb.connect(str(path.parent)).open_table(path.name.removesuffix(".lance"))


def pinned_clone(uri: str, version: int) -> str:
    """A shallow clone of `uri` at `version` (metadata only: same data files, fragments and row
    addresses), made once in the table's sidecar and shared by every worker and epoch."""
    import shutil
    import uuid

    import lance

    from ..lance_io import sidecar_dir

    pins = sidecar_dir(uri) / "pins"
    target = pins / f"v{version}.lance"
    if not (target / "_versions").exists():
        pins.mkdir(parents=True, exist_ok=True)
        tmp = pins / f".v{version}-{uuid.uuid4().hex[:8]}.lance"
        lance.dataset(uri).shallow_clone(str(tmp), version)
        try:
            tmp.rename(target)  # atomic: a reader sees no clone or a whole one
        except OSError:  # another worker made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def drop_pins(uri: str) -> None:
    """Remove the pinned clones `pinned_clone` made (metadata only; the data files are the table's).
    `apply` calls it when training ends, under the table lock, so no loader is reading them."""
    import shutil

    from ..lance_io import sidecar_dir

    shutil.rmtree(sidecar_dir(uri) / "pins", ignore_errors=True)


def _view(arr: pa.Array, dtype: np.dtype) -> np.ndarray:
    if arr.null_count:
        raise ValueError("a cached column holds nulls in the training slice; run `vlmspec apply` to fill it")
    return arr.to_numpy(zero_copy_only=True).astype(dtype, copy=False)


@dataclass
class CachedBatch:
    vision_hiddens: torch.Tensor  # [B, tokens, hidden] fp16
    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, -100 where no loss
    step: Any = None  # cached.StepInputs: checked rows, positions, label slots (when the collate knows the model)

    def map(self, fn) -> "CachedBatch":
        """The same batch with `fn` applied to every tensor."""
        return CachedBatch(*(fn(t) for t in (self.vision_hiddens, self.input_ids, self.attention_mask, self.labels)),
                           step=None if self.step is None else self.step.map(fn))

    def to(self, device: Any, non_blocking: bool = True) -> "CachedBatch":
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "CachedBatch":  # DataLoader(pin_memory=True) calls this
        return self.map(lambda t: t.pin_memory())

    @staticmethod
    def cat(parts: list["CachedBatch"]) -> "CachedBatch":
        """Micro-batches as one batch of all their rows, in order (on whichever device they are)."""
        if len(parts) == 1:
            return parts[0]
        cols = [torch.cat([getattr(p, f) for p in parts]) for f in
                ("vision_hiddens", "input_ids", "attention_mask", "labels")]
        steps = [p.step for p in parts]
        if any(s is None for s in steps):
            return CachedBatch(*cols)
        from ..vlm.cached import StepInputs

        return CachedBatch(*cols, step=StepInputs.cat(steps))


class CachedCollate:
    """RecordBatch of (hiddens, tokens struct) -> CachedBatch; picklable for spawned workers.

    Given the image pad id and the merged-token grid, it also checks each row and precomputes the
    step's M-RoPE positions and label slots (`cached.step_inputs`) here, in the loader's workers,
    so the training step itself never waits on the host.
    """

    def __init__(self, hiddens: str, tokens: str, image_tokens: int, image_token_id: int | None = None,
                 llm_grid: tuple[int, int] | None = None, label_slots: int = 8):
        self.hiddens, self.tokens, self.image_tokens = hiddens, tokens, image_tokens
        self.image_token_id, self.llm_grid, self.label_slots = image_token_id, llm_grid, label_slots

    def __call__(self, rb: pa.RecordBatch) -> CachedBatch:
        n = rb.num_rows
        h = rb.column(self.hiddens)
        flat = _view(h.values, np.float16)
        tok = rb.column(self.tokens)

        def field(name: str, dtype) -> torch.Tensor:
            values = tok.field(name).values if isinstance(tok, pa.StructArray) else pa.StructArray.field(tok, name).values
            return torch.from_numpy(_view(values, dtype).reshape(n, -1)).long()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Arrow buffers are read-only; we never write to them
            hidden = torch.from_numpy(flat.reshape(n, self.image_tokens, -1))
        batch = CachedBatch(hidden, field("input_ids", np.int32), field("attention_mask", np.int8),
                            field("labels", np.int32))
        if self.image_token_id is not None and self.llm_grid is not None:
            from ..vlm.cached import step_inputs

            batch.step = step_inputs(batch.input_ids, batch.attention_mask, batch.labels, self.image_token_id,
                                     self.image_tokens, self.llm_grid, self.label_slots)
        return batch


class PrefetchLoader:
    """Batches of `dataset` in order, fetched ahead by `threads` in-process threads.

    Lance and lancedb read and decode in Rust with the GIL released, so threads overlap takes as
    well as processes do, without spawned workers' cost: each 13 MB batch of hiddens copied into
    shared memory and out again (`vlmspec bench reads` measures both). Same batches, same order as
    a DataLoader over the same batch list.
    """

    def __init__(self, dataset: SliceDataset, batches: list[list[int]], collate, threads: int, pin: bool):
        self.dataset, self.batch_sampler, self.collate_fn = dataset, list(batches), collate
        self.threads, self.pin_memory = max(1, int(threads)), pin

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _load(self, idx: list[int]) -> CachedBatch:
        batch = self.collate_fn(self.dataset.__getitems__(idx))
        return batch.pin_memory() if self.pin_memory else batch

    def __iter__(self) -> Iterator[CachedBatch]:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        if self.dataset._direct is None:
            self.dataset._open()  # once, before threads share it
        todo = iter(self.batch_sampler)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="vlmspec-loader") as pool:
            ahead = deque(pool.submit(self._load, idx) for idx in itertools.islice(todo, 2 * self.threads))
            try:
                while ahead:
                    batch = ahead.popleft().result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        ahead.append(pool.submit(self._load, nxt))
                    yield batch
            finally:
                for f in ahead:
                    f.cancel()


def make_loader(uri: str, version: int, row_addrs: np.ndarray, *, hiddens: str, tokens: str, image_tokens: int,
                batch_size: int, seed: int, epoch: int, num_workers: int = 0, rank: int = 0, world: int = 1,
                drop_last: bool = True, image_token_id: int | None = None,
                llm_grid: tuple[int, int] | None = None, label_slots: int = 8,
                threads: int = 1, direct: bool = True) -> DataLoader | PrefetchLoader:
    """One epoch of the slice (projected columns only): a DataLoader with `num_workers` spawned
    processes, or, with none, batches fetched ahead by `threads` in-process threads. `direct=False`
    reads every column through the Permutation API (the benchmark's comparison)."""
    cuda = torch.cuda.is_available()
    # In-process reads land directly in pinned memory; spawned workers' batches are copied into
    # shared memory anyway, so they read into plain buffers and the DataLoader pins afterwards.
    ds = SliceDataset(uri, version, epoch_order(row_addrs, seed, epoch, rank, world), [hiddens, tokens],
                      direct=direct, pin=cuda and not num_workers)
    sampler = BatchSampler(SequentialSampler(range(len(ds))), batch_size, drop_last=drop_last)
    collate = CachedCollate(hiddens, tokens, image_tokens, image_token_id, llm_grid, label_slots)
    if not num_workers and threads > 1:
        return PrefetchLoader(ds, list(sampler), collate, threads, cuda)
    kw: dict[str, Any] = {}
    if num_workers:
        kw = dict(num_workers=num_workers, multiprocessing_context="spawn", prefetch_factor=4,
                  persistent_workers=False)
    # With a batch sampler, torch hands each index list to __getitems__ in one call (one Lance take).
    return DataLoader(ds, batch_sampler=sampler, collate_fn=collate, pin_memory=cuda, **kw)


def iterate_epochs(make, start_epoch: int = 0, skip_batches: int = 0) -> Iterator[tuple[int, int, CachedBatch]]:
    """(epoch, batch index, batch) forever; `skip_batches` resumes mid-epoch without reading them."""
    epoch = start_epoch
    while True:
        loader = make(epoch)
        for i, batch in enumerate(_skip(loader, skip_batches)):
            yield epoch, i + skip_batches, batch
        skip_batches = 0
        epoch += 1


def _skip(loader: DataLoader, n: int):
    if n <= 0:
        yield from loader
        return
    # Skip at the sampler level: a resumed run must not fetch the batches it already trained on.
    kept = list(loader.batch_sampler)[n:]
    if isinstance(loader, PrefetchLoader):
        yield from PrefetchLoader(loader.dataset, kept, loader.collate_fn, loader.threads, loader.pin_memory)
        return
    sub = DataLoader(loader.dataset, batch_sampler=kept, collate_fn=loader.collate_fn,
                     pin_memory=loader.pin_memory, num_workers=loader.num_workers,
                     multiprocessing_context=loader.multiprocessing_context if loader.num_workers else None)
    yield from sub
