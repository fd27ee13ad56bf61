"""Dense-block concatenation without copies, and BatchNorm-ReLU fused into one pass.

A dense layer normalises the concatenation of every earlier feature map. Built from ATen ops
that costs, per layer, a copy of all earlier features (``cat``), a statistics pass, a
normalise pass and a ReLU pass forward, then ReLU-backward, two BatchNorm-backward passes and
the accumulation of each feature's gradient backward: about 20 passes over memory that grows
with depth. Those memory-bound passes, not the convolutions, decide a CPU's speed, and much
of a GPU's.

Here a block writes each new feature map once into a preallocated channels-last buffer; a
layer reads the buffer's first C channels in place. A feature's batch statistics are computed
once, when it is written, and shared by every later layer (their BatchNorms see the same
values, so the statistics are the same). BatchNorm-ReLU is one pass forward and two backward,
and every layer adds its input gradient in place into one gradient buffer for the block, which
autograd hands on one feature at a time. The result equals the ATen path (tests compare
outputs and gradients in float64); only the order of floating-point sums differs. In the
memory-efficient mode a layer's normalised input is recomputed in backward instead of stored.

The autograd logic here is the same on every device; three kernels do the passes. On the CPU
they are C loops, compiled at first use with the system's C compiler (about 0.3 s) into a
private temporary directory; on CUDA they are Triton kernels (triton_kernels.py), which also
take bfloat16 features with float32 statistics and gradient sums. Where neither applies (no
compiler, no Triton, contiguous or other-typed tensors, autocast, torch.compile),
``densenet.py`` uses its ATen path instead.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["available", "SharedFeatures", "batch_norm_relu", "gather", "norm_relu", "norm_relu_conv"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

/* Per-thread partial sums, two arrays of C per thread, added up in thread order. */
static void combine(const double* part, int nt, int64_t C, double* u, double* v) {
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int t = 0; t < nt; ++t) {
      a += part[(size_t)t * 2 * C + c];
      b += part[(size_t)t * 2 * C + C + c];
    }
    u[c] = a; v[c] = b;
  }
}

/* Per channel, two sums over the P pixels: each thread adds BODY's terms for its pixels into
   su[c] and sv[c] (type T) over blocks of 64 pixels, then into double; the totals go to
   u and v. BODY sees p, the pixel index, and loops over c itself. */
#define PIXEL_SUMS(T, u, v, ...)                                                             \
  double* part = calloc((size_t)nt * 2 * C, sizeof(double));                                 \
  _Pragma("omp parallel num_threads(nt)")                                                    \
  {                                                                                          \
    int t = omp_get_thread_num(), n = omp_get_num_threads();                                 \
    int64_t lo = P * t / n, hi = P * (t + 1) / n;                                            \
    double* pu = part + (size_t)t * 2 * C; double* pv = pu + C;                              \
    T* su = calloc(2 * C, sizeof(T)); T* sv = su + C;                                        \
    for (int64_t p0 = lo; p0 < hi; p0 += 64) {                                               \
      int64_t p1 = p0 + 64 < hi ? p0 + 64 : hi;                                              \
      for (int64_t p = p0; p < p1; ++p) { __VA_ARGS__ }                                      \
      for (int64_t c = 0; c < C; ++c) { pu[c] += su[c]; pv[c] += sv[c]; su[c] = 0; sv[c] = 0; } \
    }                                                                                        \
    free(su);                                                                                \
  }                                                                                          \
  combine(part, nt, C, u, v);                                                                \
  free(part);

/* x: P pixels of C channels, pixel stride ldx (a channels-last prefix); y: P x C, dense.
   Every comparison is written so that a NaN passes through as in ATen: relu(NaN) is NaN, its
   gradient passes where y is NaN, and a NaN variance stays NaN. */
#define KERNELS(T, S)                                                                        \
void norm_relu_##S(const T* x, int64_t ldx, int64_t P, int64_t C, const T* scale,            \
                   const T* shift, T* y, int nt) {                                           \
  _Pragma("omp parallel for num_threads(nt) schedule(static)")                               \
  for (int64_t p = 0; p < P; ++p) {                                                          \
    const T* xp = x + p * ldx; T* yp = y + p * C;                                            \
    _Pragma("omp simd")                                                                      \
    for (int64_t c = 0; c < C; ++c) { T v = xp[c] * scale[c] + shift[c]; yp[c] = v < 0 ? 0 : v; } \
  }                                                                                          \
}                                                                                            \
/* With gm = g * [y > 0]: out (pixel stride ldo) += gm * a, and per channel the sums of gm  \
   and of gm * (x - mean). */                                                                \
void norm_relu_backward_##S(const T* g, const T* y, const T* x, int64_t ldx, int64_t P,      \
                            int64_t C, const T* mean, const T* a, T* out, int64_t ldo,       \
                            double* sum_g, double* sum_gx, int nt) {                         \
  PIXEL_SUMS(T, sum_g, sum_gx,                                                               \
    const T* gp = g + p * C; const T* yp = y + p * C; const T* xp = x + p * ldx;             \
    T* op = out + p * ldo;                                                                   \
    _Pragma("omp simd")                                                                      \
    for (int64_t c = 0; c < C; ++c) {                                                        \
      T gv = gp[c], m = yp[c] <= 0 ? 0 : gv;                                                 \
      op[c] += m * a[c]; su[c] += m; sv[c] += m * (xp[c] - mean[c]);                         \
    })                                                                                       \
}                                                                                            \
/* Mean and biased var of each channel of f, a dense P x C feature map, and unless dst is   \
   NULL a copy of f into dst (pixel stride ldd). The sums are taken about the first       \
   pixel's value, which keeps E[x^2] - E[x]^2 from cancelling. */                          \
void stats_##S(const T* f, int64_t P, int64_t C, T* dst, int64_t ldd, double* mean,         \
                double* var, int nt) {                                                       \
  PIXEL_SUMS(T, mean, var,                                                                   \
    const T* fp = f + p * C;                                                                 \
    if (dst) {                                                                               \
      T* dp = dst + p * ldd;                                                                 \
      _Pragma("omp simd")                                                                    \
      for (int64_t c = 0; c < C; ++c) dp[c] = fp[c];                                         \
    }                                                                                        \
    _Pragma("omp simd")                                                                      \
    for (int64_t c = 0; c < C; ++c) { T d = fp[c] - f[c]; su[c] += d; sv[c] += d * d; })     \
  for (int64_t c = 0; c < C; ++c) {                                                          \
    double m = mean[c] / P, s = var[c] / P - m * m;                                          \
    mean[c] = f[c] + m; var[c] = s < 0 ? 0 : s;                                              \
  }                                                                                          \
}

KERNELS(float, f32)
KERNELS(double, f64)
"""


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}  # the dtypes the kernels are built for


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Compile the kernels once per process; None, with a warning, where that is not possible."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if sys.platform != "linux" or compiler is None:
        return _unavailable("no C compiler (cc, gcc or $CC) was found")
    folder = tempfile.mkdtemp(prefix="densenet-kernels-")
    source, library = os.path.join(folder, "kernels.c"), os.path.join(folder, "kernels.so")
    with open(source, "w") as f:
        f.write(_SOURCE)
    try:
        # -march=native: built on the machine that runs it, for this process only
        subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-pipe",
                        source, "-o", library], check=True, capture_output=True, text=True,
                       timeout=120)
        # torch has loaded its OpenMP runtime already; the kernels share its thread pool
        lib = ctypes.CDLL(library)
    except subprocess.CalledProcessError as error:
        detail = (error.stderr or "").strip().splitlines() or [f"exit status {error.returncode}"]
        return _unavailable(f"{compiler} failed: {detail[0]}")
    except (OSError, subprocess.SubprocessError) as error:
        return _unavailable(f"{compiler} could not build them: {error}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    arguments = {"norm_relu": [ptr, i64, i64, i64, ptr, ptr, ptr],
                 "norm_relu_backward": [ptr, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr],
                 "stats": [ptr, i64, i64, ptr, i64, ptr, ptr]}
    for name, types in arguments.items():
        for suffix in _SUFFIX.values():
            getattr(lib, f"{name}_{suffix}").argtypes = types + [ctypes.c_int]  # + threads
    return lib


