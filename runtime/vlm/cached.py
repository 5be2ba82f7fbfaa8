"""The language model fed with cached vision-tower hiddens instead of pixels (training and checks).

Equivalence with the full model needs two things the reference pipeline skipped: the hiddens go
exactly into the `<|image_pad|>` slots (one image's worth per row, asserted), and positions are
Qwen2.5-VL's 3D M-RoPE ids from `get_rope_index`, not 1D text positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["CachedOutput", "StepInputs", "cached_forward", "cached_generate", "cached_loss", "image_grid",
           "mrope_positions", "rope_position_ids", "step_inputs", "unwrap"]

IGNORE_INDEX = -100


@dataclass
class CachedOutput:
    """Loss and logits of a cached forward.

    With labels, `logits` is [N, vocab] for the N label tokens only (row-major over the batch),
    `label_positions` the (row, position) of the token whose logits predict each label
    (position + 1 holds the label), and `targets` the N label ids. Without labels, `logits` is
    [B, L', vocab] as selected by `logits_to_keep`.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    label_positions: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def unwrap(model: Any):
    """The `Qwen2_5_VLForConditionalGeneration` under PEFT wrappers."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def image_grid(grid_thw: Any, batch: int, device: torch.device) -> torch.Tensor:
    """[B, 3] long grid from a (t, h, w) triple, a [3] or a [B, 3] tensor (patch units, pre-merge)."""
    grid = torch.as_tensor(grid_thw, dtype=torch.long, device=device)
    if grid.ndim == 1:
        grid = grid.unsqueeze(0).expand(batch, 3)
    if grid.shape != (batch, 3):
        raise ValueError(f"grid_thw must be (t, h, w) or [batch, 3], got shape {tuple(grid.shape)}")
    return grid.contiguous()


def _check_pads(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: torch.Tensor) -> torch.Tensor:
    is_pad = input_ids == image_token_id
    counts = is_pad.sum(dim=1)
    bad = (counts != tokens_per_image).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(f"row {i} has {int(counts[i])} `<|image_pad|>` tokens but its image has "
                         f"{int(tokens_per_image[i])} cached tokens ({len(bad)} bad rows in the batch); "
                         "the SFT tokens and the vision hiddens were built with different image_px or "
                         "the prompt was truncated")
    return is_pad


def rope_position_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      grid: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL 3D M-RoPE position ids [3, B, L] (pads get 0) for one image per row."""
    inner = unwrap(model).model
    mm_token_type_ids = (input_ids == unwrap(model).config.image_token_id).to(torch.int)
    inner.rope_deltas = None  # the model caches deltas between calls; never reuse them here
    position_ids, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                           image_grid_thw=grid, attention_mask=attention_mask)
    inner.rope_deltas = None
    return position_ids


