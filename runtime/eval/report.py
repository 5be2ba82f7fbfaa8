"""Human-readable evaluation report: results.json, report.md and report.html.

``write_report(results, rows, out_dir)`` writes

* ``results.json`` – the given ``results`` dict, pretty-printed with sorted keys;
* ``report.md``   – header + "tuned wins" / "tuned losses" / random-sample tables, with
  thumbnails written to ``thumbs/<question_id>.jpg`` and referenced relatively;
* ``report.html`` – the same, self-contained: thumbnails are embedded as base64 JPEG
  data URIs and every piece of dataset text is HTML-escaped.

``rows`` items carry: question_id, question, answers (list[str]), image (encoded bytes),
base (str | None), tuned (str | None), base_score, tuned_score.

Header numbers are read from ``results`` (top level, or a nested ``"bootstrap"`` /
``"stats"`` dict, e.g. the output of :func:`vlmspec.runtime.eval.metrics.paired_bootstrap`):
``metric``, ``n``, ``base``/``base_accuracy``, ``tuned``/``tuned_accuracy``, ``lift``,
``ci_low``, ``ci_high``, ``confidence``. Missing accuracies are computed from ``rows``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["write_report", "THUMB_SIZE"]

THUMB_SIZE = 160  # longest side of a thumbnail, in pixels
DEFAULT_METRIC = "TextVQA accuracy (EvalAI soft score)"


# --- helpers -----------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy array
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    return str(obj)


def _pick(results: dict, *names: str) -> Any:
    for scope in (results, results.get("bootstrap"), results.get("stats")):
        if isinstance(scope, dict):
            for name in names:
                if scope.get(name) is not None:
                    return scope[name]
    return None


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _score(row: dict, key: str) -> float:
    value = _num(row.get(key))
    return 0.0 if value is None else value


def _header(results: dict, rows: list[dict]) -> dict[str, Any]:
    base = _num(_pick(results, "base", "base_accuracy"))
    tuned = _num(_pick(results, "tuned", "tuned_accuracy"))
    if base is None and rows:
        base = sum(_score(r, "base_score") for r in rows) / len(rows)
    if tuned is None and rows:
        tuned = sum(_score(r, "tuned_score") for r in rows) / len(rows)
    lift = _num(_pick(results, "lift"))
    if lift is None and base is not None and tuned is not None:
        lift = tuned - base
    ci_low = _num(_pick(results, "ci_low"))
    ci_high = _num(_pick(results, "ci_high"))
    n = _pick(results, "n")
    confidence = _num(_pick(results, "confidence")) or 0.95
    excludes = None
    if ci_low is not None and ci_high is not None:
        excludes = ci_low > 0.0 or ci_high < 0.0
    return {
        "metric": str(_pick(results, "metric") or DEFAULT_METRIC),
        "n": int(n) if n is not None else len(rows),
        "base": base,
        "tuned": tuned,
        "lift": lift,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "confidence": confidence,
        "excludes_zero": excludes,
        "p_value": _num(_pick(results, "p_value")),
        "provenance": _provenance(results),
    }


# Where the numbers came from, so a report pasted into a PR or a doc can be traced back to the exact
# spec, table version, run and adapter (`vlmspec log` lists runs by these ids).
_PROVENANCE = (("spec_hash", "Spec hash"), ("table", "Table"), ("table_version", "Table version"),
               ("run_id", "Run"), ("adapter", "Adapter"))


def _provenance(results: dict) -> list[tuple[str, str]]:
    out = []
    for key, label in _PROVENANCE:
        v = results.get(key)
        if v not in (None, ""):
            out.append((label, str(v)))
    model = results.get("model")
    if isinstance(model, dict) and model.get("id"):
        rev = f"@{model['revision']}" if model.get("revision") else ""
        out.insert(0, ("Model", f"{model['id']}{rev}"))
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f}%"


def _pts(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:+.2f} pts"


def _lift_line(h: dict) -> str:
    text = _pts(h["lift"])
    if h["ci_low"] is not None and h["ci_high"] is not None:
        conf = f"{100.0 * h['confidence']:g}%"
        verdict = "excludes 0" if h["excludes_zero"] else "includes 0"
        text += f" ({conf} CI {_pts(h['ci_low'])} to {_pts(h['ci_high'])}; {verdict})"
    return text


def _safe_name(question_id: Any) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(question_id)).strip(".")
    return name or "question"


def _thumbnail(image: Any) -> bytes | None:
    """Encoded image bytes -> JPEG bytes with the longest side <= THUMB_SIZE (or None)."""
    if not image:
        return None
    try:
        with Image.open(io.BytesIO(bytes(image))) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (255, 255, 255))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                im = flat
            else:
                im = im.convert("RGB")
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
            return buf.getvalue()
    except Exception:  # unreadable image: the report still renders, without a thumbnail
        return None


def _answer_counts(answers: Any) -> list[tuple[str, int]]:
    if not answers:
        return []
    if isinstance(answers, str):
        answers = [answers]
    return Counter(str(a) for a in answers).most_common()


def _fmt_score(value: Any) -> str:
    v = _num(value)
    return "n/a" if v is None else f"{v:.2f}"


def _select(rows: list[dict], top_k: int, sample_size: int, seed: int):
    indexed = list(enumerate(rows))

    def delta(item):
        return _score(item[1], "tuned_score") - _score(item[1], "base_score")

    wins = [it for it in indexed if delta(it) > 0]
    wins.sort(key=lambda it: (-delta(it), it[0]))
    losses = [it for it in indexed if delta(it) < 0]
    losses.sort(key=lambda it: (delta(it), it[0]))
    k = min(sample_size, len(rows))
    picked = sorted(random.Random(seed).sample(range(len(rows)), k)) if k > 0 else []
    sample = [(i, rows[i]) for i in picked]
    return [
        ("Tuned wins", "tuned scores higher than base", wins[:top_k]),
        ("Tuned losses", "tuned scores lower than base", losses[:top_k]),
        (f"Random sample (seed {seed})", "uniform sample of all questions", sample),
    ]


# --- Markdown ----------------------------------------------------------------------------


def _md_cell(text: Any) -> str:
    text = html.escape("" if text is None else str(text))
    return text.replace("|", "&#124;").replace("\r", " ").replace("\n", " ")


def _md_pred(pred: Any, score: Any) -> str:
    shown = "*(no prediction)*" if pred is None else f"`{_md_cell(pred).replace('`', '&#96;')}`"
    return f"{shown} ({_fmt_score(score)})"


def _markdown(h: dict, sections, thumb_refs: dict[int, str | None]) -> str:
    out = [
        "# Evaluation report",
        "",
        f"- **Metric:** {_md_cell(h['metric'])}",
        f"- **n:** {h['n']}",
        f"- **Base accuracy:** {_pct(h['base'])}",
        f"- **Tuned accuracy:** {_pct(h['tuned'])}",
        f"- **Lift:** {_lift_line(h)}",
    ]
    if h["p_value"] is not None:
        out.append(f"- **Bootstrap p-value (one-sided, lift <= 0):** {h['p_value']:.4f}")
    out += [f"- **{label}:** `{_md_cell(v).replace('`', '&#96;')}`" for label, v in h["provenance"]]
    for title, blurb, items in sections:
        out += ["", f"## {title}", "", f"_{blurb}; {len(items)} shown._", ""]
        if not items:
            out.append("_none_")
            continue
        out.append("| image | question | answers | base | tuned |")
        out.append("| --- | --- | --- | --- | --- |")
        for idx, row in items:
            ref = thumb_refs.get(idx)
            qid = _md_cell(row.get("question_id"))
            img = f"![{qid}]({ref})" if ref else "*(no image)*"
            question = f"**{qid}**: {_md_cell(row.get('question'))}"
            answers = ", ".join(
                f"{_md_cell(a)} ×{c}" for a, c in _answer_counts(row.get("answers"))
            )
            out.append(
                f"| {img} | {question} | {answers} | "
                f"{_md_pred(row.get('base'), row.get('base_score'))} | "
                f"{_md_pred(row.get('tuned'), row.get('tuned_score'))} |"
            )
    out.append("")
    return "\n".join(out)


# --- HTML --------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 6px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.img { width: 170px; }
.win { color: #176f2c; } .loss { color: #a61b1b; }
code { background: #f6f6f6; padding: 0 3px; }
dl.summary dt { font-weight: bold; float: left; clear: left; width: 12em; }
dl.summary dd { margin-left: 12em; margin-bottom: 4px; }
"""


