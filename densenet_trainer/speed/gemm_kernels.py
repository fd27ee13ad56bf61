"""A DenseNet-BC layer's 1x1 convolution as Triton GEMMs that apply its BatchNorm-ReLU on load.

On the fused path (fused.py) a bottleneck layer's first BatchNorm-ReLU writes all C input
channels of the block's buffer out in full, only for cuDNN's 1x1 convolution to read them back,
and its gradient makes the same round trip: most of the bytes a step moves. Here the
convolution reads the block's buffer itself and normalises each tile as it loads it, so the
activation is never written, in forward or backward (the memory-efficient mode's promise
holds by construction: no activation stored, no convolution run twice):

- ``norm_relu_matmul``: out[P, N] = relu(x * scale + shift)[P, C] @ W[C, N], the scale and
  shift made per channel from the batch statistics in the kernel, the running statistics moved
  by the first row of programs, and in its epilogue each program's per-channel count, mean
  and sum of squared deviations of ``out``: the next BatchNorm's batch statistics, combined
  by the pass's last program to finish (Chan's parallel formula, in float64, in a fixed order), instead of
  a pass of its own over ``out``;
- ``norm_relu_matmul_backward``: one pass that, per tile of pixels and input channels,
  computes the data gradient ``g @ W^T``, masks it with the ReLU (recomputed from x: nothing
  was stored), adds it into the block's gradient buffer times the BatchNorm's scale, sums the
  BatchNorm backward's per-channel partial sums, and the weight gradient's share of its
  pixels, ``relu(...)^T @ g``; the pixels are split over rows of programs in a fixed way and
  the rows' shares summed in a fixed order (no atomics: the same inputs give the same sums).
  The last row of programs to finish a channel tile does the BatchNorm's per-channel work for it
  (triton_kernels.py's, as its own passes do: ``_last_program``).

Arithmetic and sums are float32; the GEMMs take bfloat16 operands where the features are
bfloat16, and float32 ones as TF32 where cuDNN's convolutions may (``torch.backends.cudnn.
allow_tf32``), IEEE float32 otherwise. Under ``TRITON_INTERPRET=1`` the same kernels run on
CPU tensors (tests/unit/test_gemm.py checks them there against float64).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from densenet_trainer.speed.triton_kernels import (
    BLOCK_R,
    _add_rows,
    _align,
    _finish_backward,
    _last_program,
    _move_running,
    _scale_shift,
    counters_for,
)

DTYPES = (torch.float32, torch.bfloat16)
MAX_N = 128  # output channels one program holds in full: 4k for growth rates up to 32
BLOCK_P = 64  # pixels a tile ...
MIN_BLOCK_P = 32  # ... or fewer, down to this, where a forward pass would leave multiprocessors idle
SMS = 132  # multiprocessors of an H100 or H200
TARGET_PROGRAMS = 2 * SMS  # a backward pass's rows x channel tiles: the GPU filled about twice
SUM_ROWS, SUM_COLUMNS = 32, 128  # the weight gradient's shares, summed a tile of rows x columns at a time
COMBINE_ROWS = 8  # rows the forward's last program combines at a time (float64: more spill registers)
BLOCK_K = 32  # input channels a tile
# Triton's interpreter multiplies bfloat16 matrices as raw 16-bit integers: there the operands
# go to float32 first, which gives the same products (those of two bfloat16 are exact in float32)
UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, float32 sums (UPCAST: see above)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's combination of two sets' counts, means and sums of squared deviations."""
    count = count_a + count_b
    delta = mean_b - mean_a
    share = count_b / tl.where(count > 0, count, 1.0)  # 0 where both sets are empty (masked channels)
    return count, mean_a + delta * share, m2_a + m2_b + delta * delta * count_a * share


