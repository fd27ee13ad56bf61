"""--kernels fused-gemm: the fused path, with each bottleneck's 1x1 convolution a Triton GEMM
that applies its BatchNorm-ReLU on load (gemm_kernels.py).

A DenseNet-BC layer's first BatchNorm-ReLU is the widest tensor of the layer: on the fused
path it is written out in full for cuDNN's convolution to read back, and its gradient makes
the same round trip. Here the GEMM reads the block's buffer, forward and backward, and
nothing of the activation is stored; its epilogue also leaves the second BatchNorm's batch
statistics (``block_statistics``, which fused.SharedFeatures.holding reads), so that pass is
gone too. ``apply`` puts it on a fused model's layers where it applies (``applies``); the
rest of the model computes as on the fused path.
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor, nn

from densenet_trainer.speed import fused


@functools.cache
def backend(device_type: str) -> ModuleType | None:
    """gemm_kernels on CUDA (tests point the CPU at Triton's interpreter by replacing this
    function); None elsewhere, or where Triton cannot be imported."""
    if device_type != "cuda":
        return None
    try:
        from densenet_trainer.speed import gemm_kernels  # imports triton, which only CUDA needs
    except ImportError:
        return None
    return gemm_kernels


def unavailable(device_type: str) -> str | None:
    """Why there are no GEMM kernels on ``device_type`` (None: there are)."""
    if backend(device_type) is None:
        return f"the GEMM kernels are unavailable on {device_type} (Triton, on CUDA only)"
    return None


def applies(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv`` of a BatchNorm-ReLU of ``x`` (a fused block's newest feature) can be
    one of the GEMMs: a plain 1x1 convolution of at most MAX_N output channels, its weight's
    input channels contiguous (the kernels read (n, k) at n * C + k), weight and features of one
    dtype the kernels compute in, on a device that has them."""
    kernels = backend(x.device.type)
    return (kernels is not None and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and conv.bias is None
            and conv.out_channels <= kernels.MAX_N and x.dtype in kernels.DTYPES
            and conv.weight.dtype == x.dtype and conv.weight.stride()[:2] == (conv.in_channels, 1))


class _NormReLUMatmul(torch.autograd.Function):
    """conv1x1(relu(batch_norm(first C channels of the buffer))), storing no activation.

    As fused._NormReLU, the autograd input is the newest feature alone, whose gradient is
    complete once this backward has added its share into the block's gradient buffer."""

    @staticmethod
    def forward(ctx, newest: Tensor, weight: Tensor, bias: Tensor, conv_weight: Tensor,
                shared: fused.SharedFeatures, norm: nn.BatchNorm2d, stats: Tensor | None) -> Tensor:
        channels = weight.shape[0]
        mean, var, running = fused.batch_statistics(shared, norm, channels)
        out = backend(newest.device.type).norm_relu_matmul(
            shared.prefix(channels), shared.pixel_stride, shared.pixels, channels, mean, var, weight,
            bias, norm.eps, conv_weight, stats, shared.counters, *running)
        ctx.save_for_backward(weight, bias, conv_weight)
        ctx.statistics = (mean, var)  # outside autograd's checks, as in fused._NormReLU
        ctx.shared, ctx.eps, ctx.batch_stats = shared, norm.eps, norm.training
        ctx.newest = fused.newest_of(shared, newest)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, bias, conv_weight = ctx.saved_tensors
        shared: fused.SharedFeatures = ctx.shared
        channels = weight.shape[0]
        accumulate = shared.grad_started(ctx.batch_stats)
        grad_conv, grad_weight, grad_bias = backend(grad_out.device.type).norm_relu_matmul_backward(
            grad_out.contiguous(memory_format=torch.channels_last), conv_weight, shared.prefix(channels),
            shared.pixel_stride, shared.pixels, channels, *ctx.statistics, weight, bias, ctx.eps,
            shared.grad, shared.pixel_stride, accumulate, shared.coefficients if ctx.batch_stats else None,
            shared.counters)
        newest = shared.finish_grad(ctx.newest[0], channels, ctx.newest[1])
        return newest, grad_weight, grad_bias, grad_conv, None, None, None


def norm_relu_matmul(norm: nn.BatchNorm2d, conv: nn.Conv2d, shared: fused.SharedFeatures, newest: Tensor,
                     next_norm: nn.BatchNorm2d | None) -> Tensor:
    """``conv(relu(norm(concatenation so far)))``, ``newest`` the last feature appended; where
    ``next_norm``, the BatchNorm that reads the result, is in training mode, the result carries
    its batch statistics (``block_statistics``, as fused.gather's output does)."""
    stats = None
    if next_norm is not None and next_norm.training:
        stats = newest.new_empty(2, conv.out_channels, dtype=shared.accumulate)
    out = _NormReLUMatmul.apply(newest, norm.weight, norm.bias, conv.weight, shared, norm, stats)
    out.block_statistics = None if stats is None else (stats[0], stats[1])
    return out
