"""Bad rows through the image, vision-tower and SFT-token UDFs (with the shipped tiny model):
`on_error: null` completes every column with exactly the bad rows null and listed by `vlmspec
errors`; `on_error: fail` stops naming the first bad row; whole-source problems are refused at plan
time. The table and cases are the ones `vlmspec bench badrows` runs (runtime/bench/badrows.py).
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from vlmspec.runtime.tools.bench import badrows
from vlmspec.runtime.cli import app
from vlmspec.runtime.udfs import image
from vlmspec.runtime.udfs.base import MAX_IMAGE_PIXELS, open_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("badrows")
    return badrows.build_source(d / "src" / "rows.parquet", good_rows=3)


def test_on_error_null_completes_with_exactly_the_bad_rows_null_and_listed(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, by_kind = source
    res = badrows.run_null(tmp_path, path, by_kind)
    assert res["status"] == "ok" and res["raw_unchanged"] and res["good_rows_complete"]
    for kind, cols in res["outcome"].items():
        for col, got in cols.items():
            assert got.split(":")[0] == badrows.expected(kind, col), (kind, col, got)
    out = res["outcome"]
    assert "not an image Pillow can read (0 bytes)" in out["zero_byte_image"]["dhash"]
    assert "DecompressionBombWarning" in out["bomb_100mp"]["dhash"]  # over 64 MP: refused, never decoded
    assert "over the 64,000,000-pixel limit" in out["bomb_100mp"]["image_size"] or \
        "exceeds limit of 64000000" in out["bomb_100mp"]["image_size"]
    assert "> max_tokens 96" in out["answer_too_long"]["sft_tokens"]
    assert "BytesIO" not in str(out)  # messages say what the bytes were, not where they sat in memory

    r = CliRunner().invoke(app, ["errors", str(tmp_path / "t.yaml"), "--limit", "100"])
    assert r.exit_code == 0, r.output
    assert f"{res['errors_listed']} row error(s)." in r.stdout
    assert res["errors_listed"] == sum(1 for cols in out.values() for v in cols.values() if v.startswith("row error"))


def test_on_error_fail_names_the_first_bad_row(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, by_kind = source
    res = badrows.run_fail(tmp_path, path, by_kind)
    for col, got in res.items():
        want = next(k for k in by_kind if badrows.expected(k, col) == "row error")
        assert got["raised"] and got["names_row"] == want, (col, got)
        assert f"question_id='{by_kind[want]}'" in got["message"] and "resumes from the last checkpoint" in got["message"]


def test_whole_source_problems_are_refused_at_plan_time(source, tmp_path):
    import pyarrow.parquet as pq

    path, _ = source
    good = tmp_path / "good.parquet"
    pq.write_table(pq.read_table(path).slice(0, 3), good)
    res = badrows.run_upfront(tmp_path / "up", good)
    assert set(res) == {"binary_text_parquet", "missing_column_parquet", "missing_column_lance"}
    for kind, got in res.items():
        assert got["refused_at_plan"] and got["error"] == "CompileError" and got["located"], (kind, got)
    assert "expects string input but `question` is `large_binary`" in res["binary_text_parquet"]["message"]
    assert "unknown column `answer`" in res["missing_column_lance"]["message"]


def test_bomb_check_does_not_depend_on_the_warning_filter(monkeypatch):
    """`catch_warnings` is not thread-safe (the vision tower decodes in threads): with the warning
    filter lost and Pillow's own limit lifted, the explicit pixel check still refuses a bomb."""
    import contextlib

    from PIL import Image

    from vlmspec.runtime.udfs import base

    bomb = badrows._png(9_000, 9_000)  # 81 MP
    with pytest.raises(Image.DecompressionBombWarning):  # the normal path: the warning is an error
        open_image(bomb, decode=False)
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
    monkeypatch.setattr(base, "image_guard", contextlib.nullcontext)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # another library lifted the limit
    with pytest.raises(ValueError, match="9000 x 9000 = 81,000,000 pixels, over the 64,000,000-pixel limit"):
        open_image(bomb, decode=False)
    ok = badrows._png(100, 50)
    assert image.size(pa.array([ok, None], pa.large_binary())).to_pylist() == [{"width": 100, "height": 50}, None]
