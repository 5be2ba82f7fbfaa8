"""The training-memory estimate and the `auto` choices it drives (compiler/memory.py)."""

import pytest

from vlmspec.compiler.memory import GIB, TextShape, choose, estimate_peak
from vlmspec.compiler.model import TrainSpec

QWEN_3B = TextShape(2048, 36, 11008, 151936, 16, 2, True)


def _train(bits: int, **kw) -> TrainSpec:
    return TrainSpec(quant={"bits": bits}, optim={"steps": 10, "batch_size": 2}, **kw)


@pytest.mark.parametrize("bits, batch, ckpt, measured_gib", [
    (4, 2, True, 3.31), (4, 8, True, 5.21), (4, 16, True, 7.82), (4, 2, False, 11.29),  # gpu_qlora.json
    (16, 2, False, 12.40), (16, 8, False, 26.21), (16, 16, False, 44.69),            # gpu_trainstep.json (nosync)
])
def test_the_estimate_is_within_15_percent_of_the_measured_h200_peaks(bits, batch, ckpt, measured_gib):
    est = estimate_peak(QWEN_3B, _train(bits), 512, batch, ckpt) / GIB
    assert abs(est - measured_gib) / measured_gib < 0.15, est


def test_auto_checkpoints_only_when_the_step_would_not_fit():
    big = choose(_train(4), QWEN_3B, 512, 2, cuda=True, free=139 * GIB)
    assert (big.checkpointing, big.compile) == (False, "graph")
    assert big.describe(4, 16, 2) == "QLoRA r16 bs2: est. peak 11 GiB of 139 GiB; no checkpointing; CUDA graph"
    small = choose(_train(4), QWEN_3B, 512, 2, cuda=True, free=8 * GIB)
    assert (small.checkpointing, small.compile) == (True, "none")
    assert choose(_train(16), QWEN_3B, 512, 16, cuda=True, free=139 * GIB).compile == "layers"
    cpu = choose(_train(16), QWEN_3B, 512, 2, cuda=False, free=None)
    assert (cpu.checkpointing, cpu.compile) == (False, "none")


def test_auto_fuses_as_many_micro_batches_a_pass_as_fit():
    tr = TrainSpec(quant={"bits": 4}, optim={"steps": 10, "batch_size": 2, "grad_accum": 4})
    big = choose(tr, QWEN_3B, 512, 2, cuda=True, free=79 * GIB)
    assert (big.fuse, big.checkpointing, big.compile) == (4, False, "graph")
    assert big.est_peak == estimate_peak(QWEN_3B, tr, 512, 8, False)  # the estimate is of the pass run
    assert big.describe(4, 16, 2, 4) == ("QLoRA r16 bs2x4: est. peak 37 GiB of 79 GiB; 4 micro-batches a pass "
                                         "(8 rows); no checkpointing; CUDA graph")
    mid = choose(tr, QWEN_3B, 512, 2, cuda=True, free=30 * GIB)
    assert mid.fuse == 2 and mid.est_peak <= 0.85 * 30 * GIB < estimate_peak(QWEN_3B, tr, 512, 8, False)
    small = choose(tr, QWEN_3B, 512, 2, cuda=True, free=8 * GIB)
    assert (small.fuse, small.checkpointing) == (1, True)  # checkpointing first; no fusing beside it
    assert choose(tr, QWEN_3B, 512, 2, cuda=False, free=None).fuse == 1  # no device memory known
    odd = TrainSpec(quant={"bits": 4}, optim={"steps": 10, "batch_size": 2, "grad_accum": 3})
    assert choose(odd, QWEN_3B, 512, 2, cuda=True, free=50 * GIB).fuse in (1, 3)  # divisors only
    off = TrainSpec(quant={"bits": 4}, fuse_accum=False, optim={"steps": 10, "batch_size": 2, "grad_accum": 4})
    assert choose(off, QWEN_3B, 512, 2, cuda=True, free=79 * GIB).fuse == 1
    on = TrainSpec(quant={"bits": 4}, fuse_accum=True, optim={"steps": 10, "batch_size": 2, "grad_accum": 4})
    assert choose(on, QWEN_3B, 512, 2, cuda=False, free=None).fuse == 4


def test_explicit_settings_win():
    c = choose(_train(16, gradient_checkpointing=True, compile="none"), QWEN_3B, 512, 2, cuda=True, free=139 * GIB)
    assert (c.checkpointing, c.compile) == (True, "none")
