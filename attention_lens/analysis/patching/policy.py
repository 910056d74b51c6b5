"""Where a patching grid runs: in the request, or as a background job."""

from __future__ import annotations

from ...model.checkpoint import LoadedModel

#: Models at most this big (layers x heads and d_model) are patched in the page's own
#: callback; bigger ones as a background job with progress.
INLINE_HEADS, INLINE_D_MODEL = 64, 1024


def runs_inline(lm: LoadedModel) -> bool:
    """Whether a patching grid of this model is quick enough to draw without a job."""
    return (lm.cfg.n_layers * lm.cfg.n_heads <= INLINE_HEADS
            and lm.cfg.d_model <= INLINE_D_MODEL)
