"""Zero channels that let a device's convolutions take their fastest kernels, on the fused path.

cuDNN's tensor-core kernels for channels-last bfloat16 want each pixel's channels in whole 16
bytes, 8 channels (``conv_channels``). A DenseNet-BC's 1x1 convolutions read 24 + 12i channels
and its 3x3 ones write the growth rate, 12: for odd i, and for k = 12, they are not. So a
BatchNorm-ReLU that feeds a convolution writes zero channels up to the multiple, matched by zero
input channels in a copy of the weight (``padded_input``); and in a fused block, each layer's
last convolution computes with a copy of its weight that has zero output channels
(``padded_outputs``), so that the feature it writes carries zero channels, which the block's
buffer skips (fused.SharedFeatures.append) and whose gradient is zero there
(SharedFeatures.finish_grad's ``width``). The function is unchanged (tests compare in float64):
the parameters, their counts and gradients are the same. A block's padded copies take two
launches (one zeroed buffer, one multi-tensor copy) and their gradients none (views).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_trainer.speed import fused


def conv_channels(x: Tensor, channels: int) -> int:
    """``channels`` padded up to the multiple the device's convolutions want in x's dtype
    (bfloat16 on CUDA: 8; none on the CPU)."""
    multiple = fused.backend(x.device.type).CONV_CHANNEL_MULTIPLE.get(x.dtype, 1)
    return -(-channels // multiple) * multiple


def padded_input(weight: Tensor, channels: int) -> Tensor:
    """``weight`` with zero input channels up to ``channels``."""
    extra = channels - weight.shape[1]
    return F.pad(weight, (0, 0, 0, 0, 0, extra)) if extra else weight


class _ZeroRows(torch.autograd.Function):
    """Weights with zero output channels up to ``rows`` each, in one zeroed buffer filled by one
    multi-tensor copy, each in its weight's memory format (channels-last weights stay so: the
    copy keeps its fast path, and cuDNN converts nothing); backward hands each weight the first
    rows of its gradient (views), or nothing where a copy went unused."""

    @staticmethod
    def forward(ctx, rows: Sequence[int], *weights: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        shapes = [(count, *weight.shape[1:]) for count, weight in zip(rows, weights)]
        sizes = [math.prod(shape) for shape in shapes]
        storage = weights[0].new_zeros(sum(sizes))
        padded = [_laid_out_as(weight, part, shape) for weight, part, shape in zip(weights, storage.split(sizes), shapes)]
        torch._foreach_copy_([out[:len(weight)] for out, weight in zip(padded, weights)], list(weights))
        ctx.channels = [len(weight) for weight in weights]
        return tuple(padded)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        return (None, *(None if grad is None else grad[:count] for grad, count in zip(grads, ctx.channels)))


def _laid_out_as(weight: Tensor, part: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``part`` of a flat buffer as a (rows, C, kh, kw) tensor in ``weight``'s memory format, so
    that its first rows have the weight's strides."""
    if not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        rows, channels, height, width = shape
        return part.view(rows, height, width, channels).permute(0, 3, 1, 2)
    return part.view(shape)


@contextlib.contextmanager
def padded_outputs(convs: Sequence[nn.Conv2d]) -> Iterator[None]:
    """Within it, each of ``convs`` whose output channels the device's convolutions want padded
    computes on the fused path with a copy of its weight that has zero output channels up to
    conv_channels (``compute_weight``): a fused block's layers' last convolutions."""
    padding = [(conv, conv_channels(conv.weight, conv.out_channels)) for conv in convs
               if conv.bias is None and conv.groups == 1]
    padding = [(conv, rows) for conv, rows in padding if rows > conv.out_channels]
    if not padding:
        yield
        return
    copies = _ZeroRows.apply([rows for _, rows in padding], *(conv.weight for conv, _ in padding))
    for (conv, _), weight in zip(padding, copies):
        conv.__dict__["padded_weight"] = weight  # not a module attribute: gone after the block
    try:
        yield
    finally:
        for conv, _ in padding:
            del conv.__dict__["padded_weight"]


def compute_weight(conv: nn.Conv2d) -> Tensor:
    """``conv``'s weight, or within ``padded_outputs`` its copy with zero output channels."""
    return conv.__dict__.get("padded_weight", conv.weight)


def conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` with compute_weight, where ``x`` may have zero channels beyond the
    convolution's inputs (a padded BatchNorm-ReLU's), matched by ``padded_input``; the module's
    hooks, which would see padded tensors, are then passed over."""
    weight = compute_weight(conv)
    if x.shape[1] == conv.in_channels and weight is conv.weight:
        return conv(x)
    return conv._conv_forward(x, padded_input(weight, x.shape[1]), conv.bias)
