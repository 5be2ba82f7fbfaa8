"""A faster Qwen2.5-VL vision tower for batches whose attention chunks all have one length.

HF's tower (transformers 5.x, SDPA) runs its attention one chunk at a time: 25 windows per 560-px
image in the window layers, one call per image in the full-attention layers, so a batch of 64
images issues ~1,600 tiny SDPA calls per window layer and syncs the host every layer. When every
chunk has the same length (all images share one size that is a whole number of windows, which a
fixed `model.image_px` gives), the chunks are a reshape away from ONE batched SDPA call
`[chunks, heads, length, head_dim]`, with the same per-chunk arithmetic.

`FastTower(tower)` wraps an HF `Qwen2_5_VisionTransformerPretrainedModel` without touching
transformers globally:

* The first call for a batch layout (the tuple of `grid_thw` rows) records what HF computed for
  that layout: each block's call arguments (cu_seqlens, rotary cos/sin) and the window
  permutation of the patches. A batch of N equal images records ONE image with HF's forward and
  tiles it N times (checked once per tower against a real 2-image recording); any other batch
  runs HF's own forward unchanged and returns its output. Each layer's cu_seqlens is checked on
  the host: only layers whose chunks are all one length get the batched attention; any other
  layout keeps HF's per-chunk path (exactly HF).
* Later calls with that layout run patch-embed -> permute -> blocks -> merger -> un-permute with
  the recorded tensors: no per-call Python loops over windows, no host syncs, so the GPU queue
  stays full, and the blocks can be `torch.compile`d (`compile=True`, CUDA only; one compiled
  block is shared by all 32, see `compiled_block_runner`).

Only the wrapped tower's attention modules are patched (an instance attribute `forward`); a tower
that never goes through `FastTower` behaves exactly as before, since the patched forward defers to
HF's whenever no batched layout is active.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CUDA_SUB_BATCH", "FastTower", "Layout", "compiled_block_runner", "equal_chunks"]

_ATTR = "_vlmspec_chunks"


def equal_chunks(cu_seqlens: torch.Tensor, total: int) -> int | None:
    """The chunk count when `cu_seqlens` cuts `total` tokens into equal, non-empty chunks, else None."""
    cu = torch.as_tensor(cu_seqlens).detach().to("cpu", torch.long).flatten()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
        return None
    lengths = cu[1:] - cu[:-1]
    n = lengths.numel()
    if bool((lengths <= 0).any()) or bool((lengths != lengths[0]).any()) or total % n:
        return None
    return n


def _rotary(q, k, cos, sin):
    # HF's apply_rotary_pos_emb_vision (float32 rotation, cast back), looked up lazily so the
    # exact same function HF uses runs here.
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    return mq.apply_rotary_pos_emb_vision(q, k, cos, sin)


def _batched_attention(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor = None,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, *args, **kwargs):
    """Patched `Qwen2_5_VLVisionAttention.forward`: one SDPA call over `n` equal chunks."""
    n = getattr(self, _ATTR, None)
    if n is None or position_embeddings is None or args or (self.training and self.attention_dropout):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, *args, **kwargs)
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = _rotary(q, k, cos, sin)
    # [S, H, d] -> [n, H, S/n, d]: chunk i is tokens [i*S/n, (i+1)*S/n), as cu_seqlens says.
    q, k, v = (t.reshape(n, seq // n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq, -1))


@dataclass
class Layout:
    """What HF computed for one batch layout, replayed by the fast path."""

    key: tuple
    perm: torch.Tensor  # [S] patch order after HF's window permutation
    reverse: torch.Tensor  # [S / merge^2] merged-token order back to image order
    block_args: list[tuple[tuple, dict[str, Any]]]  # each block's positional (after x) and keyword args
    chunks: list[int | None]  # per block: equal-chunk count, or None (HF's per-chunk attention)

    @property
    def batched_layers(self) -> int:
        return sum(c is not None for c in self.chunks)


class _Stop(Exception):
    pass


def _run_block(blk, x, args, kwargs):
    return blk(x, *args, **kwargs)


_COMPILED: dict[str | None, Any] = {}


CUDA_SUB_BATCH = 16
"""Images per compiled tower call on CUDA, by default: the tier-3 column's sub-batch (decode
overlaps the tower) and the eval's, so both use the same compiled code and CUDA-graph layout."""


