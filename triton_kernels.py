"""fused.py's three kernels for CUDA, in Triton: what cpu_kernels.py's C loops do on the CPU.

The same functions, with the same arguments and results. Each works on channels-last feature
maps seen as P pixels of C channels, with a pixel stride for the block buffer's channel
prefixes:

- ``norm_relu``: y = relu(x * scale + shift), one pass;
- ``norm_relu_backward``: with gm = g where y > 0, out += gm * a, and per channel the sums of
  gm and of gm * (x - mean) (the statistics' part of the gradient);
- ``stats``: per channel mean and biased variance, and optionally a copy into the buffer.

Arithmetic is float32 whatever the tensors hold; the per-channel sums are taken per block of
pixels in float32 and the blocks added in float64 by torch, in a fixed order (no atomics: the
same inputs give the same sums). Comparisons are written so that NaN passes through as in
ATen. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how
tests/test_triton.py checks them without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16)  # what the tensors may hold; arithmetic is float32
BLOCK_P, BLOCK_C = 64, 32  # pixels x channels per program


@triton.jit
def _norm_relu_kernel(x, ldx, y, scale, shift, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    inside = (p < P) & (c < C)
    v = tl.load(x + p * ldx + c, mask=inside, other=0.0).to(tl.float32)
    v = v * tl.load(scale + c, mask=c < C, other=0.0) + tl.load(shift + c, mask=c < C, other=0.0)
    v = tl.where(v < 0, 0.0, v)  # relu that keeps NaN
    tl.store(y + p * C + c, v.to(y.dtype.element_ty), mask=inside)


@triton.jit
def _norm_relu_backward_kernel(g, y, x, ldx, out, ldo, mean, a, part_g, part_gx, P, C,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    block = tl.program_id(0)
    p = (block * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    inside = (p < P) & (c < C)
    gv = tl.load(g + p * C + c, mask=inside, other=0.0).to(tl.float32)
    yv = tl.load(y + p * C + c, mask=inside, other=0.0).to(tl.float32)
    xv = tl.load(x + p * ldx + c, mask=inside, other=0.0).to(tl.float32)
    gm = tl.where(yv <= 0, 0.0, gv)  # a NaN output passes its gradient on
    o = tl.load(out + p * ldo + c, mask=inside, other=0.0).to(tl.float32)
    o += gm * tl.load(a + c, mask=c < C, other=0.0)
    tl.store(out + p * ldo + c, o.to(out.dtype.element_ty), mask=inside)
    centred = tl.where(inside, xv - tl.load(mean + c, mask=c < C, other=0.0), 0.0)
    row = c < C
    tl.store(part_g + block * C + c, tl.sum(gm, axis=0)[None, :], mask=row)
    tl.store(part_gx + block * C + c, tl.sum(gm * centred, axis=0)[None, :], mask=row)


@triton.jit
def _stats_kernel(f, P, C, dst, ldd, part_s, part_ss, COPY: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    block = tl.program_id(0)
    p = (block * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    inside = (p < P) & (c < C)
    v = tl.load(f + p * C + c, mask=inside, other=0.0)
    if COPY:
        tl.store(dst + p * ldd + c, v.to(dst.dtype.element_ty), mask=inside)
    # sums about the first pixel's value, which keeps E[x^2] - E[x]^2 from cancelling
    first = tl.load(f + c, mask=c < C, other=0.0).to(tl.float32)
    d = tl.where(inside, v.to(tl.float32) - first, 0.0)
    row = c < C
    tl.store(part_s + block * C + c, tl.sum(d, axis=0)[None, :], mask=row)
    tl.store(part_ss + block * C + c, tl.sum(d * d, axis=0)[None, :], mask=row)


def _grid(P: int, C: int) -> tuple[int, int]:
    return triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C)


def norm_relu(x: Tensor, ldx: int, P: int, C: int, scale: Tensor, shift: Tensor, y: Tensor) -> None:
    _norm_relu_kernel[_grid(P, C)](x, ldx, y, scale.float(), shift.float(), P, C,
                                   BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)


def norm_relu_backward(g: Tensor, y: Tensor, x: Tensor, ldx: int, P: int, C: int, mean: Tensor,
                       a: Tensor, out: Tensor, ldo: int) -> Tensor:
    """Returns the per-channel sums of gm and gm * (x - mean), a (2, C) float64 tensor."""
    grid = _grid(P, C)
    parts = torch.empty(2, grid[0], C, dtype=torch.float32, device=x.device)
    _norm_relu_backward_kernel[grid](g, y, x, ldx, out, ldo, mean.float(), a.float(), parts[0],
                                     parts[1], P, C, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return parts.sum(1, dtype=torch.float64)


def stats(f: Tensor, P: int, C: int, dst: Tensor | None, ldd: int) -> Tensor:
    """Mean and biased variance per channel of the dense P x C ``f`` (a (2, C) float64 tensor),
    copying ``f`` into ``dst`` (pixel stride ``ldd``) unless it is None."""
    grid = _grid(P, C)
    parts = torch.empty(2, grid[0], C, dtype=torch.float32, device=f.device)
    _stats_kernel[grid](f, P, C, f if dst is None else dst, ldd, parts[0], parts[1],
                        COPY=dst is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    sums = parts.sum(1, dtype=torch.float64) / P
    first = f[0, :, 0, 0].double()  # the first pixel of a channels-last (N, C, H, W) map
    return torch.stack([first + sums[0], (sums[1] - sums[0] ** 2).clamp(min=0)])