def _unavailable(reason: str) -> None:
    warnings.warn(f"fused.py: the fused CPU kernels are unavailable ({reason}); dense blocks "
                  "use ATen operations instead: the same results, slower", stacklevel=3)
    return None


def available(x: Tensor) -> bool:
    """Whether a block input can take the fused path: channels-last, eager, and float32 or
    float64 with the C kernels on the CPU, float32 or bfloat16 with the Triton kernels on
    CUDA (bfloat16 features, float32 statistics and gradient sums)."""
    if (x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last)
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)):
        return False
    if _backend(x) == "triton":
        return x.dtype in (torch.float32, torch.bfloat16) and _triton() is not None
    return x.device.type == "cpu" and x.dtype in _SUFFIX and _library() is not None


@functools.cache
def _triton():
    """triton_kernels.py, imported once; None, with a warning, where Triton is missing."""
    try:
        import triton_kernels
    except ImportError as error:
        return _unavailable(f"Triton cannot be imported: {error}")
    return triton_kernels


def _backend(x: Tensor) -> str:
    """Which kernels run on ``x``: Triton on CUDA, C on the CPU (tests point it at Triton's
    interpreter on the CPU)."""
    return "triton" if x.device.type == "cuda" else "c"


def _call(name: str, dtype: torch.dtype, *args) -> None:
    # tensors as pointers; None is NULL
    converted = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, Tensor) else a for a in args]
    getattr(_library(), f"{name}_{_SUFFIX[dtype]}")(*converted, torch.get_num_threads())


