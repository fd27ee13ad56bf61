"""Dense-block concatenation without copies, and BatchNorm-ReLU fused into one pass.

Built from ATen ops, a dense layer costs a copy of all earlier features (``cat``), then about
20 memory-bound passes forward and backward over memory that grows with depth. Here a block
writes each new feature map once into a preallocated channels-last buffer, and a layer reads
its first C channels in place. A feature's batch statistics are computed once, when it is
written, and shared by every later layer. BatchNorm-ReLU is one pass forward and two backward,
and every layer adds its input gradient in place into one gradient buffer for the block, which
autograd hands on one feature at a time. A convolution's input and a dense layer's output can
carry zero channels (conv_padding.py; a ``width`` here). The function is ATen's (tests compare
in float64, padded or not); float32 rounds otherwise. Memory-efficient, a layer's normalised
input is recomputed in backward, not stored.

Four functions do a BatchNorm's work (``stats``, ``norm_relu``, ``norm_relu_backward``,
``finish_grad``), with one interface and two implementations chosen per device type
(``backend``): C loops on the CPU (cpu_kernels.py, float32 and float64), Triton on CUDA
(triton_kernels.py, float32, and bfloat16 features with float32 statistics and gradient sums),
one kernel each; the batch counters move in one operation a forward (``batch_counters``).
Elsewhere (no compiler, no Triton, contiguous or other-typed tensors, autocast, torch.compile)
``densenet.py``'s ATen path computes. bench/kernels.py counts a step's kernels.
"""
from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_trainer.speed import cpu_kernels, pass_counters
from densenet_trainer.speed.batch_counters import batch_counters, count_batch

__all__ = ["available", "backend", "batch_counters", "SharedFeatures", "batch_norm_relu", "gather",
           "norm_relu", "norm_relu_conv"]


@functools.cache
def backend(device_type: str) -> ModuleType | None:
    """The kernels for tensors on ``device_type``: cpu_kernels on the CPU, triton_kernels on
    CUDA, loaded once; None, with one warning, where they cannot be (tests point the CPU at
    Triton's interpreter by replacing this function)."""
    try:
        if device_type == "cpu":
            cpu_kernels.library()
            return cpu_kernels
        if device_type == "cuda":
            from densenet_trainer.speed import triton_kernels  # imports triton, which only CUDA needs
            return triton_kernels
    except cpu_kernels.Unavailable as error:
        return _unavailable(f"the fused CPU kernels are unavailable ({error})")
    except ImportError as error:
        return _unavailable(f"the fused CUDA kernels are unavailable (Triton cannot be imported: "
                            f"{error})")
    return None


def _unavailable(reason: str) -> None:
    warnings.warn(f"fused.py: {reason}; dense blocks use ATen operations instead: the same "
                  "results, slower", stacklevel=3)
    return None


def available(x: Tensor) -> bool:
    """Whether a block input can take the fused path: channels-last (a block's padded output
    too), eager, and of a dtype that its device's kernels compute in (float32 or float64 on
    the CPU; float32 or bfloat16 on CUDA)."""
    if (x.dim() != 4 or pixel_stride(x) is None
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)):
        return False
    kernels = backend(x.device.type)
    return kernels is not None and x.dtype in kernels.DTYPES


def pixel_stride(x: Tensor) -> int | None:
    """The elements from one pixel to the next of a channels-last (N, C, H, W) map whose
    channels are contiguous: C, or more for a block's output with padded pixels (None for
    other layouts)."""
    n, channels, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        return channels
    stride = x.stride()
    if (stride[1] == 1 and w > 1 and stride[3] >= channels and stride[2] == w * stride[3]
            and (n == 1 or stride[0] == h * stride[2])):
        return stride[3]
    return None


