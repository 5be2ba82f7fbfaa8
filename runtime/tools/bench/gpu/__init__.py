"""`vlmspec bench gpu`: the vision tower, the LoRA/QLoRA train step and tier-3 backfill on a GPU,
at the real Qwen2.5-VL-3B-Instruct shape (built from its config with random weights: exact for
speed and memory, meaningless for accuracy).

Phases, one module each (each writes `gpu_<phase>.json` + `.md`; one device call can run several):

* `equivalence.py`: bf16 checks: `FastTower` vs HF's tower, our cached path vs the full model.
* `tower.py`: images/s of HF's tower, `FastTower` and `FastTower` + torch.compile.
* `trainstep.py`: LoRA train step samples/s and peak memory, cached and raw paths, eager and compiled.
* `qlora.py`: 4-bit NF4 QLoRA r=16 with gradient checkpointing at batch 2 (needs bitsandbytes).
* `tier3.py`: tier-3 backfill rows/s through vlmspec's engine vs the bare tower, GPU busy % (needs pylance).

`_common.py` holds what they share (shapes, model builders, timing, results); `driver.py` runs them.
`--shape tiny` runs every phase at a toy shape (on the CPU too): it is how this package is tested.
"""

from ._common import (NLAB, PHASES, SHAPES, GpuBusy, GpuResults, Phase, build_model, build_tower, grid_of,
                      measure, pixels, pooled, qwen_config, rel_l2, text_batch)
from .driver import TITLES, run

__all__ = ["NLAB", "PHASES", "SHAPES", "TITLES", "GpuBusy", "GpuResults", "Phase", "build_model", "build_tower",
           "grid_of", "measure", "pixels", "pooled", "qwen_config", "rel_l2", "run", "text_batch"]