def _norm_relu(x: Tensor, ldx: int, pixels: int, channels: int, scale: Tensor, shift: Tensor,
               out: Tensor) -> None:
    if _backend(x) == "triton":
        return _triton().norm_relu(x, ldx, pixels, channels, scale, shift, out)
    _call("norm_relu", x.dtype, x, ldx, pixels, channels, scale, shift, out)


def _norm_relu_backward(g: Tensor, y: Tensor, x: Tensor, ldx: int, pixels: int, channels: int,
                        mean: Tensor, a: Tensor, out: Tensor, ldo: int) -> Tensor:
    """Adds the gradient into ``out``; returns the two per-channel sums, (2, C) float64."""
    if _backend(x) == "triton":
        return _triton().norm_relu_backward(g, y, x, ldx, pixels, channels, mean, a, out, ldo)
    sums = torch.empty(2, channels, dtype=torch.float64)
    _call("norm_relu_backward", x.dtype, g, y, x, ldx, pixels, channels, mean, a, out, ldo,
          sums[0], sums[1])
    return sums


class SharedFeatures:
    """One dense block's features, written once into a channels-last buffer, with their statistics.

    ``buffer[:, :filled]`` holds the block input and every layer output so far; ``mean`` and
    ``var`` (biased) their per-channel batch statistics, used in training mode. ``grad`` is
    the gradient of the whole buffer: ``gather`` starts it in backward and every layer adds
    its share, so it is complete from the last channels down to the first; ``finish_grad``
    hands each feature's part on.
    """

    def __init__(self, buffer: Tensor, filled: int = 0) -> None:
        self.buffer, self.filled = buffer, filled
        n, channels, h, w = buffer.shape
        self.pixels = n * h * w
        # low-precision features keep float32 statistics and a float32 gradient buffer
        low = buffer.dtype in (torch.bfloat16, torch.float16)
        self.accumulate = torch.float32 if low else buffer.dtype
        self.mean = buffer.new_empty(channels, dtype=self.accumulate)
        self.var = buffer.new_empty(channels, dtype=self.accumulate)
        self.grad: Tensor | None = None

    @classmethod
    def for_block(cls, first: Tensor, channels: int) -> SharedFeatures:
        """A buffer of ``channels`` for a block whose input is ``first``."""
        n, _, h, w = first.shape
        shared = cls(torch.empty((n, channels, h, w), dtype=first.dtype, device=first.device,
                                 memory_format=torch.channels_last))
        shared.append(first)
        return shared

    @classmethod
    def holding(cls, features: Tensor, batch_stats: bool) -> SharedFeatures:
        """``features`` alone, as the buffer itself (no copy); statistics only if asked for."""
        shared = cls(features, filled=features.shape[1])
        if batch_stats:
            shared.mean[:], shared.var[:] = _channel_stats(features)
        return shared

    def append(self, feature: Tensor) -> None:
        """Copy ``feature`` into the next channels, and note its batch statistics."""
        feature = feature.contiguous(memory_format=torch.channels_last)
        start = self.filled
        self.filled += feature.shape[1]
        self.mean[start:self.filled], self.var[start:self.filled] = _channel_stats(
            feature, copy_to=self.buffer[:, start:])

    def prefix(self, channels: int) -> Tensor:
        return self.buffer[:, :channels]

    def start_grad(self, grad: Tensor) -> None:
        """Begin backward with the gradient from the block's output (or zeros)."""
        self.grad = grad
        self.grad_x_coefficient = grad.new_zeros(grad.shape[1])
        self.grad_constant = grad.new_zeros(grad.shape[1])

    def finish_grad(self, start: int, end: int) -> Tensor:
        """The complete gradient of channels start:end, whose every user has run backward.

        A layer's BatchNorm passes gradient through its batch mean and variance as
        ``x * b + d`` per channel, and every later layer sees the same ``x``: the layers only
        sum their ``b`` and ``d``, and the sum is applied here once, to these channels.
        """
        grad = self.grad[:, start:end]
        coefficient = self.grad_x_coefficient[start:end].view(1, -1, 1, 1)
        grad.addcmul_(self.buffer[:, start:end], coefficient)
        grad.add_(self.grad_constant[start:end].view(1, -1, 1, 1))
        return grad.to(self.buffer.dtype)


