"""torch.compile artefacts kept on disk across processes, so only the first apply pays the compile.

A compiled tower costs its first call ~20 s on an H200 (dynamo trace, inductor codegen, Triton
autotune and build, CUDA-graph capture), and every `vlmspec apply` is a new process. Two layers
keep that work:

* inductor's and Triton's own on-disk caches, pointed at vlmspec's cache folder instead of
  `/tmp` (which containers and reboots wipe). Their entries are keyed by inductor itself (graph,
  torch and Triton versions, device, config), so a stale hit is not possible;
* one "mega-cache" file per tower configuration (`torch.compiler.save_cache_artifacts`), which
  bundles those artefacts into one portable file: a Ray worker on another node, or a fresh GPU
  machine that got the folder, starts warm too. Its name hashes everything that changes the
  compiled code: torch and Triton versions, the GPU, the model, dtype, image size, batch sizes,
  compile mode and graph capture.

Dynamo's trace and the CUDA-graph capture are not cacheable; they are the few seconds a warm start
still pays. `Warmup.stats` says which it was, for the run record and `vlmspec bench apply`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Warmup", "cache_root", "cached", "compile_key", "tower_parts", "warmed_here"]


def cache_root() -> Path:
    """`$VLMSPEC_CACHE_DIR/compile`, else the XDG cache (`~/.cache/vlmspec/compile`)."""
    base = os.environ.get("VLMSPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlmspec")
    return Path(base) / "compile"


def compile_key(parts: dict[str, Any]) -> str:
    """A short hash of the configuration plus the toolchain the compiled code depends on."""
    import torch

    full = {"torch": torch.__version__, **parts}
    try:
        import triton

        full["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        full["gpu"] = torch.cuda.get_device_name()
        full["capability"] = list(torch.cuda.get_device_capability())
    blob = json.dumps(full, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


TRACE_ENV = "VLMSPEC_COMPILE_TRACE"
"""A folder: each warm-up writes there what inductor hashed into each graph's cache key
(`torch._inductor.codecache`'s debug lines), one file per process and key, so two processes'
keys can be diffed when one misses the other's cache. A diagnostic; unset, nothing is written."""


class _Trace:
    """Inductor's cache-key debug lines into a file while a `Warmup` block runs (`TRACE_ENV`)."""

    def __init__(self, path: Path):
        import logging

        self.logger = logging.getLogger("torch._inductor.codecache")
        self.saved = (self.logger.level, self.logger.propagate)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(path)
        self.handler.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False  # the debug lines are long: the file only, not the terminal

    @classmethod
    def start(cls, key: str) -> "_Trace | None":
        folder = os.environ.get(TRACE_ENV)
        return cls(Path(folder) / f"{key}-{os.getpid()}-{time.time_ns()}.log") if folder else None

    def stop(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


_WARMED: set[str] = set()
"""Keys (`compile_key`) of the configurations this process has warmed up (a `Warmup` block that
ended without an error): their compiled code is loaded here, so compiling the same again is free."""


def warmed_here(parts: dict[str, Any]) -> bool:
    """Whether this process has warmed up this configuration (see `_WARMED`)."""
    return compile_key(parts) in _WARMED


def cached(parts: dict[str, Any]) -> bool:
    """Whether this configuration's mega-cache file is on disk (a process that warms it up then
    starts warm: `Warmup` loads it)."""
    return Warmup(parts).path.exists()


def tower_parts(tower, dtype, image_px: int, sizes: set[int], compile: bool, graph: bool) -> dict[str, Any]:
    """What changes a vision tower's compiled code (the mega-cache's key, with the toolchain). The
    tier-3 column and the eval's tower name it alike, so whichever compiled first warms the other."""
    return {"udf": "vlm.vision_tower", "tower": tower.config.to_json_string(use_diff=False), "dtype": str(dtype),
            "image_px": image_px, "sizes": sorted(sizes), "compile": compile, "graph": graph}


def _point_caches(root: Path) -> None:
    """Inductor's and Triton's caches into `root`, unless the user chose their folders.

    Not `os.environ.setdefault`: by now `torch._dynamo`'s import has written inductor's default
    (`/tmp/torchinductor_<user>`, which containers and reboots wipe) into the environment, and a
    setdefault kept it. So a variable holding torch's own default counts as unchosen (a user who
    wants /tmp can name any other folder there). Inductor and Triton read these variables on each
    use, so pointing them now covers every later compile."""
    torch_dir = _torch_default()
    for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        now = os.environ.get(name)
        if now is None or _within(now, torch_dir):
            os.environ[name] = str(root / sub)


def _torch_default() -> str | None:
    """The folder torch writes into `TORCHINDUCTOR_CACHE_DIR` when nobody chose one (Triton's
    default is `<it>/triton/<device>`), or None where this torch does not say."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def _within(path: str, folder: str | None) -> bool:
    if folder is None:
        return False
    path = os.path.abspath(path)
    return path == folder or path.startswith(folder + os.sep)


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    ind = counters["inductor"]
    return {k: int(ind.get(k, 0)) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}


@dataclass
class Warmup:
    """`with Warmup(parts) as w: <first compiled calls>`: loads the mega-cache before, saves it after
    a cold start, and times the block. `w.stats`: seconds, "warm"/"cold", inductor hits/misses."""

    parts: dict[str, Any]
    root: Path = field(default_factory=cache_root)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / f"{compile_key(self.parts)}.megacache"

    def __enter__(self) -> "Warmup":
        import torch

        _point_caches(self.root)
        self._loaded = False
        if self.path.exists():
            try:
                self._loaded = torch.compiler.load_cache_artifacts(self.path.read_bytes()) is not None
            except Exception:  # noqa: BLE001 - a corrupt or foreign file only costs a cold start
                self._loaded = False
        self._before = _counters()
        self._trace = _Trace.start(compile_key(self.parts))
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        seconds = time.perf_counter() - self._t0
        if self._trace is not None:
            self._trace.stop()
        after = _counters()
        hits = after["fxgraph_cache_hit"] - self._before["fxgraph_cache_hit"]
        misses = after["fxgraph_cache_miss"] - self._before["fxgraph_cache_miss"]
        self.stats = {"seconds": round(seconds, 2), "start": "warm" if hits and not misses else "cold",
                      "fxgraph_hits": hits, "fxgraph_misses": misses, "megacache": self._loaded,
                      "key": compile_key(self.parts)}
        if exc_type is None:
            _WARMED.add(self.stats["key"])
            if misses:
                self._save()

    def _save(self) -> None:
        import torch

        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception:  # noqa: BLE001 - nothing to bundle (or an old torch): the local caches still hold it
            return
        if not saved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(saved[0])
        os.replace(tmp, self.path)  # atomic: a concurrent worker reads the old file or the new one
