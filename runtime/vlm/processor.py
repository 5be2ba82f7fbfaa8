"""Loading the Qwen2.5-VL processor, with an image-only fallback where torchvision is missing.

`Qwen2_5_VLProcessor` cannot be built without torchvision in transformers 5.x (its video
processor type-check needs `VideoProcessorMixin`), and on such machines `AutoProcessor` silently
returns a bare tokenizer. `load_processor` therefore tries the stock class first (GPU machines)
and otherwise builds `QwenVLImageOnlyProcessor`, which is the stock processor minus the video half.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoProcessor, AutoTokenizer
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = ["QwenVLImageOnlyProcessor", "load_processor", "is_vl_processor"]


class QwenVLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (which needs torchvision).

    `ProcessorMixin` derives its sub-processors from the `__init__` signature, so leaving out
    `video_processor` here is what drops video; images and text behave exactly as in the stock
    processor (same image-token expansion, same `mm_token_type_ids`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def is_vl_processor(obj: Any) -> bool:
    """True for a processor that has both an image processor and a tokenizer."""
    return (getattr(obj, "image_processor", None) is not None
            and getattr(obj, "tokenizer", None) is not None)


def load_processor(path_or_id: str, revision: str | None = None, trust_remote_code: bool = False,
                   local_files_only: bool = False):
    """The model's processor: the stock `AutoProcessor` when it yields a real one, else image-only.

    Args:
        path_or_id: a local model directory or a Hugging Face id.
        revision: hub revision (ignored for local directories).
        local_files_only: read a hub id from the Hugging Face cache only (the hub is unreachable).
    """
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local_files_only:
        kw["local_files_only"] = True
    if revision is not None:
        kw["revision"] = revision
    try:
        proc = AutoProcessor.from_pretrained(path_or_id, **kw)
    except (AttributeError, ImportError, TypeError, ValueError, OSError, KeyError):
        # The torchvision-less failure modes (video processor mapping, missing backends); a real
        # missing-model error re-surfaces from the fallback below with its own message.
        proc = None
    if proc is not None and is_vl_processor(proc):
        return proc
    image_processor = _load_image_processor(path_or_id, kw)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kw)
    chat_template = getattr(tokenizer, "chat_template", None)
    return QwenVLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_template)


def _load_image_processor(path_or_id: str, kw: dict[str, Any]):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path_or_id, **kw)
    except (ImportError, ValueError, AttributeError):
        # Without torchvision the torchvision-backed class cannot even be named; the PIL backend
        # reads the same preprocessor_config.json and produces the same patches.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(path_or_id, **kw)
