"""Tests for vlmspec.runtime.curate: quantile predicates, group split, dedup, leakage, pinned slices."""

from __future__ import annotations

import hashlib

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmspec.compiler.errors import ApplyError
from vlmspec.compiler.model import CurationSpec, DedupSpec, SplitSpec
from vlmspec.runtime.curate import build_slice, dedup_keep, near_pairs, read_slice, resolve_where

Q75 = "ocr_token_count >= quantile(ocr_token_count, 0.75)"


def flip(h: int, bits: int, rng: np.random.Generator) -> int:
    """`h` with `bits` distinct random bits flipped."""
    for b in rng.choice(64, bits, replace=False):
        h ^= 1 << int(b)
    return h


def side(image_id: str, seed: int = 0, fraction: float = 0.1) -> str:
    """The documented split rule, written out independently of the implementation."""
    u = int.from_bytes(hashlib.blake2b(f"{seed}\x00{image_id}".encode(), digest_size=8).digest(), "big") / 2**64
    return "eval" if u < fraction else "train"


def rows(images: list[str], hashes: dict[str, int] | None = None, per_image: int = 3, seed: int = 0,
         ocr=None) -> pa.Table:
    """`per_image` questions per image; one dhash per image (random unless given)."""
    rng = np.random.default_rng(seed)
    hashes = hashes or {}
    img = [i for i in images for _ in range(per_image)]
    h = {i: hashes.get(i, int(rng.integers(0, 2**63)) * 2 + 1) for i in images}
    n = len(img)
    return pa.table({
        "question_id": [f"{i}-q{k}" for i in images for k in range(per_image)],
        "image_id": img,
        "ocr_token_count": pa.array(np.arange(n) if ocr is None else ocr, pa.int32()),
        "dhash": pa.array([h[i] for i in img], pa.uint64()),
    })


def write(path, table: pa.Table, mode: str = "create") -> str:
    lance.write_dataset(table, str(path), mode=mode, max_rows_per_file=64)
    return str(path)


def keys(res, split: str) -> set[str]:
    t = lance.dataset(res.path).to_table(filter=f"split = '{split}'")
    return set(t.column("key").to_pylist())


def images(res, split: str) -> set[str]:
    return {k.split("-q")[0] for k in keys(res, split)}


# --- banded search and dedup rule (pure) --------------------------------------------------


def brute_pairs(h: np.ndarray, d: int) -> set[tuple[int, int, int]]:
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    i, j = np.nonzero(np.triu(dist <= d, k=1))
    return set(zip(i.tolist(), j.tolist(), dist[i, j].tolist()))


def clustered(n: int, seed: int) -> np.ndarray:
    """Random hashes in clusters (flips of 0-10 bits), so many pairs sit near any distance."""
    rng = np.random.default_rng(seed)
    bases = [int(b) for b in rng.integers(0, 2**63, n // 8)]
    out = [flip(bases[rng.integers(len(bases))], int(rng.integers(0, 11)), rng) for _ in range(n)]
    return np.array(out, np.uint64)


@pytest.mark.parametrize("d", [0, 1, 3, 4, 8, 20])
def test_banded_search_equals_brute_force(d):
    h = clustered(2000, seed=d)
    i, j, dist = near_pairs(h, d)
    got = set(zip(i.tolist(), j.tolist(), dist.tolist()))
    assert got == brute_pairs(h, d)
    assert len(got) > 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=40), st.integers(0, 12),
       st.lists(st.tuples(st.integers(0, 39), st.integers(0, 63)), max_size=60))
def test_banded_search_property(base, d, flips):
    h = list(base)
    for k, b in flips:  # near copies of existing hashes
        if h:
            h.append(h[k % len(h)] ^ (1 << b))
    arr = np.array(h, np.uint64)
    i, j, dist = near_pairs(arr, d)
    assert set(zip(i.tolist(), j.tolist(), dist.tolist())) == brute_pairs(arr, d)


