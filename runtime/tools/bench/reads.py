"""`vlmspec bench reads`: Lance vs Parquet on the reference pipeline's access patterns, our training
loader, and the physical limit (plain sequential file reads of the same bytes).

One synthetic table (written once, in this run) holds what the seed pipeline reads:
`image` (random bytes of JPEG size; read cost does not depend on the content), `question`,
`answer`, `h` (cached vision hiddens, fixed_size_list<float16, tokens*hidden>) and `sft` (the
pre-tokenized struct of 512 int32 ids, int8 mask, int32 labels). It is written as Lance (defaults)
and as Parquet the way a user would: `pq.write_table` defaults (one row group per file at this
size) and `row_group_size=64`.

Patterns (rows/s, each over `repeats` runs; page cache warm, as on a training box after the first
epoch): raw image+question+answer sequential and shuffled; hiddens sequential and shuffled;
our loader (`runtime.loader.make_loader`: hiddens + tokens, collated to tensors; fixed-size columns
read straight from the data files, anything else through the Permutation API) with 0 and N workers
and N prefetch threads, and once with every column through the Permutation API; and the plain
read of the Lance data files (16 MiB `read()` calls), turned
into rows/s of the loader's bytes (hiddens + tokens per row). Shuffled = a fresh random order
each run, taken `batch` rows at a time. A slow pattern (Parquet shuffled) runs at most
`time_cap` seconds per run and is scaled from the batches it finished.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from .common import Results, load

SEQ_TOKENS = 512


def _schema(tokens: int, hidden: int) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.int64()), pa.field("image", pa.large_binary()), pa.field("question", pa.string()),
        pa.field("answer", pa.string()), pa.field("h", pa.list_(pa.float16(), tokens * hidden)),
        pa.field("sft", pa.struct([("input_ids", pa.list_(pa.int32(), SEQ_TOKENS)),
                                   ("attention_mask", pa.list_(pa.int8(), SEQ_TOKENS)),
                                   ("labels", pa.list_(pa.int32(), SEQ_TOKENS))])),
    ])


def _batches(rows: int, tokens: int, hidden: int, image_bytes: int, seed: int = 0, step: int = 32):
    rng = np.random.default_rng(seed)
    schema = _schema(tokens, hidden)
    sft_t = schema.field("sft").type
    for s in range(0, rows, step):
        n = min(step, rows - s)
        h = rng.standard_normal(n * tokens * hidden, dtype=np.float32).astype(np.float16)
        ids = rng.integers(0, 150000, n * SEQ_TOKENS, dtype=np.int32)
        # labels on ~3 % of the tokens, about an answer's share of a 512-token row
        labels = np.where(rng.random(n * SEQ_TOKENS) < 0.03, ids, -100).astype(np.int32)
        sft = pa.StructArray.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(ids), SEQ_TOKENS),
             pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * SEQ_TOKENS, np.int8)), SEQ_TOKENS),
             pa.FixedSizeListArray.from_arrays(pa.array(labels), SEQ_TOKENS)], fields=list(sft_t))
        yield pa.record_batch([
            pa.array(np.arange(s, s + n, dtype=np.int64)),
            # random bytes, not images: nothing here decodes, and random bytes do not compress
            pa.array([rng.bytes(image_bytes) for _ in range(n)], pa.large_binary()),
            pa.array([f"what is written on the sign number {i}?" for i in range(s, s + n)]),
            pa.array([f"answer {i}" for i in range(s, s + n)]),
            pa.FixedSizeListArray.from_arrays(pa.array(h), tokens * hidden),
            sft,
        ], schema=schema)


def plain_read_bps(files: list[str], chunk: int = 1 << 24) -> float:
    """Bytes/s of reading `files` front to back with plain `read()` calls."""
    total, t = 0, time.perf_counter()
    for f in files:
        # unbuffered 16 MB reads: the ceiling any reader of these files can reach
        with open(f, "rb", buffering=0) as fh:
            while True:
                b = fh.read(chunk)
                if not b:
                    break
                total += len(b)
    return total / (time.perf_counter() - t)


def _timed_rows(fn: Callable[[float], int], cap: float) -> tuple[float, int]:
    """(rows/s, rows) of `fn(cap)`, which returns how many rows it read within about `cap` s."""
    t = time.perf_counter()
    n = fn(cap)
    return n / (time.perf_counter() - t), n


def run(rows: int, tokens: int, hidden: int, image_kb: int, repeats: int, out: Path, *, batch: int = 8,
        workers: list[int] | None = None, time_cap: float = 4.0, workdir: Path | None = None,
        loader: bool = True, name: str = "reads", threads: list[int] | None = None) -> Results:
    os.environ.setdefault("LANCE_LOG", "error")
    import lance
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    workers = sorted(set(workers if workers is not None else [0, 2]))
    threads = sorted(set(threads if threads is not None else [2, 4]))
    res = Results(name, "Reads: Lance vs Parquet, our training loader, and plain file reads of the same bytes",
                  {"rows": rows, "tokens": tokens, "hidden": hidden, "image_kb": image_kb, "repeats": repeats,
                   "batch": batch, "workers": workers, "threads": threads, "time_cap_s": time_cap, "loader": loader})
    tmp = Path(tempfile.mkdtemp(prefix="vlmspec-bench-reads-", dir=workdir))
    try:
        uri = str(tmp / "t.lance")
        schema = _schema(tokens, hidden)
        t0 = time.perf_counter()
        lance.write_dataset(pa.RecordBatchReader.from_batches(
            schema, _batches(rows, tokens, hidden, image_kb * 1000)), uri)
        write_lance = time.perf_counter() - t0
        ds = lance.dataset(uri)
        tbl = ds.to_table()
        t0 = time.perf_counter()
        pq.write_table(tbl, tmp / "default.parquet")
        write_pq = time.perf_counter() - t0
        pq.write_table(tbl, tmp / "rg64.parquet", row_group_size=64)
        del tbl
        h_bytes = tokens * hidden * 2
        tok_bytes = SEQ_TOKENS * (4 + 1 + 4)
        files = sorted(glob.glob(f"{uri}/data/*"))
        res.details.update(
            lance_bytes=sum(os.path.getsize(f) for f in files), lance_fragments=len(ds.get_fragments()),
            parquet_default_row_groups=pq.ParquetFile(tmp / "default.parquet").num_row_groups,
            parquet_rg64_row_groups=pq.ParquetFile(tmp / "rg64.parquet").num_row_groups,
            parquet_default_bytes=os.path.getsize(tmp / "default.parquet"),
            parquet_rg64_bytes=os.path.getsize(tmp / "rg64.parquet"),
            write_lance_s=round(write_lance, 2), write_parquet_default_s=round(write_pq, 2),
            hidden_bytes_per_row=h_bytes, token_bytes_per_row=tok_bytes)
        rng = np.random.default_rng(1)

        def fig(key: str, label: str, unit: str = "rows/s"):
            return res.figure(key, label, unit, higher_is_better=True)

        def add(f, fn: Callable[[], float]) -> None:
            lb = load()
            v = fn()
            f.add(v, lb, load())

        # -- physical limit ------------------------------------------------------------------
        plain_read_bps(files)  # warm the page cache
        f_bw = fig("plain_read", "plain sequential read() of the Lance data files", "GB/s")
        for _ in range(repeats):
            add(f_bw, lambda: plain_read_bps(files) / 1e9)
        res.notes.append("Page cache warm for every figure (each file is read once untimed first).")

        # -- Lance ---------------------------------------------------------------------------
        def lance_seq(cols):
            def go(cap):
                return sum(b.num_rows for b in lance.dataset(uri).to_batches(columns=cols, batch_size=batch))
            return go

        def lance_shuf(cols):
            def go(cap):
                d = lance.dataset(uri)
                order = rng.permutation(rows)
                n, t = 0, time.perf_counter()
                for s in range(0, rows, batch):
                    n += d.take(np.sort(order[s:s + batch]), columns=cols).num_rows
                    if time.perf_counter() - t > cap:
                        break
                return n
            return go

        def pq_seq(path, cols):
            def go(cap):
                n, t = 0, time.perf_counter()
                for b in pq.ParquetFile(path).iter_batches(batch_size=batch, columns=cols):
                    n += b.num_rows
                    if time.perf_counter() - t > cap:
                        break
                return n
            return go

        def pq_shuf(path, cols):
            def go(cap):
                d = pds.dataset(path)
                order = rng.permutation(rows)
                n, t = 0, time.perf_counter()
                for s in range(0, rows, batch):
                    # Parquet's shuffled reads can take seconds a batch: stop at `cap` and report the rate so far
                    n += d.take(pa.array(np.sort(order[s:s + batch])), columns=cols).num_rows
                    if time.perf_counter() - t > cap:
                        break
                return n
            return go

        raw_cols, h_cols = ["image", "question", "answer"], ["h"]
        patterns: list[tuple[str, str, Callable]] = [
            ("lance_raw_seq", "Lance raw image+question+answer, sequential", lance_seq(raw_cols)),
            ("lance_raw_shuf", "Lance raw image+question+answer, shuffled (take)", lance_shuf(raw_cols)),
            ("lance_h_seq", "Lance cached fp16 hiddens, sequential", lance_seq(h_cols)),
            ("lance_h_shuf", "Lance cached fp16 hiddens, shuffled (take)", lance_shuf(h_cols)),
        ]
        for pname, label in (("default", "Parquet (default row groups)"), ("rg64", "Parquet (row_group_size 64)")):
            path = str(tmp / f"{pname}.parquet")
            patterns += [
                (f"pq_{pname}_raw_seq", f"{label} raw, sequential", pq_seq(path, raw_cols)),
                (f"pq_{pname}_raw_shuf", f"{label} raw, shuffled (take)", pq_shuf(path, raw_cols)),
                (f"pq_{pname}_h_seq", f"{label} hiddens, sequential", pq_seq(path, h_cols)),
                (f"pq_{pname}_h_shuf", f"{label} hiddens, shuffled (take)", pq_shuf(path, h_cols)),
            ]
        for key, label, go in patterns:
            f = fig(key, label)
            f.extra["rows_read"] = []
            go(min(time_cap, 1.0))  # warm (also the page cache of Parquet files)
            for _ in range(repeats):
                lb = load()
                rate, n = _timed_rows(go, time_cap)
                f.add(rate, lb, load())
                f.extra["rows_read"].append(n)

        # -- our loader ------------------------------------------------------------------------
        if loader:
            from vlmspec.runtime.train.loader import make_loader

            version = ds.version
            addrs = ds.to_table(columns=[], with_row_address=True).column("_rowaddr").to_numpy()
            # (workers, threads, direct reads); the last is the loader before direct reads, for comparison
            configs = [(w, 1, True) for w in workers] + [(0, t, True) for t in threads if t > 1]
            if importlib.util.find_spec("lancedb") is not None:
                configs.append((0, max(threads), False))
            else:
                res.notes.append("lancedb is not installed here, so the loader ran on direct reads alone (its "
                                 "Permutation-only comparison was not run).")
            loader_how: dict[str, str] = {}  # figure key -> "N workers" / "0 workers, N prefetch threads"
            for w, th, direct in configs:
                tag = f"loader_w{w}" + (f"_t{th}" if th > 1 else "") + ("" if direct else "_perm")
                how = f"{w} workers" if w or th == 1 else f"0 workers, {th} prefetch threads"
                if direct:
                    loader_how[tag] = how
                    what = "direct reads of fixed-size columns"
                else:
                    how += ", Permutation only"
                    what = "every column through the Permutation API"
                f = fig(tag, f"our loader ({what}, shuffled hiddens + tokens), {how}, whole epoch incl. worker start")
                fs = fig(f"{tag}_steady", f"our loader, {how}, after the first batch (steady state)")
                for rep in range(repeats + 1):
                    # a new epoch each repeat: a fresh shuffle, never the previous order again
                    dl = make_loader(uri, version, addrs, hiddens="h", tokens="sft", image_tokens=tokens,
                                     batch_size=batch, seed=0, epoch=rep, num_workers=w, threads=th,
                                     direct=direct)
                    lb = load()
                    t = time.perf_counter()
                    n, t_first = 0, None
                    for b in dl:
                        n += b.vision_hiddens.shape[0]
                        if t_first is None:
                            t_first, n_first = time.perf_counter(), n
                            if direct and not w and "loader_batch_pinned" not in res.details:
                                # on CUDA, in-process batches are read straight into pinned memory
                                import torch

                                res.details["loader_batch_pinned"] = bool(
                                    torch.cuda.is_available() and b.pin_memory().vision_hiddens.data_ptr()
                                    == b.vision_hiddens.data_ptr() and b.vision_hiddens.is_pinned())
                    end = time.perf_counter()
                    if rep == 0:
                        continue  # warm-up epoch (page cache, imports)
                    f.add(n / (end - t), lb, load())
                    fs.add((n - n_first) / max(end - t_first, 1e-9), lb, load())
        else:
            res.notes.append("Our loader was not run (lancedb, which the Permutation API needs, is not installed "
                             "here): Lance figures are pylance's `to_batches` / `take`.")

        # -- derived ---------------------------------------------------------------------------
        med = {k: f.median for k, f in res.figures.items()}
        # the plain-read ceiling in rows/s: its bytes/s over the bytes one training row needs
        plain_rows = med["plain_read"] * 1e9 / (h_bytes + tok_bytes)
        plain_h_rows = med["plain_read"] * 1e9 / h_bytes
        res.details["plain_read_rows_per_s_loader_bytes"] = plain_rows
        res.details["plain_read_rows_per_s_hidden_bytes"] = plain_h_rows
        pq_h_shuf = max(med["pq_default_h_shuf"], med["pq_rg64_h_shuf"])
        pq_h_seq = max(med["pq_default_h_seq"], med["pq_rg64_h_seq"])
        if loader:
            # the headline takes the best configuration: a user picks the worker count
            best = max(loader_how, key=lambda k: med[f"{k}_steady"])
            how = loader_how[best]
            lo = med[f"{best}_steady"]
            res.derive("loader_vs_plain", f"our loader shuffled (steady, {how}) / plain read of the same "
                       "bytes", round(lo / plain_rows, 3), target=">= 0.8", met=lo / plain_rows >= 0.8,
                       how=f"plain read = {plain_rows:,.0f} rows/s of hiddens+tokens bytes")
            res.derive("loader_epoch_vs_plain", f"our loader shuffled (whole epoch, {how}) / plain read",
                       round(med[best] / plain_rows, 3))
            perm = [k for k in med if k.endswith("_perm_steady")]
            if perm:
                res.derive("loader_perm_vs_plain", "the same loader, Permutation only (no direct reads) / plain read",
                           round(max(med[k] for k in perm) / plain_rows, 3))
            res.derive("loader_vs_parquet", "our loader shuffled / best Parquet shuffled hiddens",
                       round(lo / pq_h_shuf, 1) if pq_h_shuf else None, unit="x", target=">= 10",
                       met=(lo / pq_h_shuf >= 10) if pq_h_shuf else None)
        take = med["lance_h_shuf"]
        res.derive("lance_take_vs_plain", "Lance take, shuffled hiddens / plain read of the hidden bytes",
                   # the take target stands in for the loader's only where the loader could not run
                   round(take / plain_h_rows, 3), target=">= 0.8" if not loader else None,
                   met=(take / plain_h_rows >= 0.8) if not loader else None)
        res.derive("lance_vs_parquet_h_shuf", "Lance shuffled hiddens / best Parquet shuffled hiddens",
                   round(take / pq_h_shuf, 1) if pq_h_shuf else None, unit="x", target=">= 10",
                   met=(take / pq_h_shuf >= 10) if pq_h_shuf else None)
        res.derive("lance_vs_parquet_h_seq", "Lance sequential hiddens / best Parquet sequential hiddens",
                   round(med["lance_h_seq"] / pq_h_seq, 1) if pq_h_seq else None, unit="x")
        res.derive("lance_vs_parquet_raw_shuf", "Lance shuffled raw / best Parquet shuffled raw",
                   round(med["lance_raw_shuf"] / max(med["pq_default_raw_shuf"], med["pq_rg64_raw_shuf"]), 1),
                   unit="x")
        res.write(out)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