def _h(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _html_pred(pred: Any, score: Any) -> str:
    shown = "<em>(no prediction)</em>" if pred is None else f"<code>{_h(pred)}</code>"
    return f"{shown}<br>score {_fmt_score(score)}"


def _html(h: dict, sections, thumbs: dict[int, bytes | None]) -> str:
    lift_cls = ""
    if h["excludes_zero"]:
        lift_cls = ' class="win"' if (h["lift"] or 0) > 0 else ' class="loss"'
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Evaluation report</h1>",
        '<dl class="summary">',
        f"<dt>Metric</dt><dd>{_h(h['metric'])}</dd>",
        f"<dt>n</dt><dd>{h['n']}</dd>",
        f"<dt>Base accuracy</dt><dd>{_pct(h['base'])}</dd>",
        f"<dt>Tuned accuracy</dt><dd>{_pct(h['tuned'])}</dd>",
        f"<dt>Lift</dt><dd{lift_cls}>{_h(_lift_line(h))}</dd>",
    ]
    if h["p_value"] is not None:
        out.append(f"<dt>p-value</dt><dd>{h['p_value']:.4f} (one-sided, lift &lt;= 0)</dd>")
    out += [f"<dt>{_h(label)}</dt><dd><code>{_h(v)}</code></dd>" for label, v in h["provenance"]]
    out.append("</dl>")
    for title, blurb, items in sections:
        out.append(f"<h2>{_h(title)}</h2><p><em>{_h(blurb)}; {len(items)} shown.</em></p>")
        if not items:
            out.append("<p><em>none</em></p>")
            continue
        out.append(
            "<table><thead><tr><th>image</th><th>question</th><th>answers</th>"
            "<th>base</th><th>tuned</th></tr></thead><tbody>"
        )
        for idx, row in items:
            jpeg = thumbs.get(idx)
            if jpeg:
                uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
                img = f'<img src="{uri}" alt="{_h(row.get("question_id"))}">'
            else:
                img = "<em>(no image)</em>"
            answers = "<br>".join(
                f"{_h(a)} &times;{c}" for a, c in _answer_counts(row.get("answers"))
            )
            delta = _score(row, "tuned_score") - _score(row, "base_score")
            cls = "win" if delta > 0 else "loss" if delta < 0 else ""
            out.append(
                f'<tr class="{cls}"><td class="img">{img}</td>'
                f"<td><strong>{_h(row.get('question_id'))}</strong><br>"
                f"{_h(row.get('question'))}</td>"
                f"<td>{answers}</td>"
                f"<td>{_html_pred(row.get('base'), row.get('base_score'))}</td>"
                f"<td>{_html_pred(row.get('tuned'), row.get('tuned_score'))}</td></tr>"
            )
        out.append("</tbody></table>")
    out.append("</body></html>\n")
    return "\n".join(out)


