"""Curate the training slice and the held-out split of one pinned table version.

Owns quantile resolution of the curation predicate, the group-hash split, near-duplicate removal,
the train/eval leakage report and the `slice-*.lance` table of row addresses they produce.
Never writes to the source table and never prints: progress goes through the `progress` callback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from vlmspec.compiler.errors import ApplyError, Problem, did_you_mean
from vlmspec.compiler.model import CurationSpec, SplitSpec
from vlmspec.compiler.where import LanceSQL, WhereError, is_quantile, parse_where

__all__ = ["SliceResult", "build_slice", "dedup_keep", "near_pairs", "read_slice", "resolve_where"]

SLICE_FORMAT = 1
"""Part of every slice's name: bump it when the rules below change, so old slices are not reused."""
HASH_COLUMN = "dhash"
DEFAULT_DISTANCE = 4
SPLITS = ("train", "eval")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SliceResult:
    """What `build_slice` computed, on which table version, and where it stored the rows."""

    table_version: int
    train_rows: int
    eval_rows: int
    where: str | None
    quantiles: dict[str, float]
    dedup_removed: int
    leakage: dict
    path: str
    eval_uri: str | None = None
    """With `split.table`: the eval table; eval row addresses refer to it (else to the source)."""
    eval_version: int | None = None
    left_out: int = 0
    """Rows the predicate kept but that were left out: a UDF failed on them under `on_error: null`
    (their cached values are null), as recorded in `vlmspec errors`."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the predicate ------------------------------------------------------------------------


def _number_text(v: float) -> str:
    return str(int(v)) if math.isfinite(v) and float(v).is_integer() and abs(v) < 2**53 else repr(float(v))


def _number(v: float) -> exp.Expression:
    # Lance refuses to compare an integer column with a float literal (`n >= 15.5`) but accepts
    # an explicit DOUBLE, so only integral values are written bare.
    text = _number_text(v)
    lit = exp.Literal.number(text)
    return lit if text.lstrip("-").isdigit() else exp.cast(lit, "DOUBLE")


def _where_problem(what: str, fix: str = "") -> ApplyError:
    return ApplyError(Problem(what, "curation.where", fix=fix))


def _quantile_call(node: exp.Expression) -> tuple[str, float]:
    args = list(node.expressions) if isinstance(node, exp.Anonymous) else [node.this, node.args.get("quantile")]
    ok = len(args) == 2 and isinstance(args[0], exp.Column) and isinstance(args[1], exp.Literal) \
        and not args[1].is_string
    q = float(args[1].this) if ok else -1.0
    if not 0.0 <= q <= 1.0:
        raise _where_problem(f"`{node.sql()}` is not `quantile(column, q)` with 0 <= q <= 1",
                             "Write e.g. `quantile(ocr_token_count, 0.75)`")
    return args[0].name, q


def resolve_where(ds: lance.LanceDataset, where: str) -> tuple[str, dict[str, float]]:
    """Replace each `quantile(col, q)` by the q-quantile of `col` over the WHOLE table.

    Quantiles are linear-interpolated with nulls excluded, and computed over every row of `ds`
    (both sides of the split), so train and eval are cut at the same threshold. Returns the SQL
    Lance's `filter=` accepts and `{"quantile(col, q)": value}`.
    """
    try:
        tree = parse_where(where)  # the parse `plan` checked: one expression, never a `;` and more
    except WhereError as e:
        raise _where_problem(e.what, e.fix) from None
    calls = {id(n): _quantile_call(n) for n in tree.find_all(exp.Anonymous, exp.Quantile) if is_quantile(n)}
    values: dict[tuple[str, float], float] = {}
    for col in sorted({c for c, _ in calls.values()}):
        if col not in ds.schema.names:
            raise _where_problem(f"unknown column `{col}` in `quantile({col}, ...)`",
                                 did_you_mean(col, ds.schema.names))
        data = ds.to_table(columns=[col]).column(col)
        for c, q in sorted({k for k in calls.values() if k[0] == col}):
            try:
                v = pc.quantile(data, q=q, interpolation="linear")[0].as_py()
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                raise _where_problem(f"`quantile({col}, ...)` needs a numeric column, `{col}` is `{data.type}`") from None
            if v is None:
                raise _where_problem(f"`quantile({col}, {_number_text(q)})` is undefined: `{col}` has no non-null value",
                                     "Backfill the column first")
            values[(c, q)] = float(v)
    # copy=False: `calls` is keyed by the identity of the parsed nodes.
    resolved = tree.transform(lambda n: _number(values[calls[id(n)]]) if id(n) in calls else n, copy=False)
    quantiles = {f"quantile({c}, {_number_text(q)})": v for (c, q), v in values.items()}
    return resolved.sql(dialect=LanceSQL), quantiles


# --- near-duplicate search (multi-index hashing) ------------------------------------------


def near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All index pairs (i < j) whose 64-bit hashes differ in at most `max_distance` bits.

    The 64 bits are cut into max_distance + 1 bands; two hashes within the distance agree exactly
    on at least one band (pigeonhole), so only rows sharing a band value are compared (popcount of
    the XOR). The work is the number of same-band pairs, about linear for spread-out hashes.
    Returns (i, j, distance) sorted by (i, j).
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if max_distance >= 64:  # every pair qualifies
        i, j = np.triu_indices(n, k=1)
        return i.astype(np.int64), j.astype(np.int64), np.bitwise_count(h[i] ^ h[j]).astype(np.int64)
    m = max_distance + 1
    widths = [64 // m + (b < 64 % m) for b in range(m)]
    found_i, found_j = [], []
    shift = 0
    for w in widths:
        band = (h >> np.uint64(shift)) & np.uint64((1 << w) - 1)
        shift += w
        order = np.argsort(band, kind="stable")
        b = band[order]
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        ends = np.repeat(np.r_[starts[1:], n], np.diff(np.r_[starts, n]))
        pos = np.flatnonzero(ends - np.arange(n) > 1)
        step = 1
        while pos.size:  # compare each bucket member with the one `step` places later
            a, c = order[pos], order[pos + step]
            hit = np.bitwise_count(h[a] ^ h[c]) <= max_distance
            found_i.append(np.minimum(a, c)[hit])
            found_j.append(np.maximum(a, c)[hit])
            step += 1
            pos = pos[ends[pos] - pos > step]
    if not found_i:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    pair = np.unique(np.concatenate(found_i).astype(np.int64) * n + np.concatenate(found_j))
    i, j = pair // n, pair % n
    return i, j, np.bitwise_count(h[i] ^ h[j]).astype(np.int64)


def dedup_keep(hashes: np.ndarray, groups: np.ndarray, max_distance: int,
               valid: np.ndarray | None = None) -> np.ndarray:
    """Which rows (given in row-address order) survive near-duplicate removal.

    Rule: walk the rows in order; a row is dropped when its hash is within `max_distance` bits of
    a kept row of a DIFFERENT group. Rows of one group (the questions about one image) never drop
    each other, so the first group seen of a near-duplicate cluster keeps all its questions and
    later groups near it are dropped whole. Rows without a hash (`valid` False) are kept.
    """
    valid = np.ones(len(hashes), bool) if valid is None else valid
    keep = np.ones(len(hashes), bool)
    rows = np.flatnonzero(valid)
    uniq, inv = np.unique(np.asarray(hashes)[rows], return_inverse=True)
    i, j, _ = near_pairs(uniq, max_distance)
    degree = np.bincount(np.r_[i, j], minlength=len(uniq))
    pairs = np.unique(np.c_[inv, np.asarray(groups)[rows]], axis=0) if len(rows) else np.zeros((0, 2), np.int64)
    n_groups = np.bincount(pairs[:, 0], minlength=len(uniq))
    contested = (degree > 0) | (n_groups > 1)
    # Only rows whose hash has a neighbour or several groups can be dropped: loop over those.
    adj: dict[int, list[int]] = {}
    for a, b in zip(i.tolist(), j.tolist()):
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    kept_group: dict[int, int] = {}
    for r, u in zip(rows[contested[inv]].tolist(), inv[contested[inv]].tolist()):
        g = int(groups[r])
        if any(kept_group.get(v, g) != g for v in [u, *adj.get(u, ())]):
            keep[r] = False
        else:
            kept_group.setdefault(u, g)
    return keep


# --- rows of one table --------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """Row addresses (ascending) of one table with what the split, dedup and reports need."""

    addr: np.ndarray
    key: pa.Array
    group: np.ndarray
    hash: np.ndarray
    has_hash: np.ndarray
    group_names: list[str]

    def take(self, idx: np.ndarray) -> "_Rows":
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx
        return dataclasses.replace(self, addr=self.addr[idx], key=self.key.take(pa.array(idx, pa.int64())),
                                   group=self.group[idx], hash=self.hash[idx], has_hash=self.has_hash[idx])

    def __len__(self) -> int:
        return len(self.addr)


def _read_rows(ds: lance.LanceDataset, key: str, by: str | None, hash_col: str | None) -> _Rows:
    names = ds.schema.names
    cols = [c for c in dict.fromkeys([key, by, hash_col]) if c is not None and c in names]
    t = ds.to_table(columns=cols, with_row_address=True)
    order = np.argsort(t.column("_rowaddr").to_numpy(), kind="stable")
    t = t.take(pa.array(order))
    addr = t.column("_rowaddr").to_numpy()
    keys = (t.column(key).combine_chunks() if key in cols else pa.array(addr)).cast(pa.string())
    if hash_col in cols:
        h = t.column(hash_col).combine_chunks()
        has_hash = h.is_valid().to_numpy(zero_copy_only=False)
        hashes = h.fill_null(0).cast(pa.uint64(), safe=False).to_numpy()
    else:
        hashes, has_hash = np.zeros(len(addr), np.uint64), np.zeros(len(addr), bool)
    if by in cols:
        enc = pc.dictionary_encode(t.column(by).combine_chunks(), null_encoding="encode")
        groups, names_ = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()
    else:  # no group column (only with `split.table`): rows with one identical hash are one image
        enc = pc.dictionary_encode(pa.array(np.where(has_hash, hashes.astype(np.int64), -1 - np.arange(len(addr)))))
        groups, names_ = enc.indices.to_numpy().astype(np.int64), enc.dictionary.to_pylist()
    return _Rows(addr, keys, groups, hashes, has_hash, [str(g) for g in names_])


def _matching(ds: lance.LanceDataset, where: str | None, addr: np.ndarray) -> np.ndarray:
    if where is None:
        return np.ones(len(addr), bool)
    try:
        hit = ds.to_table(columns=[], with_row_address=True, filter=where).column("_rowaddr").to_numpy()
    except (OSError, ValueError) as e:
        raise _where_problem(f"Lance rejected the predicate `{where}`: {str(e).splitlines()[0]}") from None
    return np.isin(addr, hit)


def _unit_hash(seed: int, group: str) -> float:
    """(seed, group) -> [0, 1), independent of row order and table size."""
    digest = hashlib.blake2b(f"{seed}\x00{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _eval_mask(rows: _Rows, split: SplitSpec) -> np.ndarray:
    if split.fraction is None:
        raise ApplyError(Problem("no eval split: neither `fraction` nor `table` is set", "split",
                                 fix="Set `split.fraction` (e.g. 0.1) or `split.table`"))
    held = np.array([_unit_hash(split.seed, g) < split.fraction for g in rows.group_names], bool)
    return held[rows.group] if len(held) else np.zeros(len(rows), bool)


# --- leakage ------------------------------------------------------------------------------


def _leakage(train: _Rows, held: _Rows, max_distance: int) -> dict:
    """Eval rows whose hash equals (exact) or is near (0 < d <= max_distance) a train row's hash."""
    t_rows, e_rows = np.flatnonzero(train.has_hash), np.flatnonzero(held.has_hash)
    t_uniq, t_first = np.unique(train.hash[t_rows], return_index=True)
    e_uniq, e_inv = np.unique(held.hash[e_rows], return_inverse=True)
    i, j, dist = near_pairs(np.r_[t_uniq, e_uniq], max_distance)
    nt = len(t_uniq)
    cross = (i < nt) & (j >= nt)  # i < j, so i is the train side of a cross pair
    ti, ej, dist = i[cross], j[cross] - nt, dist[cross]
    t_addr = train.addr[t_rows[t_first]]
    best = np.lexsort((t_addr[ti], dist, ej))  # per eval hash: nearest, then lowest train address
    first = best[np.r_[True, ej[best][1:] != ej[best][:-1]]] if len(best) else best
    best_dist = np.full(len(e_uniq), -1, np.int64)
    best_train = np.full(len(e_uniq), -1, np.int64)
    best_dist[ej[first]], best_train[ej[first]] = dist[first], ti[first]
    row_dist = best_dist[e_inv]
    examples = []
    for r, u in zip(e_rows[row_dist >= 0][:5].tolist(), e_inv[row_dist >= 0][:5].tolist()):
        t = int(t_rows[t_first[best_train[u]]])
        examples.append({"eval_key": held.key[r].as_py(), "train_key": train.key[t].as_py(),
                         "distance": int(best_dist[u])})
    return {"exact": int((row_dist == 0).sum()), "near": int((row_dist > 0).sum()),
            "examples": examples, "checked": True}


