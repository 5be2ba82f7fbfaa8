"""Whether the Hugging Face hub can be reached, asked once with a short timeout.

`datasets` and `transformers` retry an unreachable hub for tens of seconds and then fail with a
traceback; callers ask here first and fail at once with a located error that says how to use a
local copy instead. Honours `HF_HUB_OFFLINE`, `HF_ENDPOINT` and proxies (through huggingface_hub's
own HTTP session). Never prints.
"""

from __future__ import annotations

import functools

__all__ = ["PROBE_SECONDS", "hub_unreachable"]

PROBE_SECONDS = 3.0


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """None when the hub answers (any HTTP status); otherwise why not, in a few words."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "`HF_HUB_OFFLINE` is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS)
    except Exception as e:  # noqa: BLE001 -- DNS, refused, timeout, proxy, TLS: all mean "not reachable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{constants.ENDPOINT} does not answer ({reason})"
    return None
