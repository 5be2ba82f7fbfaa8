"""The reliability figures: extra Markdown for `chaos`, `fuzz` and `badrows` results, and the README
section `vlmspec bench reliability-report` writes between `<!-- reliability:start -->` and
`<!-- reliability:end -->`. Everything here is generated from the results JSON; nothing is measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"
SOURCES = ("chaos", "fuzz", "badrows")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    # a `|` or a newline inside a cell would break the Markdown table
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return out


def write(res, out: Path, extra: Callable[[dict[str, Any]], list[str]]) -> tuple[Path, Path]:
    """`Results.write`, then the benchmark's own tables appended to its Markdown."""
    js, md = res.write(out)
    # the extra tables come from the written JSON too, like the rest of the Markdown
    data = json.loads(js.read_text())
    md.write_text(md.read_text().rstrip("\n") + "\n\n" + "\n".join(extra(data)) + "\n")
    return js, md


# --- per-benchmark Markdown ---------------------------------------------------------------------

def chaos_markdown(data: dict[str, Any]) -> list[str]:
    rows = []
    for i, r in enumerate(data["details"]["trials"], 1):
        c = r.get("compare", {})
        rec = ", ".join(f"{k} {v}" for k, v in (r.get("recomputed") or {}).items()) or "none"
        eq = "yes" if c.get("raw_identical") and all((c.get("derived_equal") or {0: False}).values()) else "**no**"
        landed = "after the last step" if r["killed_in"] == "done" else r["killed_in"]
        rows.append([i, r["phase"], landed, f"{r['target_event']} +{r['delay_s']:.2f}s",
                     "yes" if r["killed"] else "finished first", rec, "yes" if r.get("bound_ok") else "**no**",
                     r["state_at_kill"].get("checkpoint_step") or "–", eq, c.get("rows", "–"),
                     "–" if c.get("adapter_max_abs_diff") is None else f"{c['adapter_max_abs_diff']:.3g}",
                     "yes" if r.get("survived") else "**no**"])
    return ["## Trials", "",
            *table(["#", "phase drawn", "killed in", "event + delay", "killed", "recomputed", "≤ 1 checkpoint",
                    "checkpoint step", "table equal", "rows", "adapter max abs diff", "survived"], rows)]


def fuzz_markdown(data: dict[str, Any]) -> list[str]:
    fams = data["details"]["families"]
    rows = [[f, c["cases"], c["loaded"], c["compiled"], c["vlmspec_errors"], c["other"]] for f, c in fams.items()]
    t = data["details"]["total"]
    rows.append(["**all**", t["cases"], t["loaded"], t["compiled"], t["vlmspec_errors"], t["other"]])
    out = ["## Cases by family", "",
           *table(["family", "cases", "loaded", "compiled", "VlmspecError", "other exceptions"], rows)]
    for f in data["details"]["failures"]:
        out += ["", f"- **{f['family']}**: `{f['error']}` on `{f['case'][:200]}`"]
    return out


def badrows_markdown(data: dict[str, Any]) -> list[str]:
    d = data["details"]
    cols = data["settings"]["columns"]
    rows = [[k, *(_cell(v["null"][c]) for c in cols), "yes" if v["as_expected"] else "**no**"]
            for k, v in d["kinds"].items()]
    fail = [[c, "yes" if f["raised"] else "**no**", f.get("names_row") or "–", d["first_bad_row"][c] or "–"]
            for c, f in d["fail"].items()]
    up = [[k, u.get("error", "–"), "yes" if u["refused_at_plan"] and u.get("located") else "**no**",
           u.get("message", "").split(": ", 1)[-1][:120]] for k, u in d["upfront"].items()]
    return ["## `on_error: null`, per kind and column", "", *table(["kind", *cols, "as expected"], rows), "",
            "## `on_error: fail`, one column at a time", "",
            *table(["column", "ApplyError", "names row", "first bad row"], fail), "",
            "## Refused at plan time", "", *table(["source", "error", "located", "message"], up)]


def _cell(outcome: str) -> str:
    """`row error: ValueError: row 0: not an image ...` -> `error: not an image ...` (shortened)."""
    if not outcome.startswith("row error"):
        return outcome
    text = outcome.split(": ", 1)[1]
    text = text.split(": ", 1)[1] if ": " in text else text  # the exception type
    text = text.removeprefix("row 0: ").removeprefix("cannot decode image: ").replace("`", "")
    return "error: " + (text if len(text) <= 60 else text[:57] + "...")


