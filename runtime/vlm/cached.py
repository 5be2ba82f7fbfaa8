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

__all__ = ["CachedOutput", "cached_forward", "cached_generate", "image_grid", "rope_position_ids", "unwrap"]

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
