"""The counters by which a Triton pass's last program to finish finds itself, one array a model.

A pass that sums per channel over all pixels (triton_kernels.py's statistics and BatchNorm
backward, gemm_kernels.py's GEMMs) leaves one row of partial sums per row of programs; the
last program to finish a channel tile adds them, instead of a finishing pass launched after
it. Each program counts itself in a counter per channel tile, and the last sets it back to
zero. A model's passes run one after another on one stream, so they share one array of
counters, made zeroed once on the model's device (``of_model``); a SharedFeatures made during
its forward keeps it for backward (``current``). Elsewhere, a pass gets fresh zeros
(triton_kernels.counters_for): correct, one launch more.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_current: list[Tensor] = []  # the counters of the models whose forward is running, innermost last


@contextlib.contextmanager
def of_model(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Within, SharedFeatures made on ``device`` take ``model``'s counters: one per channel of
    its widest BatchNorm (a pass uses one per tile of 16 or more), made once on the device."""
    counters = model.__dict__.get("pass_counters")
    if counters is None or counters.device != device:
        widest = max((m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)), default=0)
        counters = torch.zeros(widest + 1, dtype=torch.int32, device=device)
        model.__dict__["pass_counters"] = counters  # not a buffer: no part of the model's state
    _current.append(counters)
    try:
        yield
    finally:
        _current.pop()


def current(device: torch.device) -> Tensor | None:
    """The counters of the innermost model whose forward is running on ``device``, or None."""
    return _current[-1] if _current and _current[-1].device == device else None
