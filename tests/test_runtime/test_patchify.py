"""`Patchifier` is the image processor's arithmetic as tensor ops: bitwise equal to it."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlmspec.runtime.vlm.patchify import Patchifier
from vlmspec.runtime.vlm.processor import load_processor
from vlmspec.runtime.vlm.prompt import image_processor_kwargs
from vlmspec.runtime.vlm.models import resolve_model_path

TINY = resolve_model_path("vlmspec:tiny-qwen2.5-vl")


@pytest.mark.parametrize("px,batch", [(112, 1), (224, 3)])
def test_patchify_equals_the_image_processor(px, batch):
    ip = load_processor(TINY).image_processor
    rng = np.random.default_rng(px)
    arr = rng.integers(0, 256, (batch, px, px, 3), dtype=np.uint8)
    want = ip(images=[Image.fromarray(a) for a in arr], return_tensors="pt", **image_processor_kwargs(px))
    got, grid = Patchifier(ip)(torch.from_numpy(arr))
    assert got.dtype == want["pixel_values"].dtype
    assert torch.equal(got, want["pixel_values"])
    assert torch.equal(grid, want["image_grid_thw"])


def test_patchify_refuses_what_the_processor_would_resize():
    pf = Patchifier(load_processor(TINY).image_processor)
    with pytest.raises(ValueError, match="multiple of 28"):
        pf(torch.zeros((1, 100, 112, 3), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[B, H, W, 3\]"):
        pf(torch.zeros((1, 112, 112, 3), dtype=torch.float32))