@triton.jit(do_not_specialize=["x_units", "C_units"])
def _norm_relu_matmul_kernel(x, x_units, w, out, mean, var, weight, bias, eps, rmean, rvar, momentum,
                             unbias, parts, counter, stats, P, C_units, N, tiles, ALIGN: tl.constexpr,
                             UPDATE: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
                             UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_N: tl.constexpr, COMBINE_ROWS: tl.constexpr):
    x_stride, C = x_units * ALIGN, C_units * ALIGN  # see triton_kernels._align
    row, rows = tl.program_id(0), tl.num_programs(0)  # this program's pixel tiles: row, row + rows, ...
    if UPDATE and row == 0:  # one program moves the running statistics towards the batch's
        for start in range(0, C, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            m, v, _, _ = _scale_shift(mean, var, weight, bias, eps, k, k < C)
            _move_running(rmean, rvar, k, k < C, m, v, momentum, unbias)
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    count = tl.zeros([BLOCK_N], tl.float32)
    mu = tl.zeros([BLOCK_N], tl.float32)
    m2 = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(row, tiles, rows):
        p = (tile * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        pm = p < P
        acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)
        for start in range(0, C, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            km = k < C
            _, _, scale, shift = _scale_shift(mean, var, weight, bias, eps, k, km)
            inside = pm[:, None] & km[None, :]
            a = tl.load(x + p[:, None] * x_stride + k[None, :], mask=inside, other=0.0).to(tl.float32)
            a = a * scale[None, :] + shift[None, :]
            a = tl.where(inside, tl.where(a < 0, 0.0, a), 0.0)  # relu that keeps NaN
            wt = tl.load(w + n[None, :] * C + k[:, None], mask=km[:, None] & nm[None, :], other=0.0)
            acc = _dot(a.to(wt.dtype), wt, acc, PRECISION, UPCAST)
        written = pm[:, None] & nm[None, :]
        value = acc.to(out.dtype.element_ty)
        tl.store(out + p[:, None] * N + n[None, :], value, mask=written)
        if STATS:  # the tile's count, mean and squared deviations of the values as stored
            tile_count = tl.minimum(P - tile * BLOCK_P, BLOCK_P).to(tl.float32)
            f = tl.where(written, value.to(tl.float32), 0.0)
            tile_mean = tl.sum(f, axis=0) / tile_count
            d = tl.where(written, f - tile_mean[None, :], 0.0)
            count, mu, m2 = _merge(count, mu, m2, tile_count, tile_mean, tl.sum(d * d, axis=0))
    if STATS:  # the rows' moments, then the last program to finish combines them
        tl.store(parts + row * N + n, count, mask=nm)
        tl.store(parts + (rows + row) * N + n, mu, mask=nm)
        tl.store(parts + (2 * rows + row) * N + n, m2, mask=nm)
        if _last_program(counter, rows):
            _combine_moments(parts, rows, N, n, nm, stats, COMBINE_ROWS, BLOCK_N)


@triton.jit
def _combine_moments(parts, rows, N, n, nm, stats, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per channel, the mean and biased variance from ``rows`` rows of counts, means and
    squared deviations: Chan's combination in float64, in a fixed order, into stats[0] and
    stats[1]. The rows were written by other programs: read past this one's cache."""
    count = tl.zeros([BLOCK_N], tl.float64)
    mu = tl.zeros([BLOCK_N], tl.float64)
    m2 = tl.zeros([BLOCK_N], tl.float64)
    for start in range(0, rows, BLOCK_R):
        r = (start + tl.arange(0, BLOCK_R))[:, None]
        mask = (r < rows) & nm[None, :]
        at = parts + r * N + n[None, :]
        c = tl.load(at, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        row_mean = tl.load(at + rows * N, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        row_m2 = tl.load(at + 2 * rows * N, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        chunk = tl.sum(c, axis=0)
        chunk_mean = tl.sum(c * row_mean, axis=0) / tl.where(chunk > 0, chunk, 1.0)
        d = tl.where(mask, row_mean - chunk_mean[None, :], 0.0)
        count, mu, m2 = _merge(count, mu, m2, chunk, chunk_mean, tl.sum(row_m2 + c * d * d, axis=0))
    tl.store(stats + n, mu.to(stats.dtype.element_ty), mask=nm)
    tl.store(stats + N + n, (m2 / tl.where(count > 0, count, 1.0)).to(stats.dtype.element_ty), mask=nm)


@triton.jit(do_not_specialize=["x_units", "out_units", "C_units"])
def _norm_relu_matmul_backward_kernel(g, w, x, x_units, out, out_units, mean, var, weight, bias, eps,
                                      part_g, part_gx, part_w, counters, grad_weight, grad_bias, coefficients,
                                      coefficients_stride, P, C_units, N, tiles, ALIGN: tl.constexpr,
                                      ACCUMULATE: tl.constexpr, COEFFICIENTS: tl.constexpr,
                                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr,
                                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    x_stride, out_stride, C = x_units * ALIGN, out_units * ALIGN, C_units * ALIGN
    row, rows = tl.program_id(1), tl.num_programs(1)  # this program's pixel tiles: row, row + rows, ...
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # channel tiles vary fastest, as triton_kernels
    km = k < C
    m, _, scale, shift = _scale_shift(mean, var, weight, bias, eps, k, km)
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    wt = tl.load(w + n[:, None] * C + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)  # (N, K)
    sum_g = tl.zeros([BLOCK_K], tl.float32)
    sum_gx = tl.zeros([BLOCK_K], tl.float32)
    grad_w = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for tile in range(row, tiles, rows):
        p = (tile * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        pm = p < P
        inside = pm[:, None] & km[None, :]
        gv = tl.load(g + p[:, None] * N + n[None, :], mask=pm[:, None] & nm[None, :], other=0.0).to(wt.dtype)
        xv = tl.load(x + p[:, None] * x_stride + k[None, :], mask=inside, other=0.0).to(tl.float32)
        pre = xv * scale[None, :] + shift[None, :]
        grad_a = _dot(gv, wt, tl.zeros([BLOCK_P, BLOCK_K], tl.float32), PRECISION, UPCAST)  # the activation's gradient, (P, K)
        gm = tl.where(inside & ~(pre <= 0), grad_a, 0.0)  # through the ReLU; NaN passes, as in ATen
        o = gm * scale[None, :]
        if ACCUMULATE:
            o += tl.load(out + p[:, None] * out_stride + k[None, :], mask=inside, other=0.0).to(tl.float32)
        tl.store(out + p[:, None] * out_stride + k[None, :], o.to(out.dtype.element_ty), mask=inside)
        sum_g += tl.sum(gm, axis=0)
        sum_gx += tl.sum(gm * tl.where(inside, xv - m[None, :], 0.0), axis=0)
        a = tl.where(inside, tl.where(pre < 0, 0.0, pre), 0.0)
        grad_w = _dot(tl.trans(a.to(wt.dtype)), gv, grad_w, PRECISION, UPCAST)
    tl.store(part_g + row * C + k, sum_g, mask=km)
    tl.store(part_gx + row * C + k, sum_gx, mask=km)
    tl.store(part_w + row * N * C + n[None, :] * C + k[:, None], grad_w, mask=km[:, None] & nm[None, :])
    # the last row to finish these channels does the BatchNorm's per-channel work for them
    if _last_program(counters + tl.program_id(0), rows):
        total_g, total_gx = _add_rows(part_g, part_gx, rows, C, k, km, BLOCK_R, BLOCK_K, ".cg")
        _finish_backward(total_g, total_gx, P, k, km, mean, var, weight, eps, grad_weight, grad_bias, coefficients,
                         coefficients_stride, COEFFICIENTS, ACCUMULATE)


@triton.jit
def _sum_rows_kernel(parts, blocks, size, out, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """``out`` = the sum of ``blocks`` rows of ``size`` float32 (the weight gradient's shares),
    in a fixed order, written in out's dtype (no cast afterwards)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, blocks, BLOCK_R):
        r = (start + tl.arange(0, BLOCK_R))[:, None]
        inside = (r < blocks) & (i[None, :] < size)
        total += tl.sum(tl.load(parts + r * size + i[None, :], mask=inside, other=0.0), axis=0)
    tl.store(out + i, total.to(out.dtype.element_ty), mask=i < size)


def _precision(dtype: torch.dtype) -> str:
    """The GEMMs' input precision: float32 as cuDNN's convolutions take it (TF32 where allowed:
    torch's precision settings, "none" deferring to the level above), bfloat16 as it is."""
    if dtype != torch.float32:
        return "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if not hasattr(conv, "fp32_precision"):  # a torch from before the precision settings
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    for setting in (conv, torch.backends.cudnn, torch.backends):  # reading allow_tf32 may raise here
        value = getattr(setting, "fp32_precision", "none")
        if value != "none":
            return "tf32" if value == "tf32" else "ieee"
    return "ieee"


def _warps(precision: str, dtype: torch.dtype) -> int:
    """Warps a program: 8 where the GEMMs multiply float32 without TF32 (on the FMA units, whose
    accumulators spill out of 4 warps' registers), else Triton's 4."""
    return 8 if precision == "ieee" and dtype == torch.float32 else 4


def _block_n(N: int) -> int:
    return max(16, triton.next_power_of_2(N))


def rows_of(P: int, channel_tiles: int, block_p: int) -> tuple[int, int]:
    """A pass's rows of programs and its tiles of ``block_p`` pixels: enough rows that rows x
    channel tiles fill the GPU about twice (TARGET_PROGRAMS), each row looping over every
    rows-th tile, and no more: each leaves partial sums that the last to finish, or the weight
    gradient's sum, goes through one after another."""
    tiles = triton.cdiv(P, block_p)
    return min(tiles, max(1, triton.cdiv(TARGET_PROGRAMS, channel_tiles))), tiles


def forward_tile(P: int) -> int:
    """The forward pass's pixels a tile: BLOCK_P, halved down to MIN_BLOCK_P while a map's
    tiles are fewer than the multiprocessors (a program holds all output channels of its tile:
    the forward has no channel tiles to spread over them)."""
    block_p = BLOCK_P
    while block_p > MIN_BLOCK_P and triton.cdiv(P, block_p) < SMS:
        block_p //= 2
    return block_p


def norm_relu_matmul(x: Tensor, x_stride: int, P: int, C: int, mean: Tensor, var: Tensor, weight: Tensor,
                     bias: Tensor, eps: float, w: Tensor, stats: Tensor | None, counters: Tensor | None,
                     running_mean: Tensor | None = None, running_var: Tensor | None = None,
                     momentum: float = 0.0) -> Tensor:
    """relu(batch_norm(x)) @ w^T as a (n, N, h, w) channels-last map, for ``x`` the first C
    channels of a channels-last buffer of pixel stride ``x_stride`` and ``w`` a 1x1
    convolution's (N, C, 1, 1) weight; the running statistics move by ``momentum`` where
    given, and ``stats`` (2, N), unless None, gets the output's mean and biased variance
    (``counters``: triton_kernels.counters_for's)."""
    N = w.shape[0]
    out = torch.empty((x.shape[0], N, *x.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    block_p, precision = forward_tile(P), _precision(w.dtype)
    rows, tiles = rows_of(P, 1, block_p)  # a program holds all N output channels
    parts = torch.empty(3, rows, N, dtype=torch.float32, device=x.device) if stats is not None else mean
    update = running_mean is not None
    align = _align(x_stride, C)
    _norm_relu_matmul_kernel[(rows,)](
        x, x_stride // align, w, out, mean, var, weight, bias, eps, running_mean if update else mean,
        running_var if update else var, momentum, P / max(P - 1, 1), parts, counters_for(N, x.device, counters),
        stats if stats is not None else mean, P, C // align, N, tiles, ALIGN=align, UPDATE=update,
        STATS=stats is not None, PRECISION=precision, UPCAST=UPCAST, BLOCK_P=block_p, BLOCK_K=BLOCK_K,
        BLOCK_N=_block_n(N), COMBINE_ROWS=COMBINE_ROWS, num_warps=_warps(precision, w.dtype))
    return out


def norm_relu_matmul_backward(g: Tensor, w: Tensor, x: Tensor, x_stride: int, P: int, C: int, mean: Tensor,
                              var: Tensor, weight: Tensor, bias: Tensor, eps: float, out: Tensor,
                              out_stride: int, accumulate: bool, coefficients: Tensor | None,
                              counters: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``norm_relu_matmul`` given the output's gradient ``g`` (channels-last,
    N channels): adds (or with ``accumulate`` False writes) x's gradient into ``out`` (pixel
    stride ``out_stride``) and the batch statistics' part into ``coefficients`` (rows b and
    d, as triton_kernels.norm_relu_backward) unless None; returns the gradients of w, of the
    BatchNorm's weight and of its bias (``counters``: triton_kernels.counters_for's)."""
    N = w.shape[0]
    rows, tiles = rows_of(P, triton.cdiv(C, BLOCK_K), BLOCK_P)
    parts = torch.empty(2, rows, C, dtype=torch.float32, device=x.device)
    part_w = torch.empty(rows, N, C, dtype=torch.float32, device=x.device)
    grad_weight = torch.empty(C, dtype=weight.dtype, device=weight.device)
    grad_bias = torch.empty(C, dtype=weight.dtype, device=weight.device)
    use = coefficients is not None
    align, precision = _align(x_stride, out_stride, C), _precision(w.dtype)
    _norm_relu_matmul_backward_kernel[(triton.cdiv(C, BLOCK_K), rows)](
        g, w, x, x_stride // align, out, out_stride // align, mean, var, weight, bias, eps, parts[0],
        parts[1], part_w, counters_for(C, x.device, counters), grad_weight, grad_bias,
        coefficients if use else grad_bias,
        coefficients.stride(0) if use else 0, P, C // align, N, tiles, ALIGN=align, ACCUMULATE=accumulate,
        COEFFICIENTS=use, PRECISION=precision, UPCAST=UPCAST, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K,
        BLOCK_N=_block_n(N), BLOCK_R=BLOCK_R, num_warps=_warps(precision, w.dtype))
    grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    _sum_rows_kernel[(triton.cdiv(N * C, SUM_COLUMNS),)](part_w, rows, N * C, grad_w, BLOCK_R=SUM_ROWS,
                                                        BLOCK=SUM_COLUMNS)
    return grad_w, grad_weight, grad_bias
