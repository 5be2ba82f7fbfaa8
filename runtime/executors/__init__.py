"""Where backfill chunks run. `runtime/backfill.py` owns the protocol (prepare the column, commit
each completed fragment, mark complete); an executor only places the chunks, as the plan's
`Placement` says, through one method:

    backfill(uri, ds, node, sink, *, model_spec, device, workers, place) -> field metadata

- `local` (`local.LocalExecutor`): this process, plus a spawn process pool for CPU UDFs.
- `ray` (`ray_exec.RayExecutor`): CPU UDFs as Ray tasks, model/GPU UDFs on Ray actors. Ray is an
  optional extra (`pip install 'vlmspec[ray]'`) and is imported only when a spec asks for it.
- `geneva` (`geneva_exec.GenevaExecutor`): each column handed to Geneva's backfill (on Ray), with our
  UDF code as the Geneva UDF. A proprietary optional extra (`pip install 'vlmspec[geneva]'`),
  imported only when a spec asks for it.
`chunks.py` is what they share: the unit of work and how one is computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def open_executor(spec: Any, workers: int | None = None, device: str | None = None) -> Iterator[Any]:
    """The executor for `spec.executor`, for the duration of one apply."""
    if spec is None or spec.kind == "local":
        from .local import local_session

        with local_session(workers or (spec.workers if spec is not None else None), device) as ex:
            yield ex
        return
    if spec.kind == "geneva":
        from .geneva_exec import geneva_session

        with geneva_session(spec.address, workers or spec.workers, device=device) as ex:
            yield ex
        return
    from .ray_exec import ray_session

    with ray_session(spec.address, workers or spec.workers, device=device) as ex:
        yield ex


def executor_facts(spec: Any, needs_gpus: bool) -> dict[str, Any]:
    """Facts about where the plan would run, passed into `build_plan` as data (the compiler imports
    no Ray): the CPU and GPU totals of the Ray cluster, or this machine's CUDA devices when a column
    asks for GPUs under the local executor."""
    if spec.kind == "ray":
        from .ray_exec import cluster_facts

        return cluster_facts(spec.address, needs_gpus=needs_gpus)
    if spec.kind == "geneva":
        from .geneva_exec import cluster_facts as geneva_facts

        return geneva_facts(spec.address, needs_gpus=needs_gpus)
    return {"gpus": local_gpus()} if needs_gpus else {}


def local_gpus() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # an unusable torch install reads as no GPU
        return 0
