"""The fused kernels prove themselves on a device before a run uses them.

fused.py's kernels are compiled where they run (a C compiler on the CPU, Triton on CUDA), on
hardware, drivers and compilers nobody here has tried. Before a run computes with them,
``failure`` runs each kernel on awkward shapes (pixels not a multiple of a tile, a channel
tail, a pixel stride not a multiple of 16), in each dtype the device's kernels take, against
a float64 reference, and one fused dense block forward and backward against ATen's, TF32 off.
Any error (a compiler or launcher missing, a kernel that fails to build or launch) or any
result out of tolerance is a failure, and the run computes with ATen's kernels instead.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor

import fused
from densenet import DenseBlock

# Tolerances against float64, by the dtype the tensors hold. Arithmetic is float32; bfloat16
# outputs are rounded to 8 significant bits (a relative step of 2^-8), sums kept in float32.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
              torch.bfloat16: (1e-2, 1e-2)}
# The fused block against ATen's, both float32 with TF32 off: the order of sums differs.
BLOCK_TOLERANCE = (1e-4, 1e-4)
PIXELS = (3, 5, 5)  # batch and size: 75 pixels, not a multiple of any tile
CHANNELS, TOTAL = 37, 45  # a tail over a multiple of 32 channels; a pixel stride of 45


@functools.cache
def failure(device_type: str) -> str | None:
    """What went wrong when the fused kernels of ``device_type`` checked themselves there
    (None: they passed, or there are none to check); once per process."""
    return check(torch.device(device_type))


def check(device: torch.device) -> str | None:
    """``failure``, not cached: the kernels fused.backend gives ``device`` (one line)."""
    kernels = fused.backend(device.type)
    if kernels is None:
        return None
    step = "starting"
    try:
        for dtype in kernels.DTYPES:
            step = f"the kernels in {dtype}"
            _check_kernels(kernels, device, dtype)
        for memory_efficient in (False, True):
            step = f"a fused dense block{' (memory-efficient)' if memory_efficient else ''}"
            _check_block(device, memory_efficient)
    except AssertionError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        return f"{step}: {' '.join(lines[:2])}"
    except Exception as error:  # a compiler, a launcher, a driver: anything that stops them
        reason = (str(error).strip().splitlines() or [""])[0]
        return f"{step}: {type(error).__name__}: {reason}"
    return None


def _close(actual: Tensor, expected: Tensor, tolerance: tuple[float, float], what: str) -> None:
    rtol, atol = tolerance
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol,
                               atol=atol, msg=lambda message: f"{what}: {message}")


def _random(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
            generator: torch.Generator, scale: float = 1.0, offset: float = 0.0) -> Tensor:
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
    return values.to(device=device, dtype=dtype)


def _check_kernels(kernels, device: torch.device, dtype: torch.dtype) -> None:
    """norm_relu, norm_relu_backward and stats on a channel prefix of a block buffer."""
    generator = torch.Generator().manual_seed(0)
    tolerance = TOLERANCES[dtype]
    n, height, width = PIXELS
    pixels, last = n * height * width, torch.channels_last

    def buffer(channels: int, **how) -> Tensor:
        return _random((n, channels, height, width), device, dtype, generator, **how).contiguous(memory_format=last)

    def vector(**how) -> Tensor:  # BatchNorm's parameters: float32 unless the features are float64
        return _random((CHANNELS,), device, torch.float64 if dtype == torch.float64 else torch.float32,
                       generator, **how)

    def per_channel(v: Tensor) -> Tensor:
        return v.double().cpu().view(1, -1, 1, 1)

    shared = buffer(TOTAL)
    x = shared[:, :CHANNELS]
    scale, shift = vector(), vector()
    y = torch.empty(x.shape, dtype=dtype, device=device).contiguous(memory_format=last)
    kernels.norm_relu(x, TOTAL, pixels, CHANNELS, scale, shift, y)
    expected = (x.double().cpu() * per_channel(scale) + per_channel(shift)).clamp(min=0)
    _close(y, expected, tolerance, "norm_relu")

    g = buffer(CHANNELS)
    out = torch.zeros_like(shared)
    mean, a = vector(), vector()
    sums = kernels.norm_relu_backward(g, y, x, TOTAL, pixels, CHANNELS, mean, a, out, TOTAL)
    gm = torch.where(y.cpu() > 0, g.cpu(), 0).double()
    _close(out[:, :CHANNELS], gm * per_channel(a), tolerance, "norm_relu_backward's gradient")
    _close(out[:, CHANNELS:], torch.zeros_like(out[:, CHANNELS:]), (0, 0),
           "norm_relu_backward beyond its channels")
    centred = x.double().cpu() - per_channel(mean)
    sum_tolerance = (tolerance[0] * 10, tolerance[1] * pixels)
    _close(sums[0], gm.sum((0, 2, 3)), sum_tolerance, "norm_relu_backward's sums")
    _close(sums[1], (gm * centred).sum((0, 2, 3)), sum_tolerance, "norm_relu_backward's sums")

    feature = buffer(CHANNELS, scale=3.0, offset=100.0)  # an offset that E[x^2] - E[x]^2 loses
    target = torch.zeros_like(shared)
    stats = kernels.stats(feature, pixels, CHANNELS, target[:, 3:3 + CHANNELS], TOTAL)
    reference = feature.double().cpu()
    _close(stats[0], reference.mean((0, 2, 3)), tolerance, "stats' mean")
    _close(stats[1], reference.var((0, 2, 3), correction=0), (tolerance[0] * 10, tolerance[1] * 10),
           "stats' variance")
    _close(target[:, 3:3 + CHANNELS], feature, (0, 0), "stats' copy")


def _check_block(device: torch.device, memory_efficient: bool) -> None:
    """A fused dense block against the same block on ATen's path: output, input gradient,
    parameter gradients and BatchNorm running statistics, in float32 without TF32."""
    generator = torch.Generator().manual_seed(1)
    n, height, width = PIXELS
    torch_state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        fused_block = DenseBlock(3, 6, 5, True, 0.0, memory_efficient, fused_kernels=True)
    finally:
        torch.set_rng_state(torch_state)  # the run's random numbers are not the check's
    aten_block = copy.deepcopy(fused_block)
    aten_block.fused_kernels = False
    for layer in aten_block.layers:
        layer.fused_kernels = False
    x = _random((n, 6, height, width), device, torch.float32, generator)
    grad = _random((n, 6 + 3 * 5, height, width), device, torch.float32, generator)
    results = []
    with _tf32_off():
        for block in (fused_block, aten_block):
            block.to(device, memory_format=torch.channels_last).train()
            inputs = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            out = block(inputs)
            out.backward(grad.contiguous(memory_format=torch.channels_last))
            results.append([out.detach(), inputs.grad,
                            *(p.grad for p in block.parameters()), *block.buffers()])
    for got, expected in zip(*results):
        _close(got, expected, BLOCK_TOLERANCE, "the block against ATen's")


class _tf32_off:
    """TF32 off for convolutions and matrix products while the block is compared."""

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