# --- the slice ----------------------------------------------------------------------------


def _slice_name(uri: str, version: int, curation: CurationSpec | None, split: SplitSpec, key: str,
                eval_version: int | None) -> str:
    body = {"format": SLICE_FORMAT, "uri": str(Path(uri).resolve()), "version": version, "key": key,
            "curation": curation.model_dump(mode="json") if curation else None,
            "split": split.model_dump(mode="json"), "eval_version": eval_version}
    return "slice-" + hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=6).hexdigest()


def _write_slice(path: Path, train: _Rows, held: _Rows) -> None:
    """Write to a temp name, then rename: a crash never leaves a half slice at `path`."""
    table = pa.table({
        "row_addr": pa.array(np.r_[train.addr, held.addr].astype(np.uint64), pa.uint64()),
        "split": pa.array(["train"] * len(train) + ["eval"] * len(held), pa.string()),
        "key": pa.concat_arrays([train.key, held.key]),
    })
    tmp, old = (path.with_name(f".{path.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    lance.write_dataset(table, str(tmp))
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _empty_slice_error(uri: str, version: int, where: str | None, quantiles: dict[str, float],
                       matched: int) -> ApplyError:
    values = ", ".join(f"{k} = {_number_text(v)}" for k, v in quantiles.items())
    if matched:
        return ApplyError(Problem(f"all {matched} rows matching the predicate of `{uri}` version {version} "
                                  "fall in the eval split", "split",
                                  fix="Add rows with more groups, or lower `split.fraction`"))
    what = f"the training slice of `{uri}` version {version} is empty: no row matches `{where}`"
    return ApplyError(Problem(what + (f" (with {values})" if values else ""), "curation.where",
                              fix="Loosen the predicate, e.g. a lower quantile or a weaker comparison"))


def build_slice(uri: str, version: int, curation: CurationSpec | None, split: SplitSpec, out_dir: Path,
                *, key: str = "question_id", progress: Progress | None = None,
                exclude: np.ndarray | None = None) -> SliceResult:
    """Compute the training slice and the eval split of `uri` at `version` and store them.

    Order: split by group hash (or take `split.table` as eval) -> predicate (the eval side too when
    `split.curated`) -> dedup of the train side -> `limit` sample -> leakage report -> write.
    Dedup runs before `limit`, so `limit` counts rows that actually train. Rows at the `exclude`
    addresses (recorded row errors of the columns training reads) are on neither side.
    """
    report = progress or (lambda stage, done, total: None)
    ds = lance.dataset(uri, version=version)
    where, quantiles = resolve_where(ds, curation.where) if curation and curation.where else (None, {})
    dedup = curation.dedup if curation else None
    hash_col = dedup.column if dedup else HASH_COLUMN
    distance = dedup.max_distance if dedup else DEFAULT_DISTANCE
    if dedup and dedup.column not in ds.schema.names:
        raise ApplyError(Problem(f"unknown column `{dedup.column}`", "curation.dedup.column",
                                 fix=did_you_mean(dedup.column, ds.schema.names)))
    if split.table is None and split.by not in ds.schema.names:
        raise ApplyError(Problem(f"unknown column `{split.by}`", "split.by", fix=did_you_mean(split.by, ds.schema.names)))

    report("scan", 0, ds.count_rows())
    rows = _read_rows(ds, key, split.by, hash_col)
    match = _matching(ds, where, rows.addr)
    left_out = 0
    if exclude is not None and len(exclude):
        bad = np.isin(rows.addr, np.asarray(exclude, dtype=rows.addr.dtype))
        left_out = int((bad & match).sum())
        match &= ~bad
    eval_uri = eval_version = None
    if split.table is None:
        held_mask = _eval_mask(rows, split)
        train, held = rows.take(~held_mask & match), rows.take(held_mask & (match if split.curated else True))
    else:
        eds = lance.dataset(split.table)  # pinned to its version now; recorded in the result
        eval_uri, eval_version = split.table, eds.version
        erows = _read_rows(eds, key, split.by, hash_col)
        train, held = rows.take(match), erows.take(_matching(eds, where if split.curated else None, erows.addr))
    report("scan", len(rows), len(rows))

    removed = 0
    if dedup is not None:
        keep = dedup_keep(train.hash, train.group, dedup.max_distance, train.has_hash)
        removed = int((~keep).sum())
        train = train.take(keep)
        report("dedup", len(train), len(train) + removed)
    if curation is not None and curation.limit is not None and len(train) > curation.limit:
        pick = np.random.default_rng(curation.seed).choice(len(train), curation.limit, replace=False)
        train = train.take(np.sort(pick))
    if not len(train):
        raise _empty_slice_error(uri, version, where, quantiles, int(match.sum()))

    checked = hash_col in ds.schema.names and (split.table is None or hash_col in eds.schema.names)
    leakage = (_leakage(train, held, distance) if checked
               else {"exact": 0, "near": 0, "examples": [], "checked": False})
    report("leakage", len(held), len(held))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_slice_name(uri, version, curation, split, key, eval_version)}.lance"
    _write_slice(path, train, held)
    report("write", len(train) + len(held), len(train) + len(held))
    return SliceResult(table_version=version, train_rows=len(train), eval_rows=len(held), where=where,
                       quantiles=quantiles, dedup_removed=removed, leakage=leakage, path=str(path),
                       eval_uri=eval_uri, eval_version=eval_version, left_out=left_out)


def read_slice(path: str, split: str) -> np.ndarray:
    """uint64 row addresses of the `train` or `eval` side of a stored slice, in stored order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    t = lance.dataset(str(path)).to_table(columns=["row_addr"], filter=f"split = '{split}'")
    return t.column("row_addr").to_numpy().astype(np.uint64, copy=False)
