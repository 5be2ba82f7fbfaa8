"""One training micro-batch (forward + backward) replayed as a CUDA graph (`train.compile: graph`).

At small batches the LoRA step is bound by the host: ~7,000 kernel launches per step at the 3B
shape, each a few microseconds of Python and driver time, while the GPU work is ~50 ms. Capturing
the step once and replaying it costs one launch. It needs what `cached_loss` already guarantees:
static shapes and no host syncs (positions and label slots come precomputed from the loader).

Capture follows PyTorch's recipe (warm up on a side stream, capture, then copy each batch into
the captured input tensors and replay). Gradients accumulate in place into the adapter's `.grad`
tensors, which therefore must never be set to None while a graph exists
(`optimizer.zero_grad(set_to_none=False)`); the optimizer step, clipping and the data-parallel
all-reduce stay outside the graph. A batch whose label count needs more slots than the graph has
runs eagerly (same arithmetic); shapes are otherwise fixed by the spec (batch size, max_tokens,
image tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from .cached import StepInputs, cached_loss

__all__ = ["GRAPH_LABEL_SLOTS", "CaptureError", "GraphedStep", "eager_step"]

GRAPH_LABEL_SLOTS = 32
"""Label slots per row of a graphed step: answers up to 31 tokens plus the end token (TextVQA's are
a few tokens); a micro-batch with a longer answer runs eagerly."""


class CaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph (something in it syncs or is not capturable)."""


def eager_step(model: Any, ids, mask, hiddens, inputs: StepInputs, scale: float) -> torch.Tensor:
    """The step without a graph: forward, `(loss * scale).backward()`; returns the loss."""
    loss = cached_loss(model, ids, mask, hiddens, inputs)
    (loss * scale).backward()
    return loss


class GraphedStep:
    """`step(ids, mask, hiddens, inputs, scale)` -> loss: forward and `(loss * scale).backward()`.

    Args:
        model: the PEFT-wrapped language model, on CUDA, in train mode.
        label_slots: label slots per row the graph is captured with (`cached.step_inputs(min_slots=)`).
        warmup: eager iterations on a side stream before capture (lets lazy inits happen outside).
    """

    def __init__(self, model: Any, label_slots: int = GRAPH_LABEL_SLOTS, warmup: int = 3):
        self.model, self.label_slots, self.warmup = model, int(label_slots), int(warmup)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Any] = {}
        self.key: tuple | None = None
        self.replays = 0
        self.eager_steps = 0

    def _key(self, ids, mask, hiddens, inputs: StepInputs) -> tuple:
        return (tuple(ids.shape), tuple(hiddens.shape), hiddens.dtype, tuple(inputs.label_index.shape),
                inputs.right_padded)

    def fits(self, ids, mask, hiddens, inputs: StepInputs) -> bool:
        return inputs.label_index.shape[1] == self.label_slots and (self.key is None or
                                                                     self._key(ids, mask, hiddens, inputs) == self.key)

    def _body(self) -> torch.Tensor:
        s = self.static
        loss = cached_loss(self.model, s["ids"], s["mask"], s["hiddens"], s["inputs"])
        (loss * s["scale"]).backward()
        return loss

    def _capture(self, ids, mask, hiddens, inputs: StepInputs) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.static = {
            "ids": ids.clone(), "mask": mask.clone(), "hiddens": hiddens.clone(),
            "inputs": inputs.map(lambda t: t.clone()),
            "scale": torch.zeros((), device=ids.device, dtype=torch.float32),
        }
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # scale 0: the warm-up adds nothing to the gradients
            for _ in range(self.warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        for p, g in zip(params, saved):  # grads now exist (captured backward accumulates into them)
            if g is None:
                p.grad.zero_()
            else:
                p.grad.copy_(g)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static["loss"] = self._body()
        self.graph = graph
        self.key = self._key(ids, mask, hiddens, inputs)

    def __call__(self, ids, mask, hiddens, inputs: StepInputs, scale: float) -> torch.Tensor:
        if not self.fits(ids, mask, hiddens, inputs):
            self.eager_steps += 1
            return eager_step(self.model, ids, mask, hiddens, inputs, scale)
        if self.graph is None:
            try:
                self._capture(ids, mask, hiddens, inputs)
            except RuntimeError as e:
                raise CaptureError(str(e)) from e
        s = self.static
        s["ids"].copy_(ids, non_blocking=True)
        s["mask"].copy_(mask, non_blocking=True)
        s["hiddens"].copy_(hiddens, non_blocking=True)
        si = s["inputs"]
        si.position_ids.copy_(inputs.position_ids, non_blocking=True)
        si.label_index.copy_(inputs.label_index, non_blocking=True)
        si.label_targets.copy_(inputs.label_targets, non_blocking=True)
        s["scale"].fill_(scale)
        self.graph.replay()
        self.replays += 1
        return s["loss"]