class SharedFeatures:
    """One dense block's features, written once into a channels-last buffer, with their statistics.

    ``buffer[:, :filled]`` holds the block input and every layer output so far, ``pixel_stride``
    elements from one pixel to the next (on CUDA the channels are padded up to a multiple of
    16, which lets the kernels vectorise their loads); ``mean`` and ``var`` (biased) their
    per-channel batch statistics, noted only where a BatchNorm reading them is in training
    mode (``batch_stats``; evaluation copies the features alone); ``newest_start`` the first
    channel of the feature appended last. ``grad``, on the buffer's pixel
    stride, is the gradient of the whole buffer: ``gather`` starts it in backward and every
    layer adds its share, so it is complete from the last channels down to the first;
    ``finish_grad`` hands each feature's part on.
    """

    def __init__(self, buffer: Tensor, filled: int = 0, batch_stats: bool = True) -> None:
        self.buffer, self.filled, self.pixel_stride = buffer, filled, pixel_stride(buffer)
        self.newest_start = 0
        self.batch_stats, self.counters = batch_stats, pass_counters.current(buffer.device)
        n, channels, h, w = buffer.shape
        self.pixels = n * h * w
        # low-precision features keep float32 statistics and gradient coefficients; their
        # gradient buffer holds the features' dtype, as ATen's gradients of them do
        self.accumulate = torch.float32 if buffer.dtype in (torch.bfloat16, torch.float16) else buffer.dtype
        self.mean, self.var = (buffer.new_empty(channels, dtype=self.accumulate) for _ in range(2))
        self.grad: Tensor | None = None
        self.coefficients: Tensor | None = None

    @classmethod
    def for_block(cls, first: Tensor, channels: int, batch_stats: bool = True) -> SharedFeatures:
        """A buffer of ``channels`` for a block whose input is ``first``."""
        n, _, h, w = first.shape
        multiple = backend(first.device.type).PIXEL_STRIDE_MULTIPLE if w > 1 else 1
        padded = -(-channels // multiple) * multiple
        storage = torch.empty((n, padded, h, w), dtype=first.dtype, device=first.device,
                              memory_format=torch.channels_last)
        shared = cls(storage[:, :channels], batch_stats=batch_stats)
        shared.append(first)
        return shared

    @classmethod
    def holding(cls, features: Tensor, batch_stats: bool) -> SharedFeatures:
        """``features`` alone, as the buffer itself (no copy); statistics if asked for: those it
        carries (``block_statistics``: gather's, fused_gemm's), else a pass over it."""
        shared = cls(features, filled=features.shape[1])
        if batch_stats and getattr(features, "block_statistics", None) is not None:
            shared.mean, shared.var = features.block_statistics
        elif batch_stats:
            with torch.no_grad():
                backend(features.device.type).stats(features, shared.pixel_stride, shared.pixels,
                                                    shared.filled, None, 0, shared.mean, shared.var, shared.counters)
        return shared

    @torch.no_grad()
    def append(self, feature: Tensor, channels: int | None = None) -> None:
        """Copy the first ``channels`` of ``feature`` (all: None; the rest are a padded feature's
        zeros) into the next channels, and note their batch statistics if asked."""
        channels = feature.shape[1] if channels is None else channels
        stride = pixel_stride(feature)
        if stride is None:
            feature = feature.contiguous(memory_format=torch.channels_last)
            stride = feature.shape[1]
        self.newest_start, self.filled = self.filled, self.filled + channels
        start = self.newest_start
        if not self.batch_stats:
            self.buffer[:, start:self.filled].copy_(feature[:, :channels])
            return
        backend(feature.device.type).stats(feature, stride, self.pixels, channels, self.buffer[:, start:],
                                           self.pixel_stride, self.mean[start:self.filled],
                                           self.var[start:self.filled], self.counters)

    def prefix(self, channels: int) -> Tensor:
        return self.buffer[:, :channels]

    def like_buffer(self, dtype: torch.dtype) -> Tensor:
        """An empty gradient buffer in ``dtype``, on the features' shape and pixel stride."""
        n, channels, h, w = self.buffer.shape
        storage = torch.empty((n, self.pixel_stride, h, w), dtype=dtype, device=self.buffer.device,
                              memory_format=torch.channels_last)
        return storage[:, :channels]

    def start_grad(self, grad: Tensor, coefficients: Tensor | None) -> None:
        """Begin backward with the gradient of the whole buffer so far and, where the batch
        statistics were used, the per-channel coefficients ``x * b + d`` of their part."""
        self.grad, self.coefficients = grad, coefficients

    def grad_started(self, batch_stats: bool) -> bool:
        """Whether backward has begun the gradient buffer (if not, it is begun, for a layer to write)."""
        if self.grad is not None:
            return True
        self.start_grad(self.like_buffer(self.buffer.dtype),
                        self.buffer.new_empty(2, self.buffer.shape[1], dtype=self.accumulate)
                        if batch_stats else None)
        return False

    def finish_grad(self, start: int, end: int, width: int) -> Tensor:
        """The complete gradient of channels start:end, whose every user has run backward, with
        zero channels up to ``width`` (a padded feature's).
        A BatchNorm passes gradient through its batch mean and variance as ``x * b + d`` per
        channel, and every later layer sees the same ``x``: the layers only sum their ``b``
        and ``d`` (``coefficients``), and the sum is applied here once, to these channels."""
        if self.coefficients is None:  # no batch statistics: the gradient as it stands
            return cpu_kernels.zero_padded(self.grad[:, start:end].to(self.buffer.dtype), width)
        return backend(self.buffer.device.type).finish_grad(
            self.grad[:, start:end], self.pixel_stride, self.buffer[:, start:end], self.pixel_stride,
            self.coefficients[:, start:end], self.buffer.dtype, width)


def batch_statistics(shared: SharedFeatures, norm: nn.BatchNorm2d, channels: int) -> tuple[Tensor, Tensor, tuple]:
    """What ``norm`` normalises the first ``channels`` with: (mean, var, the running statistics
    to move and by how much, or ()); in training the buffer's batch statistics, counted."""
    if not norm.training:  # copies: a later training step moves the running statistics
        return norm.running_mean.clone(), norm.running_var.clone(), ()
    factor = count_batch(norm)
    running = () if factor is None else (norm.running_mean, norm.running_var, factor)
    return shared.mean[:channels], shared.var[:channels], running


def _normalise(shared: SharedFeatures, norm: nn.BatchNorm2d, weight: Tensor, bias: Tensor, width: int,
               statistics: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """relu(batch_norm(the first C channels of the buffer)) in one pass: (out, mean, var);
    ``out`` has zero channels from C up to ``width`` (a convolution's padded input). In
    training the batch statistics are the buffer's and the running ones move, unless
    ``statistics`` (mean, var) are given: a recomputation repeats the forward's."""
    channels = weight.shape[0]
    mean, var, running = statistics + ((),) if statistics else batch_statistics(shared, norm, channels)
    x = shared.prefix(channels)
    out = torch.empty((x.shape[0], width, *x.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    backend(x.device.type).norm_relu(x, shared.pixel_stride, shared.pixels, channels, mean, var,
                                     weight, bias, norm.eps, out, width, *running)
    return out, mean, var


def _normalise_backward(shared: SharedFeatures, grad_out: Tensor, out: Tensor, weight: Tensor,
                        mean: Tensor, var: Tensor, eps: float, batch_stats: bool,
                        newest: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``_normalise``: adds the input gradient into the block's gradient buffer
    and returns (the newest feature's complete gradient, grad weight, grad bias); ``newest``
    is its (first channel, width: ``newest_of``). ``out`` and ``grad_out`` have its channels,
    padded or not."""
    channels = weight.shape[0]
    g = grad_out.contiguous(memory_format=torch.channels_last)
    accumulate = shared.grad_started(batch_stats)
    grad_weight, grad_bias = backend(g.device.type).norm_relu_backward(
        g, out, out.shape[1], shared.prefix(channels), shared.pixel_stride, shared.pixels, channels, mean, var, weight,
        eps, shared.grad, shared.pixel_stride, accumulate,
        shared.coefficients if batch_stats else None, shared.counters)
    start, width = newest
    return shared.finish_grad(start, channels, width), grad_weight, grad_bias


class _NormReLU(torch.autograd.Function):
    """relu(batch_norm(first C channels of the buffer)), one pass; backward into the block's grad.

    The autograd input is the newest feature only: this layer is the last in backward to use
    it, so its gradient in ``shared.grad`` is complete when this backward returns it. Older
    features are passed on by the layers before this one.
    """

    @staticmethod
    def forward(ctx, newest: Tensor, weight: Tensor, bias: Tensor, shared: SharedFeatures,
                norm: nn.BatchNorm2d, width: int) -> Tensor:
        out, mean, var = _normalise(shared, norm, weight, bias, width)
        ctx.save_for_backward(out, weight)
        # kept outside autograd's checks: later features' statistics are written beside them
        ctx.statistics, ctx.eps = (mean, var), norm.eps
        ctx.shared, ctx.batch_stats = shared, norm.training
        ctx.newest = newest_of(shared, newest)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out, weight = ctx.saved_tensors
        return (*_normalise_backward(ctx.shared, grad_out, out, weight, *ctx.statistics, ctx.eps,
                                     ctx.batch_stats, ctx.newest), None, None, None)


class _NormReLUConv(torch.autograd.Function):
    """conv(relu(batch_norm(first C channels of the buffer))) that keeps no activation.

    The memory-efficient mode on this path: the normalised input, C channels that grow with
    depth, is recomputed in backward from the block's buffer (one pass; the buffer is written
    once and never changed) instead of being stored, and the convolution does not run twice.
    ``conv_weight``'s input channels may be padded (the normalised input's are to match).
    """

    @staticmethod
    def forward(ctx, newest: Tensor, weight: Tensor, bias: Tensor, conv_weight: Tensor,
                shared: SharedFeatures, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
        activated, mean, var = _normalise(shared, norm, weight, bias, conv_weight.shape[1])
        ctx.save_for_backward(weight, bias, conv_weight)
        ctx.statistics = (mean, var)  # outside autograd's checks, as in _NormReLU
        ctx.shared, ctx.norm, ctx.conv, ctx.batch_stats = shared, norm, conv, norm.training
        ctx.newest = newest_of(shared, newest)
        return F.conv2d(activated, conv_weight, None, conv.stride,
                        conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, bias, conv_weight = ctx.saved_tensors
        conv: nn.Conv2d = ctx.conv
        activated, _, _ = _normalise(ctx.shared, ctx.norm, weight, bias, conv_weight.shape[1], ctx.statistics)
        grad_activated, grad_conv, _ = torch.ops.aten.convolution_backward(
            grad_out, activated, conv_weight, None, conv.stride,
            conv.padding, conv.dilation, False, [0, 0], conv.groups, [True, True, False])
        newest, grad_weight, grad_bias = _normalise_backward(
            ctx.shared, grad_activated, activated, weight, *ctx.statistics, ctx.norm.eps,
            ctx.batch_stats, ctx.newest)
        return newest, grad_weight, grad_bias, grad_conv, None, None, None


class _Gather(torch.autograd.Function):
    """The whole buffer as the block's output; backward starts the block's gradient buffer."""

    @staticmethod
    def forward(ctx, newest: Tensor, shared: SharedFeatures) -> Tensor:
        ctx.shared, ctx.newest = shared, newest_of(shared, newest)
        return shared.buffer.view_as(shared.buffer)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        shared: SharedFeatures = ctx.shared
        grad = shared.like_buffer(shared.buffer.dtype)  # on the buffer's pixel stride
        grad.copy_(grad_out)
        shared.start_grad(grad, grad_out.new_zeros(2, shared.buffer.shape[1], dtype=shared.accumulate))
        return shared.finish_grad(ctx.newest[0], shared.buffer.shape[1], ctx.newest[1]), None


def norm_relu(norm: nn.BatchNorm2d, shared: SharedFeatures, newest: Tensor, width: int | None = None) -> Tensor:
    """``relu(norm(concatenation so far))``, ``newest`` the last feature appended, with zero
    channels up to ``width`` (a convolution's padded input; None: none)."""
    return _NormReLU.apply(newest, norm.weight, norm.bias, shared, norm, width or norm.num_features)


def norm_relu_conv(norm: nn.BatchNorm2d, conv: nn.Conv2d, conv_weight: Tensor, shared: SharedFeatures,
                   newest: Tensor) -> Tensor:
    """``conv(relu(norm(concatenation so far)))`` with ``conv_weight`` (input channels padded or
    not), storing no activation (memory-efficient)."""
    return _NormReLUConv.apply(newest, norm.weight, norm.bias, conv_weight, shared, norm, conv)


def batch_norm_relu(norm: nn.BatchNorm2d, x: Tensor, width: int | None = None) -> Tensor:
    """``relu(norm(x))`` in one pass, for a tensor ``available`` accepts (``width``: above)."""
    return norm_relu(norm, SharedFeatures.holding(x, norm.training), x, width)


def newest_of(shared: SharedFeatures, newest: Tensor) -> tuple[int, int]:
    """The newest feature's first channel in ``shared`` and its width, padded or not."""
    return shared.newest_start, newest.shape[1]


def gather(shared: SharedFeatures, newest: Tensor) -> Tensor:
    """The block's full concatenation, ``newest`` being the last feature appended; it carries
    the batch statistics the block noted of every channel (``block_statistics``), which the
    BatchNorm after the block (a transition's, the final one) reads instead of a pass of its
    own."""
    out = _Gather.apply(newest, shared)
    out.block_statistics = (shared.mean, shared.var) if shared.batch_stats else None
    return out
