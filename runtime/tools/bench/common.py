"""What every benchmark shares: machine facts, timing with spread, and the JSON + Markdown writer.

A benchmark collects *figures* (one measured quantity, sampled over repeats: median, min, max and
every sample, plus the 1-minute load average before and after) and *derived* values (ratios and
targets computed from figure medians), then `Results.write` puts `<out>/<name>.json` and a
Markdown rendering of that same JSON in `<out>/<name>.md`. Nothing here is specific to one
benchmark.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_OUT = Path("examples/benchmarks/results")


def parse_ints(text: str) -> list[int]:
    """`"1000000,100000"` -> [1000000, 100000] (underscores allowed: `1_000_000`)."""
    out = [int(x.strip().replace("_", "")) for x in text.split(",") if x.strip()]
    if not out or any(v < 1 for v in out):
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return out


def load() -> float:
    """The 1-minute load average (other work on the machine skews timings; it is recorded)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Linux/macOS
        return -1.0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    try:
        # the cores this process may use: a container or taskset may allow fewer than exist
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "node": platform.node(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "ram_gib": _ram_gib(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def spread(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples), "samples": samples}


@dataclass
class Figure:
    """One measured quantity over repeats."""

    label: str
    unit: str
    samples: list[float] = field(default_factory=list)
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    higher_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, value: float, load_before: float, load_after: float) -> None:
        self.samples.append(value)
        self.load_before.append(load_before)
        self.load_after.append(load_after)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "unit": self.unit, "higher_is_better": self.higher_is_better,
                **spread(self.samples), "load_before": self.load_before, "load_after": self.load_after,
                **self.extra}


def timed(fn: Callable[[], Any]) -> tuple[float, Any, float, float]:
    """(seconds, result, load before, load after) of one call."""
    lb = load()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    return seconds, result, lb, load()


@dataclass
class Results:
    """Everything one benchmark run writes."""

    name: str
    title: str
    settings: dict[str, Any]
    figures: dict[str, Figure] = field(default_factory=dict)
    derived: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def figure(self, key: str, label: str, unit: str, *, higher_is_better: bool = False, **extra: Any) -> Figure:
        # an existing key is extended, not replaced: repeats and rounds add samples to one figure
        fig = self.figures.get(key)
        if fig is None:
            fig = self.figures[key] = Figure(label, unit, higher_is_better=higher_is_better, extra=dict(extra))
        return fig

    def derive(self, key: str, label: str, value: float | None, *, unit: str = "", target: str | None = None,
               met: bool | None = None, how: str = "") -> None:
        self.derived[key] = {"label": label, "value": value, "unit": unit, "target": target, "met": met,
                             "how": how}

    def to_dict(self) -> dict[str, Any]:
        from ...history import library_versions

        machine = machine_info()
        return {
            "benchmark": self.name,
            "title": self.title,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 2),
            "machine": machine,
            "libraries": library_versions(),
            "settings": self.settings,
            "figures": {k: f.to_dict() for k, f in self.figures.items()},
            "derived": self.derived,
            "details": self.details,
            "notes": self.notes,
        }

    def write(self, out: Path) -> tuple[Path, Path]:
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        js = out / f"{self.name}.json"
        md = out / f"{self.name}.md"
        js.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        # the Markdown is rendered from the JSON dict, never from live objects, so the two always agree
        md.write_text(render_markdown(data))
        return js, md


# --- Markdown, generated from the JSON only --------------------------------------------------

def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            # about three significant digits: the figures are noisier than that
            return f"{v:.3g}" if a < 10 else f"{v:.2f}".rstrip("0").rstrip(".")
        return f"{v:.3g}"
    return str(v)


def _seconds_unit(value: float, unit: str) -> tuple[float, str]:
    # sub-second timings read better in ms
    if unit == "s" and abs(value) < 1:
        return value * 1000, "ms"
    return value, unit


def render_markdown(data: dict[str, Any]) -> str:
    m, lib = data["machine"], data["libraries"]
    lines = [f"# {data['title']}", "",
             f"`vlmspec bench {data['benchmark']}` — {data['started']}, {data['seconds']} s in all. "
             "Generated from the JSON next to this file; rerun the command to refresh.", "",
             f"- Machine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), "
             f"{m['ram_gib']} GiB RAM"
             + (f"; GPU: {m['gpu']} ({m['gpu_memory_gib']} GiB)" if m.get("gpu") else "")
             + f"; {m['platform']}",
             f"- Load average at the end (1/5/15 min): {', '.join(str(x) for x in m['loadavg'])}",
             "- Libraries: " + ", ".join(f"{k} {v}" for k, v in lib.items()),
             "- Settings: " + ", ".join(f"`{k}={v}`" for k, v in data["settings"].items()), ""]
    if data["derived"]:
        lines += ["## Headline", "", "| | value | target | met | how |", "|---|---:|---|---|---|"]
        for d in data["derived"].values():
            val = "–" if d["value"] is None else f"{_num(d['value'])}{(' ' + d['unit']) if d['unit'] else ''}"
            lines.append(f"| {d['label']} | {val} | {d['target'] or ''} | "
                         f"{'' if d['met'] is None else ('yes' if d['met'] else '**no**')} | {d.get('how') or ''} |")
        lines.append("")
    lines += ["## Figures (spread over repeats)", "",
              "| figure | median | min | max | n | load 1-min (before→after) |", "|---|---:|---:|---:|---:|---|"]
    for f in data["figures"].values():
        med, unit = _seconds_unit(f["median"], f["unit"])
        lo, _ = _seconds_unit(f["min"], f["unit"])
        hi, _ = _seconds_unit(f["max"], f["unit"])
        lb, la = f["load_before"], f["load_after"]
        ld = f"{min(lb):.2f}–{max(lb):.2f} → {min(la):.2f}–{max(la):.2f}"
        lines.append(f"| {f['label']} | {_num(med)} {unit} | {_num(lo)} | {_num(hi)} | {f['n']} | {ld} |")
    lines.append("")
    if data["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(lines)
