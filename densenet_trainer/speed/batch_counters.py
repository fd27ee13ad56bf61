"""The fused BatchNorms' batch counters, moved together: within ``batch_counters`` each
counts its training batch at the end, all in one multi-tensor addition, instead of one tiny
kernel each (on a GPU, about a hundred launches a step fewer; DenseNet.forward uses it)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_counting: list[list[Tensor]] = []  # batch_counters' lists, innermost last


@contextlib.contextmanager
def batch_counters() -> Iterator[None]:
    """Within, the fused BatchNorms count their batch at the end, all in one multi-tensor
    addition, instead of one tiny kernel each (DenseNet.forward uses this)."""
    counters: list[Tensor] = []
    _counting.append(counters)
    try:
        yield
    finally:
        _counting.pop()
        if counters:
            torch._foreach_add_(counters, 1)


def count_batch(norm: nn.BatchNorm2d) -> float | None:
    """Count a training batch in ``norm``'s counter (at the end of batch_counters, if within
    one); returns the factor by which the running statistics move, or None where they do not:
    where the counter is hidden, a recomputation must not count a batch twice."""
    if not norm.track_running_stats or norm.num_batches_tracked is None:
        return None
    if norm.momentum is None:  # a cumulative average needs the count now
        norm.num_batches_tracked.add_(1)
        return 1 / norm.num_batches_tracked.item()
    if _counting:
        _counting[-1].append(norm.num_batches_tracked)
    else:
        norm.num_batches_tracked.add_(1)
    return norm.momentum
