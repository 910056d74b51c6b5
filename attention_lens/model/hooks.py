"""Hook points: identity modules named after their attribute path (TransformerLens style)."""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], Optional[torch.Tensor]]

# Hooks live per thread, so concurrent requests sharing one model (a threaded server) never
# see each other's caching or ablation hooks.
_LOCAL = threading.local()


def _hook_table() -> dict[int, list[HookFn]]:
    table = getattr(_LOCAL, "hooks", None)
    if table is None:
        table = _LOCAL.hooks = {}
    return table


class HookPoint(nn.Module):
    """An identity layer that lets callers read or replace the activation passing through.

    A hook is called as ``fn(activation, hook)``; if it returns a tensor, that tensor
    replaces the activation downstream (used for ablation and patching).
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""

    @property
    def _fns(self) -> list[HookFn]:
        return _hook_table().get(id(self), [])

    def add_hook(self, fn: HookFn) -> None:
        """Attach ``fn`` (in the calling thread) until :meth:`remove_hooks` is called."""
        _hook_table().setdefault(id(self), []).append(fn)

    def remove_hooks(self) -> None:
        """Detach every hook the calling thread attached."""
        _hook_table().pop(id(self), None)

    @property
    def active(self) -> bool:
        """Whether any hook is attached (lets the model skip optional work)."""
        return bool(self._fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for fn in self._fns:
            out = fn(x, self)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(
                        f"hook on {self.name} returned shape {tuple(out.shape)}, "
                        f"expected {tuple(x.shape)}"
                    )
                x = out
        return x
