"""fused.py's kernels for CUDA, in Triton: what cpu_kernels.py does on the CPU.

The same functions, with the same arguments and results. Each works on channels-last feature
maps seen as P pixels of C channels, with a pixel stride for the block buffer's channel
prefixes, and does a BatchNorm's per-channel work itself, so that one BatchNorm-ReLU costs a
handful of launches instead of dozens of tiny operations around one kernel (inside a CUDA
graph every launch costs about 2 µs however little it does; bench/kernels.py counts them):

- ``stats``: per channel mean and biased variance into the given vectors, and optionally a
  copy into the buffer (one pass over at most PARTIAL_ROWS rows of programs, each looping
  over its pixel tiles and leaving its partial sums);
- ``norm_relu``: y = relu((x - mean) * rsqrt(var + eps) * weight + bias), the scale and shift
  made per channel in the kernel, zeros in y's padding channels (a convolution's padded
  input), and the running statistics updated by the first row of programs (one pass);
- ``norm_relu_backward``: with gm = g where y > 0 and a = weight * rsqrt(var + eps),
  out (+)= gm * a, then the weight's and bias's gradients and the batch statistics' part of
  the input gradient, ``x * b + d`` per channel, added to (or written into) ``coefficients``
  (one pass, as ``stats``);
- ``finish_grad``: a feature's complete gradient, grad + x * b + d, in the features' dtype.

Arithmetic is float32 whatever the tensors hold; per-channel sums are taken per row of
programs in float32, and the last program to finish a channel tile (``_last_program``: an
atomic counter of pass_counters.py's) adds the rows in float64 in a fixed order, with no
finishing pass launched after it: the same inputs give the same sums, whichever program is
last. Comparisons are written so that NaN passes through as in ATen. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which
is how tests/unit/test_triton.py checks them without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16)  # what the tensors may hold; arithmetic is float32
TILE = 2048  # pixels x channels per program
MIN_TILE = 512  # ... or fewer, down to this, where a map would otherwise leave multiprocessors idle
MIN_PROGRAMS = 256  # about twice the multiprocessors of an H100 or H200 (132): PARTIAL_ROWS rows
# A block buffer's pixels start on 16-element boundaries (its channels padded up to a multiple
# of 16), so that loads of a pixel's channels can be vectorised; the padding is never read.
PIXEL_STRIDE_MULTIPLE = 16
# A convolution's input channels, and a dense layer's output channels, padded with zeros up to
# this multiple by dtype: cuDNN's tensor-core kernels for channels-last bfloat16 want each
# pixel's channels in whole 16 bytes (1x1 convolutions of 24 + 12i channels are not, for odd i;
# nor are growth rates of 12). float32 (TF32) wants 4: 4k + 24 and growth rates of 12 are.
CONV_CHANNEL_MULTIPLE = {torch.bfloat16: 8}
BLOCK_R = 32  # partial-sum rows a pass's last program adds at a time (float64: more would spill)
PARTIAL_ROWS = 256  # at most this many rows of partial sums per pass (partial_grid)


@triton.jit
def _scale(mean, var, weight, eps, c, cm):
    """Per channel, float32: mean, var and the scale rsqrt(var + eps) * weight."""
    m = tl.load(mean + c, mask=cm, other=0.0).to(tl.float32)
    v = tl.load(var + c, mask=cm, other=1.0).to(tl.float32)  # 1: no 0/0 in masked lanes
    return m, v, tl.load(weight + c, mask=cm, other=0.0).to(tl.float32) / tl.sqrt(v + eps)


@triton.jit
def _scale_shift(mean, var, weight, bias, eps, c, cm):
    """Per channel, float32: mean, var, and the BatchNorm's scale and shift."""
    m, v, scale = _scale(mean, var, weight, eps, c, cm)
    return m, v, scale, tl.load(bias + c, mask=cm, other=0.0).to(tl.float32) - m * scale


@triton.jit
def _move_running(rmean, rvar, c, mask, m, v, momentum, unbias):
    """The running statistics of channels ``c`` (where ``mask``) moved by ``momentum`` towards
    the batch's mean ``m`` and biased variance ``v`` (unbiased by the factor ``unbias``)."""
    running = tl.load(rmean + c, mask=mask, other=0.0)
    tl.store(rmean + c, running + momentum * (m - running), mask=mask)
    running = tl.load(rvar + c, mask=mask, other=0.0)
    tl.store(rvar + c, running + momentum * (v * unbias - running), mask=mask)


