"""Qwen2-VL image preprocessing as a few tensor ops on any device (the vision column's hot path).

HF's image processor turns each PIL image into `pixel_values` in Python, one image at a time:
rescale, normalize, then a reshape/transpose into `[grid_h * grid_w, C * temporal * patch^2]`
rows. For images that are already at the target size (the vision column resizes every image to
`model.image_px` square first, see `prompt.resize_image`), that is all it does, and it is the part
of the tier-3 backfill that held the GIL: decode threads starved the thread feeding the GPU.

`Patchifier(image_processor)` does the same arithmetic on a uint8 `[B, H, W, 3]` batch, on the
GPU when the batch is there, so the CPU side of the vision column is only JPEG decode + resize
(Pillow releases the GIL for both). It mirrors whichever backend the processor is: the
torchvision backend fuses rescale into normalize (`(x - mean*255) / (std*255)`), the PIL backend
rescales in float64 then normalizes in float32, and the two differ in the last float32 bit. Tests
hold it equal to the processor it was built from (`tests/test_runtime/test_patchify.py`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Patchifier"]


class Patchifier:
    """`Patchifier(ip)(u8)` -> `(pixel_values, grid_thw)` exactly as `ip(images=..., return_tensors="pt")`
    would return for the same images, given images already at a size the processor keeps.

    Args:
        image_processor: a Qwen2-VL image processor (torchvision or PIL backend).
    """

    def __init__(self, image_processor: Any):
        from transformers.image_processing_backends import TorchvisionBackend

        ip = image_processor
        self.patch = int(ip.patch_size)
        self.temporal = int(ip.temporal_patch_size)
        self.merge = int(ip.merge_size)
        self.do_rescale = bool(ip.do_rescale)
        self.do_normalize = bool(ip.do_normalize)
        self.rescale_factor = float(ip.rescale_factor)
        self.mean = [float(v) for v in (ip.image_mean if isinstance(ip.image_mean, (list, tuple)) else [ip.image_mean] * 3)]
        self.std = [float(v) for v in (ip.image_std if isinstance(ip.image_std, (list, tuple)) else [ip.image_std] * 3)]
        self.fused = isinstance(ip, TorchvisionBackend)
        self._consts: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            # float32 named, not the default dtype: the eval queues this from a thread while
            # transformers may have changed the process-wide default mid-load.
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device)
            std = torch.tensor(self.std, dtype=torch.float32, device=device)
            if self.fused and self.do_rescale:  # TorchvisionBackend._fuse_mean_std_and_rescale_factor
                mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
            self._consts[device] = (mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1))
        return self._consts[device]

    def normalize(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, C] -> float32 [B, C, H, W], rescaled and normalized as the processor does."""
        x = u8.permute(0, 3, 1, 2)
        if self.fused:
            x = x.to(torch.float32)
            if self.do_normalize:
                mean, std = self._mean_std(x.device)
                return (x - mean) / std
            return x * self.rescale_factor if self.do_rescale else x
        if self.do_rescale:  # transformers.image_transforms.rescale: float64 multiply, then float32
            x = (x.to(torch.float64) * self.rescale_factor).to(torch.float32)
        else:
            x = x.to(torch.float32)
        if self.do_normalize:
            mean, std = self._mean_std(x.device)
            x = (x - mean) / std
        return x

    def __call__(self, u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if u8.dtype != torch.uint8 or u8.ndim != 4 or u8.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B, H, W, 3] images, got {u8.dtype} {tuple(u8.shape)}")
        b, h, w, c = u8.shape
        p, m, t = self.patch, self.merge, self.temporal
        if h % (p * m) or w % (p * m):
            raise ValueError(f"image size {h}x{w} is not a multiple of {p * m} (patch {p} x merge {m})")
        gh, gw = h // p, w // p
        x = self.normalize(u8)
        # Same layout as the processors' patchify: rows in (merge block, position in block) order,
        # each row (channel, temporal copy, patch row, patch col); a still image is repeated
        # `temporal` times along time.
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # b, gh/m, gw/m, m, m, c, p, p
        x = x.unsqueeze(6).expand(b, gh // m, gw // m, m, m, c, t, p, p)
        pixels = x.reshape(b * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long)
        return pixels, grid