@torch.no_grad()
def _channel_stats(feature: Tensor, copy_to: Tensor | None = None) -> Tensor:
    """Mean and biased variance per channel (a (2, C) float64 tensor) of a dense channels-last
    ``feature``, in one pass that also copies it into ``copy_to`` (a buffer's channel slice)."""
    channels = feature.shape[1]
    pixels, pixel_stride = feature.numel() // channels, 0 if copy_to is None else copy_to.stride(-1)
    if _backend(feature) == "triton":
        return _triton().stats(feature, pixels, channels, copy_to, pixel_stride)
    stats = torch.empty(2, channels, dtype=torch.float64)
    _call("stats", feature.dtype, feature, pixels, channels, copy_to, pixel_stride, stats[0], stats[1])
    return stats


def _update_running_stats(norm: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """What nn.BatchNorm2d does to its running statistics in training mode (unbiased var).

    Skipped where the counter is hidden: a recomputation must not count a batch twice.
    """
    if not norm.track_running_stats or norm.num_batches_tracked is None:
        return
    norm.num_batches_tracked.add_(1)
    factor = norm.momentum if norm.momentum is not None else 1 / norm.num_batches_tracked.item()
    norm.running_mean.lerp_(mean, factor)
    norm.running_var.lerp_(var * (count / max(count - 1, 1)), factor)


def _normalise(shared: SharedFeatures, norm: nn.BatchNorm2d, weight: Tensor, bias: Tensor,
               statistics: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """relu(batch_norm(the first C channels of the buffer)) in one pass: (out, mean, invstd).

    In training mode the batch statistics are the buffer's and the running ones are updated,
    unless ``statistics`` (mean, invstd) are given: a recomputation repeats the forward's.
    """
    channels = weight.shape[0]
    if statistics is not None:
        mean, invstd = statistics
    else:
        if norm.training:
            mean, var = shared.mean[:channels].clone(), shared.var[:channels]
            _update_running_stats(norm, mean, var, shared.pixels)
        else:
            mean, var = norm.running_mean.clone(), norm.running_var
        invstd = torch.rsqrt(var + norm.eps)
    scale = weight * invstd
    shift = bias - mean * scale
    x = shared.prefix(channels)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    _norm_relu(x, shared.buffer.shape[1], shared.pixels, channels, scale, shift, out)
    return out, mean, invstd


def _normalise_backward(shared: SharedFeatures, grad_out: Tensor, out: Tensor, weight: Tensor,
                        mean: Tensor, invstd: Tensor, batch_stats: bool,
                        newest_channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``_normalise``: adds the input gradient into the block's gradient buffer
    and returns (the newest feature's complete gradient, grad weight, grad bias)."""
    channels, pixels = weight.shape[0], shared.pixels
    x = shared.prefix(channels)
    g = grad_out.contiguous(memory_format=torch.channels_last)
    if shared.grad is None:  # a SharedFeatures.holding one tensor
        shared.start_grad(torch.zeros_like(shared.buffer, dtype=shared.accumulate))
    a = weight * invstd
    sums = _norm_relu_backward(g, out, x, shared.buffer.shape[1], pixels, channels, mean, a,
                               shared.grad, shared.buffer.shape[1])
    sum_g, sum_gx = sums.to(weight.dtype)
    if batch_stats:  # the part of the gradient through the batch mean and variance
        b = -a * invstd * invstd * sum_gx / pixels
        shared.grad_x_coefficient[:channels] += b
        shared.grad_constant[:channels] += -a * sum_g / pixels - b * mean
    newest = shared.finish_grad(channels - newest_channels, channels)
    return newest, sum_gx * invstd, sum_g


class _NormReLU(torch.autograd.Function):
    """relu(batch_norm(first C channels of the buffer)), one pass; backward into the block's grad.

    The autograd input is the newest feature only: this layer is the last in backward to use
    it, so its gradient in ``shared.grad`` is complete when this backward returns it. Older
    features are passed on by the layers before this one.
    """

    @staticmethod
    def forward(ctx, newest: Tensor, weight: Tensor, bias: Tensor, shared: SharedFeatures,
                norm: nn.BatchNorm2d) -> Tensor:
        out, mean, invstd = _normalise(shared, norm, weight, bias)
        ctx.save_for_backward(out, weight, mean, invstd)
        ctx.shared, ctx.batch_stats = shared, norm.training
        ctx.newest_channels = newest.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out, weight, mean, invstd = ctx.saved_tensors
        return (*_normalise_backward(ctx.shared, grad_out, out, weight, mean, invstd,
                                     ctx.batch_stats, ctx.newest_channels), None, None)


class _NormReLUConv(torch.autograd.Function):
    """conv(relu(batch_norm(first C channels of the buffer))) that keeps no activation.

    The memory-efficient mode on this path: the normalised input, C channels that grow with
    depth, is recomputed in backward from the block's buffer (one pass; the buffer is written
    once and never changed) instead of being stored, and the convolution does not run twice.
    """

    @staticmethod
    def forward(ctx, newest: Tensor, weight: Tensor, bias: Tensor, conv_weight: Tensor,
                shared: SharedFeatures, norm: nn.BatchNorm2d, conv: nn.Conv2d) -> Tensor:
        activated, mean, invstd = _normalise(shared, norm, weight, bias)
        ctx.save_for_backward(weight, bias, conv_weight, mean, invstd)
        ctx.shared, ctx.norm, ctx.conv, ctx.batch_stats = shared, norm, conv, norm.training
        ctx.newest_channels = newest.shape[1]
        return F.conv2d(activated, conv_weight, None, conv.stride, conv.padding, conv.dilation,
                        conv.groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, bias, conv_weight, mean, invstd = ctx.saved_tensors
        conv: nn.Conv2d = ctx.conv
        activated, _, _ = _normalise(ctx.shared, ctx.norm, weight, bias, (mean, invstd))
        grad_activated, grad_conv, _ = torch.ops.aten.convolution_backward(
            grad_out, activated, conv_weight, None, conv.stride, conv.padding, conv.dilation,
            False, [0, 0], conv.groups, [True, True, False])
        newest, grad_weight, grad_bias = _normalise_backward(
            ctx.shared, grad_activated, activated, weight, mean, invstd, ctx.batch_stats,
            ctx.newest_channels)
        return newest, grad_weight, grad_bias, grad_conv, None, None, None


class _Gather(torch.autograd.Function):
    """The whole buffer as the block's output; backward starts the block's gradient buffer."""

    @staticmethod
    def forward(ctx, newest: Tensor, shared: SharedFeatures) -> Tensor:
        ctx.shared, ctx.newest_channels = shared, newest.shape[1]
        return shared.buffer.view_as(shared.buffer)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        shared: SharedFeatures = ctx.shared
        shared.start_grad(grad_out.to(shared.accumulate, memory_format=torch.channels_last, copy=True))
        channels = shared.buffer.shape[1]
        return shared.finish_grad(channels - ctx.newest_channels, channels), None


def norm_relu(norm: nn.BatchNorm2d, shared: SharedFeatures, newest: Tensor) -> Tensor:
    """``relu(norm(concatenation so far))``, where ``newest`` is the last feature appended."""
    return _NormReLU.apply(newest, norm.weight, norm.bias, shared, norm)


def norm_relu_conv(norm: nn.BatchNorm2d, conv: nn.Conv2d, shared: SharedFeatures,
                   newest: Tensor) -> Tensor:
    """``conv(relu(norm(concatenation so far)))`` storing no activation (memory-efficient)."""
    return _NormReLUConv.apply(newest, norm.weight, norm.bias, conv.weight, shared, norm, conv)


def batch_norm_relu(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``relu(norm(x))`` in one pass, for a tensor that ``available`` accepts."""
    return norm_relu(norm, SharedFeatures.holding(x, norm.training), x)


def gather(shared: SharedFeatures, newest: Tensor) -> Tensor:
    """The block's full concatenation, ``newest`` being the last feature appended."""
    return _Gather.apply(newest, shared)