def reference_dedup(h: np.ndarray, groups: np.ndarray, d: int) -> np.ndarray:
    keep = np.ones(len(h), bool)
    for r in range(len(h)):
        kept = np.flatnonzero(keep[:r])
        near = np.bitwise_count(h[kept] ^ h[r]) <= d
        keep[r] = not np.any(near & (groups[kept] != groups[r]))
    return keep


def test_dedup_keep_equals_reference_greedy():
    h = clustered(600, seed=7)
    groups = np.random.default_rng(1).integers(0, 400, len(h))
    assert np.array_equal(dedup_keep(h, groups, 4), reference_dedup(h, groups, 4))


def test_dedup_keeps_rows_without_hash():
    h = np.array([5, 5, 5], np.uint64)
    keep = dedup_keep(h, np.array([0, 1, 2]), 4, valid=np.array([True, False, True]))
    assert keep.tolist() == [True, True, False]


# --- on disk ------------------------------------------------------------------------------


@pytest.mark.slow
def test_quantile_value_and_sql(tmp_path):
    ds = lance.dataset(write(tmp_path / "t.lance", rows([f"img{i}" for i in range(100)], per_image=4)))
    sql, q = resolve_where(ds, Q75)
    assert q == {"quantile(ocr_token_count, 0.75)": 299.25}
    assert sql == "ocr_token_count >= CAST(299.25 AS DOUBLE)"
    assert ds.count_rows(filter=sql) == 100
    sql, q = resolve_where(ds, "ocr_token_count < quantile(ocr_token_count, 0.5) + 1 AND image_id <> 'x'")
    assert q["quantile(ocr_token_count, 0.5)"] == pc.quantile(pa.array(range(400)), q=0.5)[0].as_py() == 199.5
    assert sql == "ocr_token_count < CAST(199.5 AS DOUBLE) + 1 AND image_id <> 'x'"
    sql, q = resolve_where(ds, "ocr_token_count BETWEEN quantile(ocr_token_count, 0) AND quantile(ocr_token_count, 1)")
    assert sql == "ocr_token_count BETWEEN 0 AND 399"
    assert ds.count_rows(filter=sql) == 400


@pytest.mark.slow
def test_quantile_ignores_nulls_and_rejects_unknown_columns(tmp_path):
    t = pa.table({"question_id": ["a", "b", "c", "d"], "n": pa.array([1, None, 3, None], pa.int32())})
    ds = lance.dataset(write(tmp_path / "t.lance", t))
    assert resolve_where(ds, "n >= quantile(n, 0.5)") == ("n >= 2", {"quantile(n, 0.5)": 2.0})
    with pytest.raises(ApplyError, match="unknown column `m`"):
        resolve_where(ds, "n >= quantile(m, 0.5)")


@pytest.mark.slow
def test_top_quartile_slice(tmp_path):
    uri = write(tmp_path / "t.lance", rows([f"img{i}" for i in range(100)], per_image=4))
    res = build_slice(uri, 1, CurationSpec(where=Q75), SplitSpec(fraction=0.2), tmp_path / "slices")
    assert res.train_rows + res.eval_rows == 100 and res.eval_rows > 0
    full = lance.dataset(uri).to_table(columns=["ocr_token_count"], with_row_address=True)
    ocr = dict(zip(full.column("_rowaddr").to_pylist(), full.column("ocr_token_count").to_pylist()))
    for split in ("train", "eval"):
        assert min(ocr[a] for a in read_slice(res.path, split).tolist()) >= 299.25
    uncurated = build_slice(uri, 1, CurationSpec(where=Q75), SplitSpec(fraction=0.2, curated=False), tmp_path / "s")
    assert uncurated.train_rows == res.train_rows
    assert uncurated.eval_rows == 4 * len(images(uncurated, "eval"))  # every question of held-out images
    assert uncurated.eval_rows > res.eval_rows


@pytest.mark.slow
def test_split_whole_groups_fraction_and_rule(tmp_path):
    names = [f"img{i}" for i in range(1000)]
    uri = write(tmp_path / "t.lance", rows(names, per_image=2))
    res = build_slice(uri, 1, None, SplitSpec(fraction=0.2, seed=3), tmp_path / "s")
    train, held = images(res, "train"), images(res, "eval")
    assert not train & held and train | held == set(names)
    assert 150 <= len(held) <= 250
    assert held == {n for n in names if side(n, seed=3, fraction=0.2) == "eval"}
    assert res.train_rows == 2 * len(train) and res.eval_rows == 2 * len(held)