# --- entry point -------------------------------------------------------------------------


def write_report(
    results: dict,
    rows: list[dict],
    out_dir: Path,
    *,
    top_k: int = 10,
    sample_size: int = 10,
    seed: int = 0,
) -> dict[str, Path]:
    """Write results.json, report.md (+ thumbs/) and report.html into ``out_dir``.

    Returns ``{"results": ..., "markdown": ..., "html": ..., "thumbs": <dir>}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs_dir = out_dir / "thumbs"
    rows = list(rows)

    results_path = out_dir / "results.json"
    results_path.write_text(
        json.dumps(results, indent=2, sort_keys=True, default=_json_default, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )

    header = _header(results, rows)
    sections = _select(rows, top_k, sample_size, seed)

    # One thumbnail per row shown anywhere (a row may appear in several tables).
    shown = sorted({idx for _, _, items in sections for idx, _ in items})
    thumbs: dict[int, bytes | None] = {idx: _thumbnail(rows[idx].get("image")) for idx in shown}
    thumb_refs: dict[int, str | None] = {}
    used_names: dict[str, int] = {}
    for idx in shown:
        jpeg = thumbs[idx]
        if not jpeg:
            thumb_refs[idx] = None
            continue
        name = _safe_name(rows[idx].get("question_id"))
        if used_names.setdefault(name, idx) != idx:  # two rows share a question_id
            name = f"{name}_{idx}"
        thumbs_dir.mkdir(parents=True, exist_ok=True)
        (thumbs_dir / f"{name}.jpg").write_bytes(jpeg)
        thumb_refs[idx] = f"thumbs/{name}.jpg"

    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(header, sections, thumb_refs), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(_html(header, sections, thumbs), encoding="utf-8")

    return {"results": results_path, "markdown": md_path, "html": html_path, "thumbs": thumbs_dir}