def mrope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int,
                    llm_grid: tuple[int, int]) -> torch.Tensor:
    """`get_rope_index` for rows holding at most ONE contiguous run of image pads (what
    `vlm.sft_tokens` writes), as a few tensor ops: no Python loop over rows, no host sync.

    Text before the image counts 0, 1, ...; the image's tokens (a `llm_grid` = (h, w) grid of
    merged patches, one temporal slice) sit at (t, h, w) = (s, s + row, s + col) where s is the
    first pad's position; text after it resumes at s + max(h, w); padding gets 0. Equal to
    Qwen2.5-VL's `get_rope_index` for such rows (tested on left-, right- and unpadded rows).
    """
    gh, gw = int(llm_grid[0]), int(llm_grid[1])
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    j = valid.long().cumsum(1) - 1  # index among the row's real tokens
    is_img = (input_ids == image_token_id) & valid
    big = torch.full_like(j, input_ids.shape[1])
    first = torch.where(is_img, j, big).min(dim=1, keepdim=True).values  # no image: L (never reached)
    k = j - first
    in_img = (k >= 0) & (k < gh * gw)
    text = torch.where(k >= gh * gw, j - gh * gw + max(gh, gw), j)
    kk = k.clamp(min=0)
    pos = torch.stack([torch.where(in_img, first, text), torch.where(in_img, first + kk // gw, text),
                       torch.where(in_img, first + kk % gw, text)])
    return pos * valid


@dataclass
class StepInputs:
    """What one training micro-batch needs beyond the loader's tensors, computed on the host (in
    the loader's workers) so the device step has no data-dependent shapes and no host syncs.

    `label_index[i, j]` is the position whose logits predict `label_targets[i, j]` (-100 where
    row i has fewer labels than the K slots); `n_labels` counts the real ones. K is the batch's
    largest label count rounded up to a multiple of 8, so shapes repeat across steps.
    """

    position_ids: torch.Tensor  # [3, B, L] long
    label_index: torch.Tensor  # [B, K] long
    label_targets: torch.Tensor  # [B, K] long, -100 in unused slots
    n_labels: int
    right_padded: bool  # every row's real tokens are a prefix: causal attention needs no mask

    def map(self, fn) -> "StepInputs":
        """The same inputs with `fn` applied to each tensor (`.to(device)`, `.pin_memory()`, ...)."""
        return StepInputs(fn(self.position_ids), fn(self.label_index), fn(self.label_targets), self.n_labels,
                          self.right_padded)

    @staticmethod
    def cat(parts: list["StepInputs"]) -> "StepInputs":
        """Micro-batches' inputs as one batch of all their rows, in order (`train.fuse_accum`).
        Label positions are per row, so they carry over; rows get the widest part's slot count
        (extra slots unused)."""
        if len(parts) == 1:
            return parts[0]
        k = max(p.label_index.shape[1] for p in parts)

        def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
            return t if t.shape[1] == k else torch.cat([t, t.new_full((t.shape[0], k - t.shape[1]), fill)], dim=1)

        return StepInputs(torch.cat([p.position_ids for p in parts], dim=1),
                          torch.cat([widen(p.label_index, 0) for p in parts]),
                          torch.cat([widen(p.label_targets, IGNORE_INDEX) for p in parts]),
                          sum(p.n_labels for p in parts), all(p.right_padded for p in parts))


def step_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, image_token_id: int,
                image_tokens: int, llm_grid: tuple[int, int], min_slots: int = 8) -> StepInputs:
    """Check a CPU batch the way `cached_forward` would (one contiguous run of exactly `image_tokens`
    pads per row) and precompute its positions and label slots (at least `min_slots` per row: a
    CUDA-graphed step wants one fixed count); raises naming the first bad row."""
    ids = input_ids.long()
    mask = attention_mask.bool()
    is_pad = (ids == image_token_id) & mask
    counts = is_pad.sum(1)
    first = torch.where(is_pad, torch.arange(ids.shape[1]), ids.shape[1]).min(1).values
    last = torch.where(is_pad, torch.arange(ids.shape[1]), -1).max(1).values
    bad = ((counts != image_tokens) | (last - first + 1 != counts)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(f"row {i} has {int(counts[i])} `<|image_pad|>` tokens (expected {image_tokens} in one run); "
                         "the SFT tokens and the vision hiddens were built with different image_px or the "
                         "prompt was truncated")
    select = (labels[:, 1:] != IGNORE_INDEX) & mask[:, 1:]
    per_row = select.sum(1)
    n = int(per_row.sum())
    if n == 0:
        raise ValueError("no label tokens in the batch (every label is -100)")
    k = max(int(min_slots), -(-int(per_row.max()) // 8) * 8)
    # Stable sort puts each row's label positions first, in order; slots past its count are unused.
    order = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices
    if order.shape[1] < k:  # more slots than positions (tiny max_tokens): pad with unused slots
        order = torch.cat([order, order.new_zeros(order.shape[0], k - order.shape[1])], dim=1)
    order = order[:, :k]
    used = torch.arange(k).unsqueeze(0) < per_row.unsqueeze(1)
    index = torch.where(used, order, 0)
    targets = torch.where(used, labels[:, 1:].long().gather(1, order), IGNORE_INDEX)
    lengths = mask.sum(1, keepdim=True)
    right = bool((mask == (torch.arange(ids.shape[1]).unsqueeze(0) < lengths)).all())
    return StepInputs(mrope_positions(ids, attention_mask, image_token_id, llm_grid), index, targets, n, right)


def cached_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                vision_hiddens: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
    """Mean cross-entropy over the batch's label tokens, as `cached_forward(..., labels=...).loss`,
    for a batch `step_inputs` already checked: static shapes and no host sync, so the step can be
    queued ahead of the GPU, compiled or captured.

    Right-padded rows (what `vlm.sft_tokens` writes) run without an attention mask: causal
    attention already keeps every real token from seeing the pads after it, and the mask-free
    path is the fused causal kernel. Pad positions' outputs are never read.
    """
    base = unwrap(model)
    embeds = base.get_input_embeddings()(input_ids)
    hidden_size = embeds.shape[-1]
    is_pad = input_ids == base.config.image_token_id
    if attention_mask is not None:
        is_pad = is_pad & attention_mask.bool()
    feats = vision_hiddens.reshape(-1, hidden_size).to(embeds.dtype)
    embeds = embeds.masked_scatter(is_pad.unsqueeze(-1), feats)
    out = base.model.language_model(inputs_embeds=embeds,
                                    attention_mask=None if inputs.right_padded else attention_mask,
                                    position_ids=inputs.position_ids, use_cache=False)
    h = out.last_hidden_state
    picked = h.gather(1, inputs.label_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    logits = base.lm_head(picked)
    return F.cross_entropy(logits.float().flatten(0, 1), inputs.label_targets.flatten(), ignore_index=IGNORE_INDEX)


def _embed(model: Any, input_ids: torch.Tensor, vision_hiddens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    base = unwrap(model)
    merge = base.config.vision_config.spatial_merge_size
    tokens_per_image = grid.prod(-1) // (merge * merge)
    is_pad = _check_pads(input_ids, base.config.image_token_id, tokens_per_image)
    embeds = base.get_input_embeddings()(input_ids)
    hidden = embeds.shape[-1]
    feats = vision_hiddens.reshape(input_ids.shape[0], -1, hidden)
    if feats.shape[1] != int(tokens_per_image[0]) or not bool((tokens_per_image == feats.shape[1]).all()):
        raise ValueError(f"vision hiddens hold {feats.shape[1]} tokens per row but grid_thw implies "
                         f"{tokens_per_image.tolist()}")
    feats = feats.reshape(-1, hidden).to(embeds.device, embeds.dtype)
    # masked_scatter fills pad slots in row-major order: row i's pads get row i's tokens in order,
    # which the pad-count check above makes exact.
    return embeds.masked_scatter(is_pad.unsqueeze(-1).expand_as(embeds), feats)


def cached_forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   vision_hiddens: torch.Tensor, grid_thw: Any, labels: torch.Tensor | None = None,
                   logits_to_keep: int | torch.Tensor | None = None) -> CachedOutput:
    """Language-model forward on cached hiddens with 3D M-RoPE positions.

    Args:
        input_ids: [B, L] SFT tokens with exactly tokens-per-image `<|image_pad|>`s per row.
        vision_hiddens: [B, T, H] or [B, T*H] merged tower outputs (any float dtype).
        grid_thw: (1, H/14, W/14) or a [B, 3] grid of each row's image.
        labels: [B, L] with -100 where no loss is taken (unshifted, as in HF); when given, lm_head
            runs only at the positions that predict a label.
        logits_to_keep: without labels, as in HF: 0/None all positions, k the last k, or indices.
    """
    input_ids = input_ids.long()
    if attention_mask is not None:
        attention_mask = attention_mask.long()
    base = unwrap(model)
    grid = image_grid(grid_thw, input_ids.shape[0], input_ids.device)
    embeds = _embed(model, input_ids, vision_hiddens, grid)
    position_ids = rope_position_ids(model, input_ids, attention_mask, grid)
    out = base.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state
    if labels is None:
        from transformers.modeling_utils import slice_logits_to_keep

        return CachedOutput(loss=None, logits=base.lm_head(slice_logits_to_keep(hidden, 0 if logits_to_keep is None else logits_to_keep)))
    # Position t predicts token t+1: gather hidden states where the *next* label is set, so the
    # lm_head (vocab-wide, the biggest activation) runs only on answer tokens.
    targets_all = labels[:, 1:].long()
    select = targets_all != IGNORE_INDEX
    if attention_mask is not None:
        select &= attention_mask[:, 1:].bool()
    positions = select.nonzero()
    if positions.numel() == 0:
        raise ValueError("no label tokens in the batch (every label is -100)")
    logits = base.lm_head(hidden[:, :-1][select])
    targets = targets_all[select]
    loss = F.cross_entropy(logits.float(), targets, reduction="mean")
    return CachedOutput(loss=loss, logits=logits, label_positions=positions, targets=targets)


def _left_pad(rows: Sequence[torch.Tensor], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def cached_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    vision_hiddens: torch.Tensor, grid_thw: Any, max_new_tokens: int = 16,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy generation from prompts + cached hiddens; returns only the new tokens [B, <=max_new].

    Prompts may be right- or left-padded (the attention mask says which tokens are real); they are
    re-packed left-padded, and the hiddens go in through HF's `mm_encoder_outputs`, so decoding
    (KV cache, rope deltas, stopping) is exactly `generate`'s.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    base = unwrap(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = pad_token_id if pad_token_id is not None else base.generation_config.pad_token_id
    pad = pad if pad is not None else 0
    rows = [ids[m.bool()] for ids, m in zip(input_ids.long(), attention_mask)]
    ids, mask = _left_pad(rows, pad, input_ids.device)
    grid = image_grid(grid_thw, ids.shape[0], ids.device)
    merge = base.config.vision_config.spatial_merge_size
    tokens_per_image = grid.prod(-1) // (merge * merge)
    _check_pads(ids, base.config.image_token_id, tokens_per_image)
    dtype = base.get_input_embeddings().weight.dtype
    hidden = base.get_input_embeddings().weight.shape[1]
    feats = vision_hiddens.reshape(ids.shape[0], -1, hidden).to(ids.device, dtype)
    encoder = BaseModelOutputWithPooling(pooler_output=tuple(feats.unbind(0)))
    base.model.rope_deltas = None
    out = model.generate(
        input_ids=ids, attention_mask=mask, image_grid_thw=grid,
        mm_token_type_ids=(ids == base.config.image_token_id).to(torch.int),
        mm_encoder_outputs={"image": encoder}, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos_token_id if eos_token_id is not None else base.generation_config.eos_token_id,
        pad_token_id=pad)
    base.model.rope_deltas = None
    return out[:, ids.shape[1]:]