@pytest.mark.slow
def test_split_is_deterministic_and_independent_of_order_and_appends(tmp_path):
    names = [f"img{i}" for i in range(300)]
    table = rows(names)
    uri = write(tmp_path / "t.lance", table)
    split = SplitSpec(fraction=0.3, seed=1)
    a = build_slice(uri, 1, None, split, tmp_path / "a")
    b = build_slice(uri, 1, None, split, tmp_path / "b")
    assert np.array_equal(read_slice(a.path, "eval"), read_slice(b.path, "eval"))
    other_seed = build_slice(uri, 1, None, SplitSpec(fraction=0.3, seed=2), tmp_path / "c")
    assert images(other_seed, "eval") != images(a, "eval")

    reversed_uri = write(tmp_path / "r.lance", table.take(pa.array(np.arange(len(table))[::-1])))
    assert images(build_slice(reversed_uri, 1, None, split, tmp_path / "d"), "eval") == images(a, "eval")

    ds = lance.dataset(uri)
    write(uri, rows([f"new{i}" for i in range(300)], seed=9), mode="append")
    grown = build_slice(uri, lance.dataset(uri).version, None, split, tmp_path / "e")
    assert grown.table_version > ds.version
    assert images(grown, "eval") & set(names) == images(a, "eval")
    assert images(grown, "train") & set(names) == images(a, "train")


@pytest.mark.slow
def test_dedup_drops_planted_near_duplicates_only(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"img{i:03d}" for i in range(60)]
    a = int(rng.integers(0, 2**63))
    planted = {"img000": a, "img010": flip(a, 3, rng), "img020": a, "img030": flip(a, 10, rng)}
    uri = write(tmp_path / "t.lance", rows(names, planted, per_image=3, seed=5))
    eval_uri = write(tmp_path / "eval.lance", rows(["e0", "e1"], per_image=1, seed=6))
    cur = CurationSpec(dedup=DedupSpec(column="dhash", max_distance=4))
    res = build_slice(uri, 1, cur, SplitSpec(table=eval_uri), tmp_path / "s")
    train = keys(res, "train")
    assert res.dedup_removed == 6  # img010 (distance 3) and img020 (exact), 3 questions each
    assert {f"img000-q{k}" for k in range(3)} <= train  # every question of the kept image
    assert not {k for k in train if k.startswith(("img010", "img020"))}
    assert {f"img030-q{k}" for k in range(3)} <= train  # distance 10 is a different image
    assert res.train_rows == 60 * 3 - 6
    assert res.eval_uri == eval_uri and res.eval_version == 1 and res.eval_rows == 2
    assert len(read_slice(res.path, "eval")) == 2


@pytest.mark.slow
def test_leakage_counts_planted_cross_split_duplicates(tmp_path):
    names = [f"img{i:03d}" for i in range(200)]
    held = [n for n in names if side(n) == "eval"]
    train = [n for n in names if side(n) == "train"]
    assert len(held) >= 3
    rng = np.random.default_rng(1)
    base = [int(rng.integers(0, 2**63)) for _ in range(3)]
    planted = {train[0]: base[0], held[0]: base[0],                       # exact
               train[1]: base[1], held[1]: flip(base[1], 2, rng),         # near (2 bits)
               train[2]: base[2], held[2]: flip(base[2], 12, rng)}        # far: not leakage
    uri = write(tmp_path / "t.lance", rows(names, planted, per_image=2, seed=2))
    res = build_slice(uri, 1, None, SplitSpec(), tmp_path / "s")
    leak = res.leakage
    assert leak["checked"] and leak["exact"] == 2 and leak["near"] == 2
    assert {(e["eval_key"].split("-q")[0], e["train_key"], e["distance"]) for e in leak["examples"]} == {
        (held[0], f"{train[0]}-q0", 0), (held[1], f"{train[1]}-q0", 2)}
    no_hash = write(tmp_path / "n.lance", rows(names).drop_columns(["dhash"]))
    assert build_slice(no_hash, 1, None, SplitSpec(), tmp_path / "s").leakage == {
        "exact": 0, "near": 0, "examples": [], "checked": False}


