"""What a training run is told, as one picklable value: `apply` builds a `TrainJob` from the plan's
`Train` step and hands it to the loop, and to every data-parallel rank, which therefore never load,
compile or plan the spec again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vlmspec.compiler.errors import ApplyError, Problem
from vlmspec.compiler.model import ModelSpec, TrainSpec

from .. import lance_io

__all__ = ["SliceRecord", "TrainJob", "output_dir"]


@dataclass(frozen=True)
class SliceRecord:
    """The slice the last `BuildSlice` stored (sidecar `steps.split|curate.detail.slice`)."""

    path: str
    """The small Lance table of row addresses (`split` = train | eval)."""
    table_version: int
    """The table version the slice's row addresses were chosen at."""
    train_rows: int = 0
    eval_rows: int = 0
    eval_uri: str | None = None
    """With `split.table`: the eval table (eval addresses refer to it, not to the source)."""
    eval_version: int | None = None

    @classmethod
    def of(cls, detail: Mapping[str, Any]) -> "SliceRecord":
        return cls(str(detail["path"]), int(detail["table_version"]), int(detail.get("train_rows", 0)),
                   int(detail.get("eval_rows", 0)), detail.get("eval_uri"),
                   int(detail["eval_version"]) if detail.get("eval_version") is not None else None)

    @classmethod
    def recorded(cls, table: str, *, need: str = "train") -> "SliceRecord":
        """The recorded slice of `table`; `need` names the step that wants it, for the error."""
        steps = lance_io.read_sidecar(table).get("steps", {})
        rec = steps.get("split") or (steps.get("curate") if need == "train" else None)
        if rec is None:
            if need == "eval":
                raise ApplyError(Problem("no held-out split recorded", "eval", fix="Add a `split:` section and apply"))
            raise ApplyError(Problem("no training slice recorded", "train",
                                     fix="Run `vlmspec apply` without --until/--target so curate and split run first"))
        return cls.of(rec["detail"]["slice"])


def output_dir(name: str, train: TrainSpec | None) -> Path:
    """Where a spec's adapter, checkpoints and logs go: `train.output_dir`, else `runs/<name>`."""
    return Path(train.output_dir if train is not None and train.output_dir else f"runs/{name}")


@dataclass(frozen=True)
class TrainJob:
    """Everything one training run reads: the spec's model and train sections, the slice, and the
    fingerprints it records. Frozen pydantic sections pickle, so the job crosses to spawned ranks."""

    spec_file: str
    spec_hash: str
    name: str
    table: str
    slice: SliceRecord
    model: ModelSpec
    train: TrainSpec
    fingerprint: str
    """The train step's fingerprint: a checkpoint or adapter made under another one is not reused."""
    columns: Mapping[str, str]
    """Fingerprints of the cached columns it reads (hiddens, tokens), for the manifest."""
    fresh: bool = False
    """Train from scratch: ignore an adapter or checkpoint saved under the same fingerprint
    (`apply --replace train`)."""
    fuse: int = 0
    """Micro-batches a pass, as the plan resolved `train.fuse_accum` (0: from the spec alone)."""

    @property
    def micro_per_pass(self) -> int:
        """Micro-batches run as one forward/backward (divides `grad_accum`)."""
        if self.fuse:
            return self.fuse
        return self.train.optim.grad_accum if self.train.fuse_accum is True else 1

    @property
    def out(self) -> Path:
        return output_dir(self.name, self.train)

    @classmethod
    def from_prepared(cls, prep: Any) -> "TrainJob":
        """The job for a prepared spec (`apply.prepare`): what `apply` builds from its Train step."""
        spec, node = prep.loaded.spec, prep.compiled.stage("train")
        tr = spec.train
        step = prep.plan.step("train")
        fuse = 0
        if step is not None and step.choice is not None:
            # `auto` as the plan resolved it for this device: the run does what the plan showed.
            tr = tr.model_copy(update={"gradient_checkpointing": step.choice.checkpointing,
                                       "compile": step.choice.compile})
            fuse = step.choice.fuse
        cols = {c: (prep.compiled.column(c).fingerprint if prep.compiled.column(c) else "")
                for c in (tr.hiddens, tr.tokens)}
        return cls(prep.loaded.file, prep.loaded.source_hash, spec.name, spec.source.table,
                   SliceRecord.recorded(spec.source.table), spec.model, tr, node.fingerprint, cols, fuse=fuse)