def compiled_block_runner(mode: str | None = None):
    """`torch.compile`d `blk(x, ...)`, one per process and mode ("regional" compilation): every
    block of every tower shares the compiled code (parameters are graph inputs), so compiling costs
    one block per (batch size, window/full kind), not the whole 32-block tower."""
    if mode not in _COMPILED:
        import torch._dynamo.config as dcfg

        for name in ("recompile_limit", "cache_size_limit"):  # several batch sizes x 2 layer kinds
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(int(getattr(dcfg, name)), 64))
        if hasattr(dcfg, "accumulated_recompile_limit"):
            dcfg.accumulated_recompile_limit = max(int(dcfg.accumulated_recompile_limit), 1024)
        _COMPILED[mode] = torch.compile(_run_block, dynamic=False, mode=mode)
    return _COMPILED[mode]


def _tile(one: Layout, n: int, key: tuple) -> Layout | None:
    """`one` (a single image's layout) for `n` such images side by side, or None when a block
    argument is of a kind whose tiling is not known."""
    seq, merged = int(one.perm.numel()), int(one.reverse.numel())
    block_args = []
    for args, kwargs in one.block_args:
        if args:
            return None
        kw: dict[str, Any] = {}
        for name, v in kwargs.items():
            if name == "cu_seqlens" and torch.is_tensor(v) and v.dim() == 1:
                kw[name] = torch.cat([v[:1]] + [v[1:] + i * v[-1] for i in range(n)])
            elif name == "position_embeddings" and isinstance(v, tuple) and all(
                    torch.is_tensor(t) and t.shape[0] == seq for t in v):
                kw[name] = tuple(t.repeat(n, *([1] * (t.dim() - 1))) for t in v)
            elif (torch.is_tensor(v) and v.dim() == 0) or isinstance(v, (bool, int, float, type(None))):
                kw[name] = v  # max_seqlen and flags: per chunk, the same for n images
            else:
                return None
        block_args.append(((), kw))
    return Layout(key, torch.cat([one.perm + i * seq for i in range(n)]),
                  torch.cat([one.reverse + i * merged for i in range(n)]), block_args,
                  [None if c is None else c * n for c in one.chunks])


def _same_layout(a: Layout, b: Layout) -> bool:
    def same(x, y) -> bool:
        if torch.is_tensor(x) or torch.is_tensor(y):
            return (torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and x.dtype == y.dtype
                    and torch.equal(x, y))
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return x == y

    return (a.chunks == b.chunks and same(a.perm, b.perm) and same(a.reverse, b.reverse)
            and same(a.block_args, b.block_args))


