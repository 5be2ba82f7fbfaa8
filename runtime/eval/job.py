"""What an evaluation is told, as one value `apply` builds from the plan's `Evaluate` step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmspec.compiler.model import EvalSpec, ModelSpec, QuantSpec

from ..train.job import SliceRecord, output_dir

__all__ = ["EvalJob", "eval_dir"]


def eval_dir(spec: Any) -> Path:
    """Where a spec's eval results go: `eval.output_dir`, else the train output dir's `eval/`."""
    ev = spec.eval
    return Path(ev.output_dir) if ev.output_dir else output_dir(spec.name, spec.train) / "eval"


@dataclass(frozen=True)
class EvalJob:
    """The held-out slice, the model (and the adapter `tuned` loads), the eval section, and where
    results go."""

    spec_hash: str
    table: str
    key: str
    """`source.key`: names each question in predictions and the report."""
    slice: SliceRecord
    model: ModelSpec
    eval: EvalSpec
    quant: QuantSpec | None
    """The training quantisation (4/8-bit), so `tuned` runs on the weights it was trained against."""
    adapter: str | None
    """The trained adapter directory (None without a train section)."""
    out: Path
    fingerprint: str = ""
    run_id: str = ""
    """The apply run that evaluates (`vlmspec log`), printed in the report's provenance."""

    @classmethod
    def from_prepared(cls, prep: Any, run_id: str = "") -> "EvalJob":
        spec = prep.loaded.spec
        ev, tr = spec.eval, spec.train
        train_out = output_dir(spec.name, tr) if tr is not None else None
        out = eval_dir(spec)
        quant = tr.quant if tr is not None and tr.quant.bits in (4, 8) else None
        node = prep.compiled.stage("eval")
        return cls(prep.loaded.source_hash, spec.source.table, spec.source.key,
                   SliceRecord.recorded(spec.source.table, need="eval"), spec.model, ev, quant,
                   str(train_out / "adapter") if train_out is not None else None, out,
                   node.fingerprint if node is not None else "", run_id)
