"""Resumable training state: seeds, RNG snapshots and the atomic checkpoint a killed run resumes
from (adapter, optimizer, scheduler, RNG, loader position), plus the finished-run check that keeps
an adapter already saved under the same fingerprint from being trained again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["finished_run", "load_checkpoint", "save_checkpoint", "seed_all", "set_rng_state"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(ckpt: Path, model, opt, sched, state: dict[str, Any]) -> None:
    from peft import get_peft_model_state_dict

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), **state}, tmp / "state.pt")
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)  # the checkpoint appears whole or not at all
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint's state if it was saved under `fingerprint` (another run's is ignored)."""
    f = ckpt / "state.pt"
    if not f.exists():
        return None
    state = torch.load(f, map_location="cpu", weights_only=False)
    return state if state.get("fingerprint") == fingerprint else None


def finished_run(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The result of a run that already saved its adapter under `fingerprint` (e.g. killed after
    saving, before apply recorded the step), or None."""
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if m.get("train_fingerprint") != fingerprint or not (out / "adapter" / "adapter_config.json").exists():
        return None
    return {"table_version": m["table_version"], "rows": m["rows"], "steps": m["steps"],
            "final_loss": m["final_loss"], "adapter": str(out / "adapter"), "seconds": m["seconds"],
            "devices": m.get("devices", 1)}