def _output(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_tensor(out):  # older transformers returned the merged states only
        return out, out
    return out.last_hidden_state, out.pooler_output


class FastTower:
    """Call like the HF tower: `FastTower(tower)(pixel_values, grid_thw)` -> object with
    `last_hidden_state` and `pooler_output` (merged tokens, image order), same as HF's.

    Args:
        tower: an HF Qwen2.5-VL vision tower (eval mode; never trained through this wrapper).
        compile: run the replayed forward through `torch.compile` (CUDA only; ignored on CPU).
        compile_sizes: compile only layouts of this many images (others run the eager fast
            path), so a short tail batch never triggers a recompile. None compiles every layout.
        graph: also capture each compiled layout's whole forward as one CUDA graph and replay it
            (one launch instead of ~600, so a host thread sharing the GIL with others still keeps
            the GPU fed). The returned tensors are then the graph's static outputs: the next call
            overwrites them, so consume them (any op queued on the stream) before calling again.
            A capture that fails warns once and runs the compiled path uncaptured.
    """

    def __init__(self, tower: torch.nn.Module, compile: bool = False, compile_sizes: set[int] | None = None,
                 compile_mode: str | None = None, allow_cpu_compile: bool = False, graph: bool = False):
        self.tower = tower
        self.layouts: dict[tuple, Layout] = {}
        self.stats = {"hf_calls": 0, "fast_calls": 0, "compiled_calls": 0, "graph_calls": 0}
        for blk in tower.blocks:
            attn = blk.attn
            if not isinstance(attn.forward, types.MethodType) or attn.forward.__func__ is not _batched_attention:
                attn.forward = types.MethodType(_batched_attention, attn)
            setattr(attn, _ATTR, None)
        self.merge_unit = int(tower.spatial_merge_size) ** 2
        device = next(tower.parameters()).device
        self.compile = bool(compile) and (device.type == "cuda" or allow_cpu_compile)
        self.compile_sizes = compile_sizes
        self._block = compiled_block_runner(compile_mode) if self.compile else None
        self.graph = bool(graph) and self.compile and device.type == "cuda"
        self._graphs: dict[tuple, tuple] = {}  # layout key -> (static input, graph, last, merged)
        self._tiling_ok: bool | None = None  # does N images' layout tile one image's? (checked once)

    # -- layout capture -----------------------------------------------------------------------

    def _set_chunks(self, chunks: list[int | None] | None) -> None:
        for i, blk in enumerate(self.tower.blocks):
            setattr(blk.attn, _ATTR, None if chunks is None else chunks[i])

    def _hf_and_capture(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, key: tuple):
        """HF's forward (its output is returned as is) plus the recorded per-block arguments."""
        tower = self.tower
        calls: dict[int, tuple[tuple, dict[str, Any]]] = {}
        hooks = []
        for i, blk in enumerate(tower.blocks):
            def pre(module, args, kwargs, i=i):
                calls[i] = (tuple(args[1:]), dict(kwargs))
            hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        self._set_chunks(None)
        try:
            out = tower(pixel_values, grid_thw=grid_thw)
        finally:
            for h in hooks:
                h.remove()
        perm = self._permutation(pixel_values, grid_thw)
        seq = int(perm.numel())
        chunks: list[int | None] = []
        for i in range(len(tower.blocks)):
            args, kwargs = calls[i]
            cu = kwargs.get("cu_seqlens", args[0] if args else None)
            ok = (cu is not None and kwargs.get("position_embeddings") is not None and not args)
            chunks.append(equal_chunks(cu, seq) if ok else None)
        merged_order = perm.reshape(-1, self.merge_unit)
        window_index = merged_order[:, 0] // self.merge_unit
        expect = window_index.unsqueeze(1) * self.merge_unit + torch.arange(self.merge_unit, device=perm.device)
        if not torch.equal(merged_order, expect) or not torch.equal(torch.sort(perm).values,
                                                                    torch.arange(seq, device=perm.device)):
            chunks = [None] * len(chunks)  # not a merge-group permutation: never replay
        layout = Layout(key, perm, torch.argsort(window_index), [calls[i] for i in range(len(tower.blocks))],
                        chunks)
        return out, layout

    def _tiled_layout(self, pixel_values: torch.Tensor, grid_cpu: torch.Tensor, key: tuple) -> Layout | None:
        """The layout of a batch of N equal images, built from one image's recording, or None.

        HF's tower treats images one after another: the window index, cu_seqlens and rotary
        tables are per image, offset by the images before. So N equal images' layout is one
        image's tiled N times (`_tile`), and recording it costs one small HF forward instead of
        one over the whole batch, whose window attention is one SDPA call per window per image
        (~2.4 s for 128 images of 560 px at the 3B shape, where the replay takes ~1.5 s). That
        rule is checked once per tower against a real 2-image recording; any difference, or a
        batch of unequal images, records the batch itself as before.
        """
        rows = key[0]
        if len(rows) < 2 or len(set(rows)) != 1:
            return None
        per = 1
        for v in rows[0]:
            per *= int(v)
        if pixel_values.shape[0] != per * len(rows):
            return None
        device = pixel_values.device
        one_key = (rows[:1],) + tuple(key[1:])
        one = self.layouts.get(one_key)
        if one is None:
            _, one = self._hf_and_capture(pixel_values[:per], grid_cpu[:1].to(device), one_key)
            self.layouts[one_key] = one
            self.stats["recorded_images"] = self.stats.get("recorded_images", 0) + 1
        if self._tiling_ok is None:
            two_key = (rows[:2],) + tuple(key[1:])
            _, two = self._hf_and_capture(pixel_values[:2 * per], grid_cpu[:2].to(device), two_key)
            self.stats["recorded_images"] = self.stats.get("recorded_images", 0) + 2
            tiled = _tile(one, 2, two_key)
            self._tiling_ok = tiled is not None and _same_layout(tiled, two)
            if not self._tiling_ok:
                import warnings

                warnings.warn("vision tower: a 2-image layout is not one image's tiled; recording every "
                              "batch layout with HF's forward (slower first calls, same results)")
        return _tile(one, len(rows), key) if self._tiling_ok else None

    def _permutation(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The patch order HF feeds block 0: run patch-embed with its output replaced by each
        patch's index (float32, exact below 2^24) and read what arrives at block 0."""
        tower = self.tower
        got: dict[str, torch.Tensor] = {}

        def embed_hook(module, args, output):
            seq = output.shape[0]
            return torch.arange(seq, device=output.device, dtype=torch.float32).unsqueeze(1)

        def block_hook(module, args, kwargs):
            got["x"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        h1 = tower.patch_embed.register_forward_hook(embed_hook)
        h2 = tower.blocks[0].register_forward_pre_hook(block_hook, with_kwargs=True)
        try:
            tower(pixel_values, grid_thw=grid_thw)
        except _Stop:
            pass
        finally:
            h1.remove()
            h2.remove()
        return got["x"].reshape(-1).round().long()

    # -- replay -------------------------------------------------------------------------------

    def _replay(self, pixel_values: torch.Tensor, perm: torch.Tensor, reverse: torch.Tensor,
                block_args: list[tuple[tuple, dict[str, Any]]], run_block=None):
        tower = self.tower
        x = tower.patch_embed(pixel_values)
        x = x[perm]
        for blk, (args, kwargs) in zip(tower.blocks, block_args):
            x = blk(x, *args, **kwargs) if run_block is None else run_block(blk, x, args, kwargs)
        merged = tower.merger(x)
        return x, merged[reverse]

    def _captured(self, pixel_values: torch.Tensor, layout: Layout, run_block) -> tuple | None:
        """The layout's forward captured as a CUDA graph (warmed on a side stream first, as CUDA
        graph capture requires), or None when capturing fails."""
        import warnings

        static = pixel_values.clone()
        args = (layout.perm, layout.reverse, layout.block_args, run_block)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._replay(static, *args)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                last, merged = self._replay(static, *args)
        except Exception as e:  # noqa: BLE001 - the uncaptured compiled path computes the same
            warnings.warn(f"vision tower: CUDA graph capture failed ({type(e).__name__}: {e}); "
                          "running it uncaptured (set the column's `tuning: {graph: false}` to skip trying)")
            self.graph = False
            return None
        return static, g, last, merged

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        grid_cpu = torch.as_tensor(grid_thw)
        key = (tuple(tuple(int(v) for v in row) for row in grid_cpu.tolist()),
               pixel_values.dtype, str(pixel_values.device))
        layout = self.layouts.get(key)
        if layout is None:
            layout = self._tiled_layout(pixel_values, grid_cpu, key)
            if layout is not None:
                self.layouts[key] = layout
        if layout is None:
            self.stats["hf_calls"] += 1
            out, layout = self._hf_and_capture(pixel_values, grid_cpu.to(pixel_values.device), key)
            self.layouts[key] = layout
            last, merged = _output(out)
            return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=merged)
        if layout.batched_layers == 0:
            self.stats["hf_calls"] += 1
            self._set_chunks(None)
            last, merged = _output(self.tower(pixel_values, grid_thw=grid_cpu.to(pixel_values.device)))
            return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=merged)
        # The replay needs no grid on the device: copying it there (pageable memory) would block
        # the host until the GPU finished all queued work, every call, so the launching thread
        # could never run ahead of the GPU by more than one sub-batch.
        self._set_chunks(layout.chunks)
        try:
            run_block = None
            if self._block is not None and (self.compile_sizes is None or len(key[0]) in self.compile_sizes):
                run_block = self._block
                self.stats["compiled_calls"] += 1
            self.stats["fast_calls"] += 1
            captured = self._graphs.get(key)
            if captured is None and self.graph and run_block is not None:  # a failed capture clears self.graph
                captured = self._captured(pixel_values, layout, run_block)
                if captured is not None:
                    self._graphs[key] = captured
            if captured is not None:
                static, g, last, merged = captured
                static.copy_(pixel_values)
                g.replay()
                self.stats["graph_calls"] += 1
            else:
                last, merged = self._replay(pixel_values, layout.perm, layout.reverse, layout.block_args, run_block)
        finally:
            self._set_chunks(None)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=merged)
