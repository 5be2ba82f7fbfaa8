"""`train.compile: graph`: the replayed CUDA graph computes what the eager step computes.

CUDA graphs exist only on CUDA, so the capture test runs on the GPU machine (CI has no GPU); the
eager fallback (a batch needing more label slots than the graph has) runs everywhere.
"""

import pytest
import torch

from vlmspec.compiler.model import ModelSpec
from vlmspec.runtime.vlm import cached, models
from vlmspec.runtime.vlm.graph_step import GraphedStep

TINY = "vlmspec:tiny-qwen2.5-vl"
SIDE = 4  # 112 px -> 4 x 4 merged tokens


def _model(device: str):
    from peft import LoraConfig, get_peft_model

    base = models.load_language_model(ModelSpec(id=TINY, image_px=112), device=device, dtype="float32")
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    pm.train()
    return pm


def _batch(pm, b: int, seed: int, answer: int, device: str):
    g = torch.Generator().manual_seed(seed)
    cfg = cached.unwrap(pm).config
    L, t = 64, SIDE * SIDE
    ids = torch.randint(10, 1000, (b, L), generator=g)
    ids[:, 3:3 + t] = cfg.image_token_id
    mask = torch.ones_like(ids)
    mask[:, L - 8:] = 0  # right padding
    labels = torch.full_like(ids, -100)
    labels[:, L - 8 - answer:L - 8] = ids[:, L - 8 - answer:L - 8]
    si = cached.step_inputs(ids, mask, labels, cfg.image_token_id, t, (SIDE, SIDE), min_slots=32)
    h = torch.randn(b, t, cfg.text_config.hidden_size, generator=g)
    move = lambda x: x.to(device)  # noqa: E731
    return move(ids), move(mask), move(h), si.map(move)


def _grads(pm):
    return [p.grad.detach().clone() for p in pm.parameters() if p.requires_grad]


def test_label_slots_overflow_runs_eagerly():
    pm = _model("cpu")
    gs = GraphedStep(pm, label_slots=32)
    ids, mask, h, si = _batch(pm, 2, 0, answer=40, device="cpu")  # 40 labels > 32 slots
    assert si.label_index.shape[1] == 40 and not gs.fits(ids, mask, h, si)
    loss = gs(ids, mask, h, si, 0.5)
    assert gs.eager_steps == 1 and gs.graph is None and torch.isfinite(loss)
    assert all(g is not None for g in _grads(pm))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the GPU machine)")
def test_graph_replay_equals_eager_step():
    torch.manual_seed(0)
    pm = _model("cuda")
    batches = [_batch(pm, 2, s, answer=5 + s, device="cuda") for s in range(3)]
    gs = GraphedStep(pm)
    for p in pm.parameters():
        p.grad = None
    for i, (ids, mask, h, si) in enumerate(batches):  # accumulate three micro-batches, scales differ
        got_loss = gs(ids, mask, h, si, 0.25 * (i + 1)).item()
        want_loss = cached.cached_loss(pm, ids, mask, h, si).item()
        assert abs(got_loss - want_loss) <= 1e-5, (got_loss, want_loss)
    got = _grads(pm)
    for p in pm.parameters():
        p.grad = None
    for i, (ids, mask, h, si) in enumerate(batches):
        (cached.cached_loss(pm, ids, mask, h, si) * (0.25 * (i + 1))).backward()
    want = _grads(pm)
    assert gs.replays == 3 and gs.eager_steps == 0
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
