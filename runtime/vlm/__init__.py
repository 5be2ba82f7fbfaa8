"""Qwen2.5-VL plumbing for cached-feature fine-tuning: loaders, prompt, processor, cached forward.

- `prompt`: the one definition of image resize and prompt text (SFT tokens, training, eval).
- `processor`: `load_processor`, with an image-only fallback where torchvision is missing.
- `models`: resolve ids (`vlmspec:tiny-qwen2.5-vl` is shipped), `model_facts`, and loaders for
  the vision tower only, the language model only (optionally 4-bit), and the full model.
- `cached`: the language model fed cached tower hiddens with correct 3D M-RoPE positions.
- `tiny`: reproducible builder of the shipped tiny model.
Submodules import torch/transformers; this package itself imports nothing heavy.
"""