# --- the README section ---------------------------------------------------------------------------

def section(results: Path) -> str:
    # whichever results exist: each benchmark can be rerun on its own
    found = {n: json.loads((results / f"{n}.json").read_text()) for n in SOURCES if (results / f"{n}.json").exists()}
    lines = [START,
             f"Generated by `vlmspec bench reliability-report` from `{results}/"
             f"{{{','.join(SOURCES)}}}.json`; rerun `vlmspec bench chaos|fuzz|badrows` to refresh.", ""]
    rows = []
    if "chaos" in found:
        d, det = found["chaos"]["derived"], found["chaos"]["details"]
        killed = [r for r in det["trials"] if r["killed"]]
        worst = {}
        for r in killed:
            for s, n in (r.get("recomputed") or {}).items():
                worst[s] = max(worst.get(s, 0), n)
        rows += [["`vlmspec apply` killed (SIGKILL) at seeded points, then rerun",
                  f"{d['kills']['value']} of {len(killed)} kills survived (landed in ingest / tier-1,2 / tier-3 / "
                  f"train / after the last step: {d['phases']['value']})", "every kill"],
                 ["rows lost or doubled after the rerun", d["lost"]["value"], "0"],
                 ["kills that recomputed at most what was in flight (ingest: one commit; a column: two "
                  "fragments, the one being written and the one computed meanwhile; training: one checkpoint)",
                  f"{d['bound']['value']} of {len(killed)} (one commit or fragment = "
                  f"{found['chaos']['settings']['rows_per_fragment']} rows; training: "
                  f"{found['chaos']['settings']['checkpoint_every']} steps)", "every kill"],
                 ["training kills that resumed from the last checkpoint", f"{d['resumed']['value']} of "
                  f"{d['resumed']['target']}", "all"]]
    if "fuzz" in found:
        d = found["fuzz"]["derived"]
        rows += [["spec fuzz cases, load + compile", f"{d['cases']['value']:,}", ">= 5,000"],
                 ["exceptions other than `VlmspecError`", d["other"]["value"], "0"]]
    if "badrows" in found:
        d = found["badrows"]["derived"]
        rows += [["bad-row kinds tried (images, text, whole sources)", d["kinds"]["value"], ""],
                 ["kinds with the expected per-row outcome under `on_error: null`",
                  f"{d['null_ok']['value']} of {d['null_ok']['target']}", "all"],
                 ["columns where `on_error: fail` names the first bad row",
                  f"{d['fail_ok']['value']} of {d['fail_ok']['target']}", "all"],
                 ["whole-source problems refused at plan time with a located error",
                  f"{d['upfront']['value']} of {d['upfront']['target']}", "all"],
                 ["good rows lost or raw bytes changed", d["lost"]["value"], "0"]]
    lines += table(["guarantee", "measured", "target"], rows)
    if "badrows" in found:
        det = found["badrows"]["details"]
        cols = found["badrows"]["settings"]["columns"]
        lines += ["", "Bad rows under `on_error: null` (each row is null and listed by `vlmspec errors` where it "
                      "says error):", "",
                  *table(["kind", *cols], [[k, *(_cell(v["null"][c]).split(":")[0] for c in cols)]
                                           for k, v in det["kinds"].items()])]
        lines += ["", "`image.size` reads only the header, so a truncated JPEG keeps its size; images over "
                      "64 MP are refused before any pixel is decoded."]
    lines += ["", "Details: " + ", ".join(f"[{n}]({results}/{n}.md)" for n in found) + ". The guarantees "
              "without a figure are tests in `tests/test_runtime/test_reliability.py`: two applies started "
              "together (one refuses, naming the other's pid), a loader pinned to its table version while "
              "rows are appended, deleted and overwritten, `apply --plan` refusing a stale plan, a full disk "
              "or read-only table failing with a clear error and no half-written version, CUDA out-of-memory "
              "halving the batch, `plan`/`validate` importing no user module, thumbnails that cannot leave "
              "the report directory, and tokens that never reach a file.", END]
    return "\n".join(lines)


def update_readme(readme: Path, results: Path) -> str:
    """Rewrite the README between the markers (appending the section if they are missing)."""
    text = readme.read_text()
    new = section(results)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + new + tail
    else:  # no markers yet: a new section at the end
        text = text.rstrip("\n") + "\n\n## Reliability\n\n" + new + "\n"
    readme.write_text(text)
    return new
