"""The compile cache: a second process (or a machine that got only the mega-cache file) starts warm.

Runs real `torch.compile` on the CPU (inductor's C++ backend) in fresh subprocesses, so the only
thing a warm start can come from is what the first process left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_SCRIPT = r"""
import json, sys, torch
from vlmspec.runtime.vlm.compile_cache import Warmup

f = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T).sum(-1), dynamic=False)
with Warmup({"test": "gelu", "n": 8}) as w:
    f(torch.ones(8, 8))
print(json.dumps(w.stats))
"""


def _run(root, inductor_dir) -> dict:
    env = {**os.environ, "VLMSPEC_CACHE_DIR": str(root), "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir),
           "TRITON_CACHE_DIR": str(inductor_dir / "triton")}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_starts_warm_and_the_megacache_file_alone_is_enough(tmp_path):
    root = tmp_path / "cache"
    cold = _run(root, tmp_path / "inductor-a")
    assert cold["start"] == "cold" and cold["fxgraph_misses"] > 0
    files = list((root / "compile").glob("*.megacache"))
    assert len(files) == 1, "a cold start saves one mega-cache file for its key"

    warm = _run(root, tmp_path / "inductor-a")
    assert warm["start"] == "warm" and warm["fxgraph_hits"] > 0 and warm["fxgraph_misses"] == 0

    # A fresh machine: empty inductor/Triton caches, only the mega-cache file copied over.
    moved = tmp_path / "moved"
    (moved / "compile").mkdir(parents=True)
    shutil.copy(files[0], moved / "compile" / files[0].name)
    fresh = _run(moved, tmp_path / "inductor-b")
    assert fresh["megacache"] is True
    assert fresh["start"] == "warm" and fresh["fxgraph_misses"] == 0


def test_the_key_changes_with_the_configuration():
    from vlmspec.runtime.vlm.compile_cache import compile_key

    assert compile_key({"image_px": 560}) != compile_key({"image_px": 448})
    assert compile_key({"image_px": 560}) == compile_key({"image_px": 560})
