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
import torch._dynamo  # as transformers' import does: writes inductor's /tmp default into the environment
from vlmspec.runtime.vlm.compile_cache import Warmup

if "tf32" in sys.argv:  # a global setting in inductor's key, which dynamo's guards do not check
    torch.backends.cuda.matmul.fp32_precision = "tf32"

f = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T).sum(-1), dynamic=False)
with Warmup({"test": "gelu", "n": 8}) as w:
    f(torch.ones(8, 8))
print(json.dumps(w.stats))
"""


def _run(root, inductor_dir, *args: str, trace=None) -> dict:
    env = {**os.environ, "VLMSPEC_CACHE_DIR": str(root)}
    if trace is not None:
        env["VLMSPEC_COMPILE_TRACE"] = str(trace)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TRITON_CACHE_DIR", None)
    if inductor_dir is not None:  # the user's own folders
        env.update(TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), TRITON_CACHE_DIR=str(inductor_dir / "triton"))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, *args], env=env, capture_output=True, text=True, timeout=600)
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


def test_without_the_users_folders_inductors_cache_lands_in_vlmspecs(tmp_path):
    """Not in /tmp, where torch's import pointed it: a reboot or a new container would wipe it."""
    root = tmp_path / "cache"
    cold = _run(root, None)
    assert cold["start"] == "cold"
    assert any((root / "compile" / "inductor").rglob("*")), "inductor wrote its cache under VLMSPEC_CACHE_DIR"
    assert _run(root, None)["start"] == "warm"


def test_a_users_folders_win_and_torchs_own_default_does_not_count_as_chosen(tmp_path, monkeypatch):
    import torch._dynamo  # noqa: F401 - writes torch's default into the environment, as in an apply
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from vlmspec.runtime.vlm.compile_cache import _point_caches

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("TRITON_CACHE_DIR", os.path.join(default_cache_dir(), "triton", "0"))
    _point_caches(tmp_path / "ours")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ours" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "ours" / "triton")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.delenv("TRITON_CACHE_DIR")
    _point_caches(tmp_path / "ours")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "ours" / "triton")


def test_a_trace_folder_gets_the_cache_key_details_of_each_warm_up(tmp_path, monkeypatch):
    import torch

    from vlmspec.runtime.vlm.compile_cache import TRACE_ENV, Warmup

    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    f = torch.compile(lambda x: (x * 3).sum(), dynamic=False)
    with Warmup({"test": "trace"}, root=tmp_path / "cache") as w:
        f(torch.ones(4))
    logs = list((tmp_path / "trace").glob(f"{w.stats['key']}-*.log"))
    assert len(logs) == 1 and "FX graph cache hash details" in logs[0].read_text()


def test_the_trace_diff_names_the_global_setting_that_made_a_second_process_miss(tmp_path):
    """The tool for a cross-process miss (`profiles/compile_trace_diff.py`) on a real one: the
    second process sets TF32 matmuls, which inductor hashes into every key."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "examples" / "benchmarks" / "profiles" / "compile_trace_diff.py"
    spec = importlib.util.spec_from_file_location("compile_trace_diff", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    root = tmp_path / "cache"
    assert _run(root, None, trace=tmp_path / "a")["start"] == "cold"
    assert _run(root, None, "tf32", trace=tmp_path / "b")["fxgraph_misses"] > 0
    (first,), (second,) = (list((tmp_path / x).glob("*.log")) for x in "ab")
    out = "\n".join(mod.diff(mod.graphs(first), mod.graphs(second)))
    assert "keys in both: 0" in out
    changed = [ln for ln in out.splitlines() if ln.startswith(("  second+", "  first+"))]
    assert changed and all("cuda_matmul_settings" in ln for ln in changed), out