@pytest.mark.slow
def test_pinned_version_survives_appends(tmp_path):
    uri = write(tmp_path / "t.lance", rows([f"img{i}" for i in range(80)]))
    cur = CurationSpec(where=Q75)
    res = build_slice(uri, 1, cur, SplitSpec(), tmp_path / "s")
    before = {s: read_slice(res.path, s) for s in ("train", "eval")}
    write(uri, rows([f"new{i}" for i in range(80)], seed=3, ocr=np.arange(1000, 1240)), mode="append")
    assert all(np.array_equal(read_slice(res.path, s), before[s]) for s in before)
    again = build_slice(uri, 1, cur, SplitSpec(), tmp_path / "s")
    assert again == res and np.array_equal(read_slice(again.path, "train"), before["train"])
    latest = build_slice(uri, 2, cur, SplitSpec(), tmp_path / "s")
    assert latest.path != res.path and latest.quantiles != res.quantiles


@pytest.mark.slow
def test_limit_is_a_deterministic_sample(tmp_path):
    uri = write(tmp_path / "t.lance", rows([f"img{i}" for i in range(100)]))
    cur = CurationSpec(limit=50, seed=4)
    a = build_slice(uri, 1, cur, SplitSpec(), tmp_path / "a")
    b = build_slice(uri, 1, cur, SplitSpec(), tmp_path / "b")
    assert a.train_rows == 50 and np.array_equal(read_slice(a.path, "train"), read_slice(b.path, "train"))
    assert np.all(np.diff(read_slice(a.path, "train").astype(np.int64)) > 0)


@pytest.mark.slow
def test_empty_slice_names_the_quantile(tmp_path):
    uri = write(tmp_path / "t.lance", rows([f"img{i}" for i in range(20)]))
    cur = CurationSpec(where="ocr_token_count > quantile(ocr_token_count, 1.0)")
    with pytest.raises(ApplyError, match=r"quantile\(ocr_token_count, 1\) = 59.*Loosen"):
        build_slice(uri, 1, cur, SplitSpec(), tmp_path / "s")
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


@pytest.mark.slow
def test_slice_table_shape_progress_and_no_leftovers(tmp_path):
    uri = write(tmp_path / "t.lance", rows([f"img{i}" for i in range(50)]))
    calls = []
    res = build_slice(uri, 1, None, SplitSpec(), tmp_path / "s", progress=lambda *a: calls.append(a))
    ds = lance.dataset(res.path)
    assert ds.schema == pa.schema([("row_addr", pa.uint64()), ("split", pa.string()), ("key", pa.string())])
    assert not ds.schema.metadata
    assert [p.name for p in (tmp_path / "s").iterdir()] == [res.path.split("/")[-1]]
    assert {c[0] for c in calls} >= {"scan", "leakage", "write"}
    assert all(0 <= done <= total for _, done, total in calls)
    d = res.to_dict()
    assert d["train_rows"] + d["eval_rows"] == 150 and d["table_version"] == 1
    with pytest.raises(ValueError):
        read_slice(res.path, "test")


# --- plan-time checks of `where` against what Lance really does ---------------------------