@triton.jit(do_not_specialize=["x_units", "y_units", "C_units"])
def _norm_relu_kernel(x, x_units, y, y_units, mean, var, weight, bias, eps, rmean, rvar, momentum, unbias,
                      P, C_units, ALIGN: tl.constexpr, UPDATE: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    x_stride, y_stride, C = x_units * ALIGN, y_units * ALIGN, C_units * ALIGN  # see _align
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # channel tiles vary fastest: see _tiles
    p = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    cm = c < C
    m, v, scale, shift = _scale_shift(mean, var, weight, bias, eps, c, cm)
    if UPDATE:  # the first row of programs moves the running statistics towards the batch's
        _move_running(rmean, rvar, c, cm & (tl.program_id(1) == 0), m, v, momentum, unbias)
    inside = (p[:, None] < P) & cm[None, :]
    value = tl.load(x + p[:, None] * x_stride + c[None, :], mask=inside, other=0.0).to(tl.float32)
    value = value * scale[None, :] + shift[None, :]  # 0 beyond C: scale and shift load as 0 there
    value = tl.where(value < 0, 0.0, value)  # relu that keeps NaN
    written = (p[:, None] < P) & (c[None, :] < y_stride)  # the channels and y's zero padding
    tl.store(y + p[:, None] * y_stride + c[None, :], value.to(y.dtype.element_ty), mask=written)


@triton.jit(do_not_specialize=["y_units", "x_units", "out_units", "C_units"])
def _norm_relu_backward_kernel(g, y, y_units, x, x_units, out, out_units, mean, var, weight, eps, part_g,
                               part_gx, counters, grad_weight, grad_bias, coefficients, coefficients_stride,
                               P, C_units, tiles, ALIGN: tl.constexpr, ACCUMULATE: tl.constexpr,
                               COEFFICIENTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                               BLOCK_R: tl.constexpr):
    y_stride, x_stride, out_stride = y_units * ALIGN, x_units * ALIGN, out_units * ALIGN  # see _align
    C = C_units * ALIGN
    row, rows = tl.program_id(1), tl.num_programs(1)  # this program's pixel tiles: row, row + rows, ...
    c1 = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m, _, a = _scale(mean, var, weight, eps, c1, c1 < C)
    c = c1[None, :]
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    for tile in range(row, tiles, rows):
        p = (tile * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
        inside = (p < P) & (c < C)
        gv = tl.load(g + p * y_stride + c, mask=inside, other=0.0).to(tl.float32)
        yv = tl.load(y + p * y_stride + c, mask=inside, other=0.0).to(tl.float32)
        xv = tl.load(x + p * x_stride + c, mask=inside, other=0.0).to(tl.float32)
        gm = tl.where(yv <= 0, 0.0, gv)  # a NaN output passes its gradient on
        o = gm * a[None, :]
        if ACCUMULATE:
            o += tl.load(out + p * out_stride + c, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + p * out_stride + c, o.to(out.dtype.element_ty), mask=inside)
        centred = tl.where(inside, xv - m[None, :], 0.0)
        sum_g += tl.sum(gm, axis=0)
        sum_gx += tl.sum(gm * centred, axis=0)
    tl.store(part_g + row * C + c1, sum_g, mask=c1 < C)
    tl.store(part_gx + row * C + c1, sum_gx, mask=c1 < C)
    if _last_program(counters + tl.program_id(0), rows):  # the BatchNorm's per-channel work, once
        total_g, total_gx = _add_rows(part_g, part_gx, rows, C, c1, c1 < C, BLOCK_R, BLOCK_C, ".cg")
        _finish_backward(total_g, total_gx, P, c1, c1 < C, mean, var, weight, eps, grad_weight, grad_bias,
                         coefficients, coefficients_stride, COEFFICIENTS, ACCUMULATE)


@triton.jit(do_not_specialize=["f_units", "dst_units", "C_units"])
def _stats_kernel(f, f_units, P, C_units, dst, dst_units, part_s, part_ss, counters, mean, var, tiles,
                  ALIGN: tl.constexpr, COPY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    f_stride, dst_stride, C = f_units * ALIGN, dst_units * ALIGN, C_units * ALIGN  # see _align
    row, rows = tl.program_id(1), tl.num_programs(1)  # this program's pixel tiles: row, row + rows, ...
    c1 = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c1[None, :]
    # sums about the first pixel's value, which keeps E[x^2] - E[x]^2 from cancelling
    first = tl.load(f + c, mask=c < C, other=0.0).to(tl.float32)
    s = tl.zeros([BLOCK_C], tl.float32)
    ss = tl.zeros([BLOCK_C], tl.float32)
    for tile in range(row, tiles, rows):
        p = (tile * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
        inside = (p < P) & (c < C)
        v = tl.load(f + p * f_stride + c, mask=inside, other=0.0)
        if COPY:
            tl.store(dst + p * dst_stride + c, v.to(dst.dtype.element_ty), mask=inside)
        d = tl.where(inside, v.to(tl.float32) - first, 0.0)
        s += tl.sum(d, axis=0)
        ss += tl.sum(d * d, axis=0)
    tl.store(part_s + row * C + c1, s, mask=c1 < C)
    tl.store(part_ss + row * C + c1, ss, mask=c1 < C)
    if _last_program(counters + tl.program_id(0), rows):  # the rows' sums, once
        total_s, total_ss = _add_rows(part_s, part_ss, rows, C, c1, c1 < C, BLOCK_R, BLOCK_C, ".cg")
        total_s = total_s / P
        centre = tl.load(f + c1, mask=c1 < C, other=0.0).to(tl.float64)
        tl.store(mean + c1, (centre + total_s).to(mean.dtype.element_ty), mask=c1 < C)
        v = total_ss / P - total_s * total_s
        tl.store(var + c1, tl.where(v < 0, 0.0, v).to(var.dtype.element_ty), mask=c1 < C)  # NaN stays


@triton.jit
def _last_program(counter, programs):
    """Whether this program is the last of ``programs`` to reach here, once the stores of all
    its threads are visible to the others (a barrier, then one thread's acquire-release atomic);
    the last sets the counter back to zero for the next pass. Its loads of what the others
    wrote must read past the multiprocessor's cache (``.cg``)."""
    tl.debug_barrier()  # every thread's stores before this program's arrival is counted
    last = tl.atomic_add(counter, 1, sem="acq_rel") == programs - 1
    if last:
        tl.atomic_xchg(counter, 0, sem="relaxed")
    return last


@triton.jit
def _add_rows(part_u, part_v, blocks, C, c, cm, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              CACHE: tl.constexpr = ""):
    """Per channel, the sums over ``blocks`` rows of two (blocks, C) partial sums, in float64
    and in a fixed order (``CACHE`` ".cg": read past the multiprocessor's own cache, for sums
    other programs of the same launch wrote)."""
    u = tl.zeros([BLOCK_C], tl.float64)
    v = tl.zeros([BLOCK_C], tl.float64)
    for start in range(0, blocks, BLOCK_R):
        r = (start + tl.arange(0, BLOCK_R))[:, None]
        mask = (r < blocks) & cm[None, :]
        u += tl.sum(tl.load(part_u + r * C + c[None, :], mask=mask, other=0.0, cache_modifier=CACHE)
                    .to(tl.float64), axis=0)
        v += tl.sum(tl.load(part_v + r * C + c[None, :], mask=mask, other=0.0, cache_modifier=CACHE)
                    .to(tl.float64), axis=0)
    return u, v


@triton.jit
def _finish_backward(sum_g, sum_gx, P, c, cm, mean, var, weight, eps, grad_weight, grad_bias, coefficients,
                     coefficients_stride, COEFFICIENTS: tl.constexpr, ACCUMULATE: tl.constexpr):
    """A BatchNorm backward's per-channel work for channels ``c`` from the sums over its pixels
    of gm and gm * (x - mean): the weight's and bias's gradients, and the coefficients."""
    sum_g, sum_gx = sum_g.to(tl.float32), sum_gx.to(tl.float32)
    m = tl.load(mean + c, mask=cm, other=0.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(tl.load(var + c, mask=cm, other=1.0).to(tl.float32) + eps)
    a = tl.load(weight + c, mask=cm, other=0.0).to(tl.float32) * invstd
    tl.store(grad_weight + c, sum_gx * invstd, mask=cm)
    tl.store(grad_bias + c, sum_g, mask=cm)
    if COEFFICIENTS:  # the gradient through the batch mean and variance: x * b + d
        b = -a * invstd * invstd * sum_gx / P
        d = -a * sum_g / P - b * m
        if ACCUMULATE:
            b += tl.load(coefficients + c, mask=cm, other=0.0)
            d += tl.load(coefficients + coefficients_stride + c, mask=cm, other=0.0)
        tl.store(coefficients + c, b, mask=cm)
        tl.store(coefficients + coefficients_stride + c, d, mask=cm)


@triton.jit(do_not_specialize=["grad_units", "x_units", "C_units", "width_units"])
def _finish_grad_kernel(grad, grad_units, x, x_units, coefficients, coefficients_stride, out, P, C_units,
                        width_units, ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    grad_stride, x_stride, C, width = grad_units * ALIGN, x_units * ALIGN, C_units * ALIGN, width_units * ALIGN
    p = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
    c1 = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.load(coefficients + c1, mask=c1 < C, other=0.0)[None, :]
    d = tl.load(coefficients + coefficients_stride + c1, mask=c1 < C, other=0.0)[None, :]
    c = c1[None, :]
    inside = (p < P) & (c < C)
    value = tl.load(grad + p * grad_stride + c, mask=inside, other=0.0).to(tl.float32)
    value += tl.load(x + p * x_stride + c, mask=inside, other=0.0).to(tl.float32) * b + d
    # out's channels past C are zeros (a padded feature's, fused.SharedFeatures.finish_grad)
    tl.store(out + p * width + c, value.to(out.dtype.element_ty), mask=(p < P) & (c < width))


def _align(*counts: int) -> int:
    """The largest of 8, 4, 2 and 1 that divides every channel count and pixel stride of a
    launch. The kernels take those as multiples of it (``C_units * ALIGN``), which tells
    Triton's compiler that a pixel's channels start on ALIGN-element boundaries and that a
    channel mask is the same across ALIGN neighbours: it then loads and stores 16 bytes at a
    time (a float32 map of 4k + 24 channels, every k, and bfloat16 maps of a multiple of 8).
    Passed as they are, counts that are not multiples of 16 gave it neither fact, and every
    element was loaded on its own (bench/kernels.py --ptx counts them)."""
    align = 8
    while any(count % align for count in counts):
        align //= 2
    return align


def _tiles(P: int, C: int) -> tuple[tuple[int, int], int, int]:
    """The grid (channel tiles, pixel tiles) and tile (pixels, channels) for a P x C map; the
    channel tile varies fastest, so that programs running together read neighbouring channels of
    the same pixels, whole rows of memory, rather than one tile of many pixels each. A channel width of 16, 32 or 64
    that leaves the fewest lanes idle on C (growth rates of 12 to 48 fill a 32-wide tile a
    third to three quarters), the widest among equals, and TILE elements in all; halved down
    to MIN_TILE while that leaves fewer than MIN_PROGRAMS programs, so that a small map still
    spreads over the GPU where its work allows."""
    block_c = min((16, 32, 64), key=lambda width: (-(-C // width) * width - C, -width))
    block_p = TILE // block_c
    while block_p * block_c > MIN_TILE and triton.cdiv(P, block_p) * triton.cdiv(C, block_c) < MIN_PROGRAMS:
        block_p //= 2
    return (triton.cdiv(C, block_c), triton.cdiv(P, block_p)), block_p, block_c


def partial_grid(P: int, C: int) -> tuple[tuple[int, int], int, int, int]:
    """For the passes that leave per-channel partial sums (stats, norm_relu_backward): at
    most PARTIAL_ROWS rows of programs, each looping over every rows-th pixel tile, so that
    the last program adds few rows however large the map, while the pass keeps rows x
    channel tiles programs (256 rows: about twice a 132-SM GPU's multiprocessors for a single
    channel tile). Returns the grid (channel tiles, rows), the tile and the pixel tiles."""
    (channel_tiles, tiles), block_p, block_c = _tiles(P, C)
    return (channel_tiles, min(tiles, PARTIAL_ROWS)), block_p, block_c, tiles


def stats(f: Tensor, f_stride: int, P: int, C: int, dst: Tensor | None, dst_stride: int, mean: Tensor,
          var: Tensor, counters: Tensor | None = None) -> None:
    """Mean and biased variance per channel of ``f`` (P x C, pixel stride ``f_stride``) into
    ``mean`` and ``var``, copying ``f`` into ``dst`` (pixel stride ``dst_stride``) unless it is None
    (``counters``: see ``counters_for``)."""
    grid, block_p, block_c, tiles = partial_grid(P, C)
    parts = torch.empty(2, grid[1], C, dtype=torch.float32, device=f.device)
    align = _align(f_stride, C, dst_stride)
    _stats_kernel[grid](f, f_stride // align, P, C // align, f if dst is None else dst, dst_stride // align,
                        parts[0], parts[1], counters_for(C, f.device, counters), mean, var, tiles, ALIGN=align,
                        COPY=dst is not None, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_R=BLOCK_R)


def norm_relu(x: Tensor, x_stride: int, P: int, C: int, mean: Tensor, var: Tensor, weight: Tensor,
              bias: Tensor, eps: float, y: Tensor, y_stride: int, running_mean: Tensor | None = None,
              running_var: Tensor | None = None, momentum: float = 0.0) -> None:
    """y = relu(batch_norm(x)) with the given statistics, on y's pixel stride ``y_stride``
    (>= C; the channels beyond C are written as zeros); the running statistics move by
    ``momentum`` towards the batch's (the variance unbiased) where given."""
    update = running_mean is not None
    grid, block_p, block_c = _tiles(P, y_stride)  # its programs write y's padding too
    align = _align(x_stride, y_stride, C)
    _norm_relu_kernel[grid](
        x, x_stride // align, y, y_stride // align, mean, var, weight, bias, eps, running_mean if update else mean,
        running_var if update else var, momentum, P / max(P - 1, 1), P, C // align, ALIGN=align,
        UPDATE=update, BLOCK_P=block_p, BLOCK_C=block_c)


def norm_relu_backward(g: Tensor, y: Tensor, y_stride: int, x: Tensor, x_stride: int, P: int, C: int,
                       mean: Tensor, var: Tensor, weight: Tensor, eps: float, out: Tensor, out_stride: int,
                       accumulate: bool, coefficients: Tensor | None,
                       counters: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Adds (or with ``accumulate`` False writes) the gradient into ``out`` and the batch
    statistics' part into ``coefficients`` (rows b and d) unless None; returns the
    gradients of weight and bias. ``g`` and ``y`` are on the pixel stride ``y_stride``
    (``counters``: see ``counters_for``)."""
    grid, block_p, block_c, tiles = partial_grid(P, C)
    parts = torch.empty(2, grid[1], C, dtype=torch.float32, device=x.device)
    grad_weight = torch.empty(C, dtype=weight.dtype, device=weight.device)
    grad_bias = torch.empty(C, dtype=weight.dtype, device=weight.device)
    use = coefficients is not None
    align = _align(y_stride, x_stride, out_stride, C)
    _norm_relu_backward_kernel[grid](g, y, y_stride // align, x, x_stride // align, out, out_stride // align,
                                     mean, var, weight, eps, parts[0], parts[1], counters_for(C, x.device, counters),
                                     grad_weight, grad_bias, coefficients if use else grad_bias,
                                     coefficients.stride(0) if use else 0, P, C // align, tiles, ALIGN=align,
                                     ACCUMULATE=accumulate, COEFFICIENTS=use, BLOCK_P=block_p, BLOCK_C=block_c,
                                     BLOCK_R=BLOCK_R)
    return grad_weight, grad_bias


def counters_for(channels: int, device: torch.device, counters: Tensor | None) -> Tensor:
    """``counters`` (pass_counters.py), by which a pass's last program to finish a channel tile
    finds itself, or where None or too few, fresh zeros."""
    slots = triton.cdiv(channels, 16) + 1  # a tile of 16 channels at the narrowest, and the GEMM forward's
    if counters is None or counters.numel() < slots:
        return torch.zeros(slots, dtype=torch.int32, device=device)
    return counters


def finish_grad(grad: Tensor, grad_stride: int, x: Tensor, x_stride: int, coefficients: Tensor,
                dtype: torch.dtype, width: int) -> Tensor:
    """grad + x * b + d per channel (``coefficients`` rows b and d), in ``dtype``, with zero
    channels up to ``width``; grad and x are (N, C, H, W) channel slices of channels-last
    buffers, pixel strides ``grad_stride`` and ``x_stride``."""
    n, channels, h, w = grad.shape
    out = torch.empty((n, width, h, w), dtype=dtype, device=grad.device, memory_format=torch.channels_last)
    pixels = n * h * w
    grid, block_p, block_c = _tiles(pixels, width)
    align = _align(grad_stride, x_stride, channels, width)
    _finish_grad_kernel[grid](grad, grad_stride // align, x, x_stride // align, coefficients,
                              coefficients.stride(0), out, pixels, channels // align, width // align,
                              ALIGN=align, BLOCK_P=block_p, BLOCK_C=block_c)
    return out
