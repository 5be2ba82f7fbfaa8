"""How a training step will run, decided before it runs: its peak GPU memory estimated from the
model's config, and from that the `auto` choices of `train.gradient_checkpointing`,
`train.fuse_accum` and `train.compile`. Pure arithmetic on plain values; the runtime passes in the
device's memory.

The activation constants are calibrated on measured H200 peaks at the Qwen2.5-VL-3B shape
(`gpu_trainstep.json`, `gpu_qlora.json`: eager steps, sequence 512, 400 image tokens) and scale
with hidden size, layers, sequence length and batch; `vlmspec bench apply` checks the estimate
against the peak the real loop reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30

# Bytes kept for backward per token, per decoder layer, per unit of hidden size, without
# checkpointing: bf16 LoRA keeps the layer's bf16 activations; 4-bit QLoRA keeps more (peft casts
# norms to fp32, and bitsandbytes' backward keeps its own inputs). With checkpointing a layer keeps
# only its inputs (`CHECKPOINTED`) and one layer's activations exist at a time, during recompute.
ACTIVATION = {"bf16": 65.7, "4bit": 122.6}
CHECKPOINTED = 5.75
# Workspace beyond weights, adapters and activations (cuBLAS, the allocator's rounding, label logits).
OVERHEAD = {"bf16": 1.9 * GIB, "4bit": 0.63 * GIB}
FITS = 0.85
"""Share of the device's free memory an estimate may use before `auto` turns checkpointing on."""


@dataclass(frozen=True)
class TextShape:
    """The language model's shape, from its config (what the estimate needs)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def params(self) -> tuple[int, int]:
        """(decoder-layer linear weights, embeddings + head) parameter counts."""
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer, embed

    def lora_params(self, r: int, targets: list[str]) -> int:
        kv = self.kv_heads * self.head_dim
        io = {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
              "o_proj": (self.hidden, self.hidden), "gate_proj": (self.hidden, self.intermediate),
              "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}
        return self.layers * sum(r * (i + o) for t, (i, o) in io.items() if t in targets)


@dataclass(frozen=True)
class StepChoice:
    """What `auto` resolved to, and why (shown on the plan's train line)."""

    checkpointing: bool
    compile: str
    est_peak: int | None
    """Bytes of one pass, with the chosen checkpointing; None when the model's shape is unknown."""
    device_mem: int | None
    """Bytes free on the device the plan saw (None: no CUDA device, or not asked)."""
    fuse: int = 1
    """Micro-batches run as one pass (divides `grad_accum`)."""

    def describe(self, quant_bits: int, r: int, batch: int, accum: int = 1) -> str:
        kind = "QLoRA" if quant_bits == 4 else f"{quant_bits}-bit LoRA" if quant_bits == 8 else "LoRA"
        est = f"est. peak {self.est_peak / GIB:.0f} GiB" if self.est_peak is not None else "peak unknown"
        of = f" of {self.device_mem / GIB:.0f} GiB" if self.device_mem else ""
        mode = {"graph": "CUDA graph", "layers": "compiled layers", "none": "eager"}[self.compile]
        ckpt = "checkpointing" if self.checkpointing else "no checkpointing"
        geometry = f"bs{batch}" if accum == 1 else f"bs{batch}x{accum}"
        fused = f"; {self.fuse} micro-batches a pass ({batch * self.fuse} rows)" if self.fuse > 1 else ""
        return f"{kind} r{r} {geometry}: {est}{of}{fused}; {ckpt}; {mode}"


def estimate_peak(shape: TextShape, train: Any, seq: int, batch: int, checkpointing: bool) -> int:
    """Peak bytes of one eager training step on one device (`batch` rows of `seq` tokens)."""
    linear, embed = shape.params()
    four = train.quant.bits == 4
    if four:  # NF4: half a byte a weight plus its (double-quantised) constants; embeddings stay bf16
        weights = int(linear * 0.52) + embed * 2
    else:
        weights = (linear + embed) * (4 if train.quant.bits == 32 else 2)
    lora = shape.lora_params(train.lora.r, list(train.lora.targets)) * 16  # fp32 weight, grad, 2 Adam moments
    per_layer = ACTIVATION["4bit" if four else "bf16"] * shape.hidden * (2 if train.quant.bits == 32 else 1)
    tokens = batch * seq
    if checkpointing:
        acts = tokens * (shape.layers * CHECKPOINTED * shape.hidden + per_layer)
    else:
        acts = tokens * shape.layers * per_layer
    return int(weights + lora + acts + OVERHEAD["4bit" if four else "bf16"])


def choose(train: Any, shape: TextShape | None, seq: int, batch: int, *, cuda: bool | None,
           free: int | None) -> StepChoice:
    """Resolve `auto`: checkpoint only when the step would not fit the device's free memory, fuse
    as many micro-batches into one pass as fit beside that, and run the fastest mode known to
    capture for the configuration. Explicit settings win. `batch` is one device's micro-batch."""
    accum = train.optim.grad_accum
    fuse = accum if train.fuse_accum is True else 1  # `auto` starts unfused, then fuses what fits
    gc = train.gradient_checkpointing
    if gc == "auto":
        if shape is None or not free:
            gc = False  # nothing says it will not fit: the fast path
        else:
            gc = estimate_peak(shape, train, seq, batch * fuse, False) > FITS * free
    if train.fuse_accum == "auto" and cuda and shape is not None and free and not gc:
        # Measured: a QLoRA step of 2 rows costs about as much fixed time (dequantizing every 4-bit
        # weight, launching the step) as its rows' compute; fusing 4 such passes pays it once.
        fits = [d for d in range(accum, 0, -1)
                if accum % d == 0 and estimate_peak(shape, train, seq, batch * d, False) <= FITS * free]
        fuse = fits[0] if fits else 1
    rows = batch * fuse
    mode = train.compile
    if mode == "auto":
        if not cuda:
            mode = "none"  # compile and CUDA graphs only run on CUDA
        elif train.quant.bits in (4, 8):
            # Measured: QLoRA at batch 2 is bound by launching bitsandbytes' kernels; one CUDA graph
            # per micro-batch removes that. With checkpointing, capture is untried: eager.
            mode = "none" if gc else "graph"
        else:
            # bf16: the graph wins at small batches (launch-bound), compiled layers at large ones.
            mode = "graph" if rows <= 4 and not gc else "layers"
    est = estimate_peak(shape, train, seq, rows, bool(gc)) if shape is not None else None
    return StepChoice(bool(gc), mode, est, free, fuse)