TYPED = pa.table({
    "question_id": ["a", "b", "c"], "n": pa.array([1, 2, 3], pa.int32()), "u": pa.array([1, 2, 3], pa.uint64()),
    "f": pa.array([0.1, 0.5, 0.9], pa.float32()), "b": [True, False, True], "s": ["a", "bb", "ccc"],
    "ls": pa.array([["a"], ["b", "c"], []], pa.list_(pa.string())),
    "st": pa.array([{"width": 1, "height": 2}] * 3, pa.struct([("width", pa.int32()), ("height", pa.int32())])),
    "h": pa.array([[1.0, 2.0]] * 3, pa.list_(pa.float16(), 2)), "img": pa.array([b"x"] * 3, pa.large_binary()),
})
PREDICATES = [
    "s > 3", "n > '2'", "n > 1.5", "n > 2.0", "n >= quantile(n, 0.5)", "f > quantile(f, 0.5)", "b", "b AND n > 1",
    "NOT b", "s", "n", "n + 1", "s = 'a'", "s LIKE 'a%'", "s IN ('a', 'bb')", "n BETWEEN 1 AND 2", "s IS NULL",
    "length(s) > 1", "lower(s) = 'a'", "array_length(ls) > 0", "array_has(ls, 'a')", "st.width > 0", "foo(s) > 1",
    "unnest(ls) = 'a'", "(select max(n) from t) > 1", "u > 1", "f > 1", "n = f", "s = n", "b = 1", "b = true",
    "img IS NOT NULL", "h IS NOT NULL", "regexp_match(s, 'a') IS NOT NULL", "s ~ 'a'", "count(*) > 1",
    "max(n) > 1", "n % 2 = 0", "abs(n) > 1", "ls = 'a'", "st > 1", "s || 'x' = 'ax'", "starts_with(s, 'a')",
    "n IN (1, 2)", "s NOT IN ('a')", "coalesce(n, 0) > 1", "CASE WHEN n > 1 THEN true ELSE false END",
    "true", "1", "'a'", "NULL", "strlen(s) > 1", "u > -1", "n > -1", "st.width > 1.5", "s = 'a' AND n", "n AND b",
    "NOT n", "h[1] > 0", "ls[1] = 'a'", "n::double > 1.5", "img = 'x'", "n > 99999999999", "length(s) > 'a'",
    "lower(n) = 'a'", "abs(s) > 1",
]


@pytest.mark.slow
@pytest.mark.parametrize("where", PREDICATES)
def test_plan_time_check_agrees_with_lance(where, tmp_path):
    """Each predicate is refused at plan time exactly when Lance refuses it at apply, except where
    the plan cannot know the types a function returns (then it lets Lance decide)."""
    from vlmspec.compiler.where import check_where

    ds = lance.dataset(write(tmp_path / "t.lance", TYPED))
    types = {f.name: str(f.type) for f in ds.schema}  # as lance_io reads them into TableState
    refused_at_plan = bool(check_where(where, types).problems)
    try:
        sql, _ = resolve_where(ds, where)
        ds.to_table(columns=[], with_row_address=True, filter=sql)
        lance_refuses = False
    except (ApplyError, OSError, ValueError):
        lance_refuses = True
    unknowable = {"lower(n) = 'a'", "abs(s) > 1"}  # argument types of functions are not checked
    assert refused_at_plan == lance_refuses or (where in unknowable and lance_refuses), \
        f"plan {'refuses' if refused_at_plan else 'accepts'} `{where}`, Lance {'refuses' if lance_refuses else 'accepts'}"


@pytest.mark.slow
def test_the_function_lists_match_the_installed_lance(tmp_path):
    from vlmspec.compiler._sql_functions import AGGREGATE_FUNCTIONS, SCALAR_FUNCTIONS

    ds = lance.dataset(write(tmp_path / "t.lance", TYPED))

    def known(name: str) -> bool:
        try:
            ds.scanner(columns=[], with_row_address=True, filter=f"{name}(n) IS NULL").explain_plan()
        except Exception as e:  # noqa: BLE001 -- every error but this one means Lance knows the name
            return "Invalid function" not in str(e)
        return True

    assert [n for n in sorted(SCALAR_FUNCTIONS | AGGREGATE_FUNCTIONS) if not known(n)] == []
    assert [n for n in ("strlen", "regexp_matches", "quantile", "foo") if known(n)] == []


@pytest.mark.slow
def test_resolve_where_refuses_a_second_statement(tmp_path):
    ds = lance.dataset(write(tmp_path / "t.lance", TYPED))
    with pytest.raises(ApplyError, match="curation.where: `;` ends the expression and `drop table x` follows it"):
        resolve_where(ds, "1=1; drop table x")
