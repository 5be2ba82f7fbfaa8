"""Tests for vlmspec.runtime.eval.metrics (TextVQA accuracy, paired bootstrap) and .report."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlmspec.runtime.eval.metrics import (
    answer_scores,
    ci_excludes_zero,
    mean_accuracy,
    normalize_answer,
    paired_bootstrap,
    vqa_accuracy,
)
from vlmspec.runtime.eval.report import THUMB_SIZE, write_report


# --- normalisation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),
        ("  STOP\tsign\n", "stop sign"),
        ("end.", "end"),
        ("3.5", "3.5"),
        ("version 2.0.", "version 2.0"),
        ("two", "2"),
        ("none", "0"),
        ("Ten dollars", "10 dollars"),
        ("the cat", "cat"),
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("youre", "you're"),
        ("1,000", "1000"),
        ("hello, world", "hello world"),
        ("what?", "what"),
        ("coca-cola", "coca cola"),  # punctuation not next to a space -> space
        ("coca - cola", "coca cola"),  # next to a space -> removed
        # each punctuation mark is decided separately: "(" and "-" touch no space -> space;
        # ")" appears as ") " -> removed.
        ("(555) 123-4567", "555 123 4567"),
        ("hi!", "hi"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_possessive_and_case():
    # word_tokenize splits "'s" off before punctuation handling.
    assert normalize_answer("McDonald's") == "mcdonald 's"


def test_normalize_none_is_empty():
    assert normalize_answer(None) == ""


# --- leave-one-out accuracy --------------------------------------------------------------


def _answers(k: int, match: str = "coke", other: str = "pepsi") -> list[str]:
    return [match] * k + [other] * (10 - k)


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # k matching annotators: the k subsets that drop a match see k-1 matches, the
        # other 10-k see k; score = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10.
        (1, 0.3),  # (1*0 + 9*1/3)/10
        (2, 0.6),  # (2*1/3 + 8*2/3)/10
        (3, 0.9),  # (3*2/3 + 7*1)/10
        (4, 1.0),  # (4*1 + 6*1)/10
        (7, 1.0),
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(matches, expected):
    assert vqa_accuracy("coke", _answers(matches)) == pytest.approx(expected, abs=1e-12)


def test_exact_values_for_canonical_order():
    assert vqa_accuracy("coke", _answers(1)) == 0.3
    assert vqa_accuracy("coke", _answers(2)) == 0.6
    assert vqa_accuracy("coke", _answers(3)) == 0.9
    assert vqa_accuracy("coke", _answers(4)) == 1.0
    assert vqa_accuracy("coke", ["coke"] * 10) == 1.0


def test_no_match_and_empty_prediction():
    assert vqa_accuracy("sprite", _answers(5)) == 0.0
    assert vqa_accuracy("", _answers(5)) == 0.0
    assert vqa_accuracy(None, _answers(5)) == 0.0


def test_match_after_normalisation():
    answers = ["Two"] * 3 + ["three"] * 7
    assert vqa_accuracy("2.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("THE 3", answers) == 1.0


def test_answer_scores_and_validation():
    scores = answer_scores(_answers(3))
    assert set(scores) == {"coke", "pepsi"}
    assert scores["pepsi"] == 1.0
    with pytest.raises(ValueError):
        answer_scores([])
    with pytest.raises(TypeError):
        vqa_accuracy("x", "x")


def test_mean_accuracy():
    preds = ["coke", "sprite", "pepsi"]
    golds = [_answers(10), _answers(10), _answers(1)]
    assert mean_accuracy(preds, golds) == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    with pytest.raises(ValueError):
        mean_accuracy(["a"], [])


# --- paired bootstrap --------------------------------------------------------------------


def test_bootstrap_identical_is_zero():
    scores = [0.0, 0.3, 1.0, 0.6, 1.0]
    out = paired_bootstrap(scores, scores, resamples=500, seed=1)
    assert out["lift"] == 0.0
    assert out["ci_low"] == 0.0 and out["ci_high"] == 0.0
    assert out["n"] == 5 and out["resamples"] == 500 and out["confidence"] == 0.95
    assert not ci_excludes_zero(out)
    assert out["p_value"] == 1.0


def test_bootstrap_clear_improvement_excludes_zero():
    rng = np.random.default_rng(0)
    base = rng.choice([0.0, 1.0], size=400, p=[0.6, 0.4])
    tuned = np.where(rng.random(400) < 0.5, 1.0, base)  # flips about half the misses
    out = paired_bootstrap(base, tuned, resamples=1000, seed=0)
    assert out["lift"] == pytest.approx(float(tuned.mean() - base.mean()))
    assert out["lift"] > 0
    assert 0 < out["ci_low"] <= out["lift"] <= out["ci_high"]
    assert ci_excludes_zero(out)
    assert out["p_value"] == 0.0
    assert set(out) >= {"n", "base", "tuned", "lift", "ci_low", "ci_high", "p_value",
                        "resamples", "confidence"}


def test_bootstrap_deterministic_for_seed():
    base = [0.0, 1.0, 0.3, 0.6, 0.0, 1.0, 0.9]
    tuned = [1.0, 1.0, 0.0, 0.6, 0.3, 1.0, 1.0]
    a = paired_bootstrap(base, tuned, resamples=300, seed=7)
    b = paired_bootstrap(base, tuned, resamples=300, seed=7)
    c = paired_bootstrap(base, tuned, resamples=300, seed=8)
    assert a == b
    assert (a["ci_low"], a["ci_high"]) != (c["ci_low"], c["ci_high"])


def test_bootstrap_validation():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="n >= 1"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [0.0], resamples=0)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [0.0], confidence=1.0)


# --- report ------------------------------------------------------------------------------


def _jpeg(color, size=(320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _rows():
    specs = [
        (1, "What brand?", "coke", "pepsi", 0.0, 1.0),
        (2, "<script>alert('x')</script> what number?", "7", "7", 1.0, 1.0),
        (3, "Which word?", "stop", "go", 1.0, 0.0),
        (4, "What year?", None, "1999", 0.0, 0.3),
    ]
    rows = []
    for qid, q, b, t, bs, ts in specs:
        rows.append({
            "question_id": qid,
            "question": q,
            "answers": ["pepsi"] * 6 + ["coke"] * 4,
            "image": _jpeg((qid * 40, 100, 200)),
            "base": b,
            "tuned": t,
            "base_score": bs,
            "tuned_score": ts,
        })
    return rows


def test_write_report(tmp_path):
    rows = _rows()
    stats = paired_bootstrap([r["base_score"] for r in rows], [r["tuned_score"] for r in rows],
                             resamples=200)
    results = {"metric": "textvqa_accuracy", **stats}
    paths = write_report(results, rows, tmp_path / "out")

    for key in ("results", "markdown", "html"):
        assert paths[key].is_file()
    assert json.loads(paths["results"].read_text()) == json.loads(json.dumps(results))
    text = paths["results"].read_text()
    assert text.index('"base"') < text.index('"ci_high"')  # sorted keys

    page = paths["html"].read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "textvqa_accuracy" in page and "n</dt><dd>4<" in page
    assert "Tuned wins" in page and "Tuned losses" in page and "Random sample" in page
    assert "pepsi &times;6" in page
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert uris
    with Image.open(io.BytesIO(base64.b64decode(uris[0]))) as im:
        assert max(im.size) == THUMB_SIZE

    md = paths["markdown"].read_text()
    assert "<script>" not in md
    assert "(thumbs/1.jpg)" in md
    thumbs = sorted(p.name for p in (tmp_path / "out" / "thumbs").iterdir())
    assert thumbs == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    with Image.open(tmp_path / "out" / "thumbs" / "1.jpg") as im:
        assert im.format == "JPEG" and im.size == (160, 120)
    assert "(no prediction)" in md
    assert "includes 0" in md or "excludes 0" in md


def test_write_report_tolerates_bad_image(tmp_path):
    rows = _rows()[:1]
    rows[0]["image"] = b"not an image"
    paths = write_report({"n": 1}, rows, tmp_path)
    assert "(no image)" in paths["html"].read_text()
    assert not (tmp_path / "thumbs").exists()


def test_report_carries_its_provenance(tmp_path):
    """A report pasted elsewhere names the spec, table version, run, model and adapter it came from."""
    results = {"n": 1, "spec_hash": "abc123", "table": "data/t.lance", "table_version": 7,
               "run_id": "20261205-101010-ab12", "adapter": "runs/x/adapter",
               "model": {"id": "Qwen/Qwen2.5-VL-3B-Instruct", "revision": "main"}}
    paths = write_report(results, _rows()[:1], tmp_path)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    for label, value in (("Spec hash", "abc123"), ("Table version", "7"), ("Run", "20261205-101010-ab12"),
                         ("Adapter", "runs/x/adapter"), ("Model", "Qwen/Qwen2.5-VL-3B-Instruct@main")):
        assert f"- **{label}:** `{value}`" in md
        assert f"<dt>{label}</dt><dd><code>{value}</code></dd>" in page
    bare = write_report({"n": 1}, _rows()[:1], tmp_path / "bare")["markdown"].read_text()
    assert "Spec hash" not in bare  # nothing made up where the results name nothing
