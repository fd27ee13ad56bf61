"""The fused kernels prove themselves on a device before a run uses them.

fused.py's kernels are compiled where they run (a C compiler on the CPU, Triton on CUDA), on
hardware, drivers and compilers nobody here has tried. Before a run computes with them,
``failure`` runs each kernel on awkward shapes (pixels not a multiple of a tile, a channel
tail, a pixel stride not a multiple of 16) and on aligned ones (multiples of 8 and of 4:
the vectorised variants), in each dtype the device's kernels take, against float64, and a
fused dense block forward and backward against ATen's, TF32 off; ``gemm_failure`` checks
fused_gemm's GEMMs by blocks of them. Any error (a compiler or launcher missing, a kernel
that fails to build or launch) or result out of tolerance is a failure: the run computes
without those kernels. A run's own shapes select other variants, so before its first step a
run also checks its own model on its own first batches (``model_failure``) against ATen's.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet import DenseBlock
from densenet_trainer.config.cli import first_line
from densenet_trainer.speed import fused, fused_gemm
from densenet_trainer.speed.fused_densenet import fuse, tested_on, unfuse
from densenet_trainer.speed.precision import precision_of

# Tolerances against float64, by the dtype the tensors hold. Arithmetic is float32; bfloat16
# outputs are rounded to 8 significant bits (a relative step of 2^-8), sums kept in float32.
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}
# The fused block against ATen's, both float32 with TF32 off: the order of sums differs.
BLOCK_TOLERANCE = (1e-4, 1e-4)
# The run's model fused against ATen's (model_failure), each measured against ATen's in float64:
# each tensor's largest error over its largest value. Float rounding makes ATen's own error
# anything from 1e-7 to 1e-2 in float32 (a BatchNorm of a near-constant channel amplifies it;
# the fused kernels, which sum in float32 otherwise, reach 5e-3 where ATen's stay at 1e-4), so
# the fused kernels may err up to MODEL_ERROR_RATIO times as much, or up to the floor of their
# precision; a miscompiled kernel errs by the order of the values themselves.
MODEL_ERROR_RATIO = 10
MODEL_ERROR_FLOOR = {"fp32": 2e-2, "bf16": 1e-1, "fp16": 1e-1}
PIXELS = (3, 5, 5)  # batch and size: 75 pixels, not a multiple of any tile
CHANNELS, TOTAL = 37, 45  # a tail over a multiple of 32 channels; a pixel stride of 45
# Shapes a run has too, which select the vectorised variants on CUDA (channels, strides and
# offsets multiples of 8, or of 4): (batch, height, width, channels, buffer), lead channels.
ALIGNED = [((2, 4, 4, 32, 48), 8), ((2, 4, 4, 36, 44), 4)]


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
            check_kernels(kernels, device, dtype)
            for shape, lead in ALIGNED:
                step = f"the kernels in {dtype} on {shape[3]} of {shape[4]} channels"
                check_kernels(kernels, device, dtype, shape, lead)
        for memory_efficient in (False, True):
            step = f"a fused dense block{' (memory-efficient)' if memory_efficient else ''}"
            _check_block(device, memory_efficient)
    except Exception as error:
        return _one_line(step, error)
    return None


@functools.cache
def gemm_failure(device_type: str) -> str | None:
    """What went wrong when fused_gemm's GEMMs checked themselves on ``device_type`` (None: they
    passed, or there are none), once per process: a dense block of them against ATen's, as ``check``'s (float32, TF32
    off), whose layers read 6, 11 and 16 channels (unaligned variants), then 32, 40 and 48."""
    if fused_gemm.backend(device_type) is None:
        return None
    step = "a dense block of GEMMs on 6 channels, growth 5"
    try:
        _check_block(torch.device(device_type), False, True, 6, 5)
        step = "a dense block of GEMMs on 32 channels, growth 8"
        _check_block(torch.device(device_type), False, True, 32, 8)
    except Exception as error:
        return _one_line(step, error)
    return None


def _one_line(step: str, error: Exception) -> str:
    """A check's failure at ``step``: a result out of tolerance, or what stopped the kernels."""
    if isinstance(error, AssertionError):
        return f"{step}: {' '.join([line for line in str(error).splitlines() if line.strip()][:2])}"
    return f"{step}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


MODELS_CHECKED: dict[tuple, str | None] = {}  # model_failure's, by what decides the kernels launched


def model_failure(model: nn.Module, images: Tensor, labels: Tensor, eval_images: Tensor,
                  precision: str) -> str | None:
    """``_model_failure``, once a process for each model and batch shapes (the weights and
    images do not choose the kernels launched, nor their variants)."""
    key = (str(model), tuple(getattr(m, "memory_efficient", None) for m in model.modules()),
           precision, *((x.shape, x.stride(), x.dtype, x.device) for x in (images, eval_images)))
    if key not in MODELS_CHECKED:
        MODELS_CHECKED[key] = _model_failure(model, images, labels, eval_images, precision)
    return MODELS_CHECKED[key]


def _model_failure(model: nn.Module, images: Tensor, labels: Tensor, eval_images: Tensor,
                   precision: str) -> str | None:
    """Why the fused ``model`` may not train its run (None: it may), in one line naming the
    worst tensor. One training step's forward and backward on the run's first batch
    (``images``, ``labels``) and one evaluation forward on its first evaluation batch, in the
    run's ``precision``, computed with the model's fused kernels, with ATen's, and with ATen's
    in float64 from the same weights; compared tensor by tensor: the logits, the loss, every
    parameter's gradient, every BatchNorm's running statistics. The kernels launch the
    variants the run's shapes select. Copies compute, without dropout (which launches no
    fused kernel): ``model`` is left as it was."""
    plain = copy.deepcopy(model)
    unfuse(plain)
    try:
        found = _one_step(model, images, labels, eval_images, precision)
    except Exception as error:  # a kernel that fails to compile or launch at these shapes
        return f"{type(error).__name__}: {first_line(error)}"
    aten = _one_step(plain, images, labels, eval_images, precision)
    exact = _one_step(plain, images, labels, eval_images, "fp32", torch.float64)
    floor = MODEL_ERROR_FLOOR[precision]
    excess = {}
    for name, tensor in exact.items():
        error = _relative_error(found[name], tensor)
        allowed = max(MODEL_ERROR_RATIO * _relative_error(aten[name], tensor), floor)
        excess[name] = (error / allowed if error == error else float("inf"), error, allowed)
    worst = max(excess, key=lambda name: excess[name][0])
    ratio, error, allowed = excess[worst]
    if ratio > 1:
        return (f"{worst} is {error:.3g} of its largest value from float64's, where ATen's "
                f"{precision} allows {allowed:.3g}")
    return None


def _one_step(model: nn.Module, images: Tensor, labels: Tensor, eval_images: Tensor,
              precision: str, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """model_failure's tensors, computed by a copy of ``model`` in ``dtype`` (its gradients
    and running statistics are the copy's), without dropout."""
    model = copy.deepcopy(model).to(dtype).train()
    model.self_test_copy = True  # what a global hook may tell apart from the run's model
    for module in model.modules():  # a user's hooks watch the run's model, not these copies
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
        elif isinstance(module, nn.Dropout):
            module.p = 0.0
    compute = precision_of(model, precision)
    with torch.inference_mode(False), torch.enable_grad(), compute.computing():
        logits = model(compute.inputs(images.to(dtype))).float()
        loss = F.cross_entropy(logits, labels)
        loss.backward()
    tensors = {"the training logits": logits.detach(), "the loss": loss.detach()}
    tensors.update((f"the gradient of {name}", p.grad) for name, p in model.named_parameters())
    tensors.update((name, buffer) for name, buffer in model.named_buffers() if buffer.is_floating_point())
    model.eval()
    with torch.no_grad(), compute.computing():
        tensors["the evaluation logits"] = model(compute.inputs(eval_images.to(dtype))).float()
    return tensors


def _relative_error(actual: Tensor | None, expected: Tensor | None) -> float:
    """The largest difference of two tensors over the expected one's largest value."""
    if actual is None or expected is None:
        return 0.0 if actual is expected else float("inf")
    difference = (actual.double() - expected.double()).abs().max().item()
    return difference / max(expected.double().abs().max().item(), 1e-12)


def _close(actual: Tensor, expected: Tensor, tolerance: tuple[float, float], what: str) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tolerance[0],
                               atol=tolerance[1], msg=lambda message: f"{what}: {message}")


def _random(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
            generator: torch.Generator, scale: float = 1.0, offset: float = 0.0) -> Tensor:
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
    return values.to(device=device, dtype=dtype)


def check_kernels(kernels, device: torch.device, dtype: torch.dtype,
                  shape: tuple[int, int, int, int, int] = (*PIXELS, CHANNELS, TOTAL), lead: int = 3) -> None:
    """Every kernel of ``kernels`` (a backend module) on a channel prefix of a block buffer,
    against float64; ``shape`` is (batch, height, width, channels, the buffer's channels);
    a feature is copied in at channel ``lead`` and outputs are padded by ``lead`` channels.
    An AssertionError says which result is off."""
    generator = torch.Generator().manual_seed(0)
    tolerance = TOLERANCES[dtype]
    sums = (tolerance[0] * 10, tolerance[1] * 10)  # float32 partial sums, their totals in float64
    n, height, width, channels, total = shape
    assert total >= channels + lead, f"the buffer holds the feature at channel {lead}"
    pixels, last = n * height * width, torch.channels_last
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def buffer(count: int, **how) -> Tensor:
        return _random((n, count, height, width), device, dtype, generator, **how).contiguous(memory_format=last)

    def vector(count: int = channels, **how) -> Tensor:
        return _random((count,), device, stats_dtype, generator, **how)

    def per_channel(v: Tensor) -> Tensor:
        return v.double().cpu().view(1, -1, 1, 1)

    # stats of a dense feature, copying it into the buffer at channel ``lead``
    feature = buffer(channels, scale=3.0, offset=100.0)  # an offset that E[x^2] - E[x]^2 loses
    target = torch.zeros((n, total, height, width), dtype=dtype, device=device).contiguous(memory_format=last)
    mean, var = vector(), vector()
    kernels.stats(feature, channels, pixels, channels, target[:, lead:], total, mean, var)
    reference = feature.double().cpu()
    _close(mean, reference.mean((0, 2, 3)), tolerance, "stats' mean")
    _close(var, reference.var((0, 2, 3), correction=0), sums, "stats' variance")
    _close(target[:, lead:lead + channels], feature, (0, 0), "stats' copy")
    _close(target[:, lead + channels:], torch.zeros_like(target[:, lead + channels:]), (0, 0),
           "stats beyond its channels")
    # and of the buffer's first channels, read with its pixel stride
    kernels.stats(target, total, pixels, channels, None, 0, mean, var)
    reference = target[:, :channels].double().cpu()
    _close(mean, reference.mean((0, 2, 3)), tolerance, "stats' mean of a prefix")
    _close(var, reference.var((0, 2, 3), correction=0), sums, "stats' variance of a prefix")

    # norm_relu on the prefix, moving the running statistics, into an output padded with
    # zero channels (a convolution's input: conv_padding.conv_channels) that held NaN
    shared = buffer(total)
    x = shared[:, :channels]
    mean, var = vector(), vector(scale=0.5, offset=1.0).abs()
    weight, bias, eps, momentum = vector(), vector(), 1e-5, 0.1
    running = [vector(), vector(offset=2.0).abs()]
    before = [r.double().cpu().clone() for r in running]
    padded = channels + lead
    y_padded = torch.full((n, padded, height, width), float("nan"), dtype=dtype, device=device)
    y_padded = y_padded.contiguous(memory_format=last)
    y = y_padded[:, :channels]
    kernels.norm_relu(x, total, pixels, channels, mean, var, weight, bias, eps, y_padded, padded,
                      *running, momentum)
    invstd = 1 / (var.double().cpu() + eps).sqrt()
    scale = weight.double().cpu() * invstd
    centred = x.double().cpu() - per_channel(mean)
    expected = (centred * per_channel(scale) + per_channel(bias)).clamp(min=0)
    _close(y, expected, tolerance, "norm_relu")
    _close(y_padded[:, channels:], torch.zeros_like(y_padded[:, channels:]), (0, 0), "norm_relu's padding")
    unbiased = var.double().cpu() * pixels / max(pixels - 1, 1)
    _close(running[0], before[0] + momentum * (mean.double().cpu() - before[0]), TOLERANCES[stats_dtype],
           "norm_relu's running mean")
    _close(running[1], before[1] + momentum * (unbiased - before[1]), TOLERANCES[stats_dtype],
           "norm_relu's running variance")

    # norm_relu_backward, adding into a buffer's gradient and coefficients: a float32 buffer,
    # and one of the features' own dtype, which training accumulates into (bfloat16's too);
    # the output gradient on the padded stride, NaN in the padding, which counts for nothing
    g_padded = buffer(padded)
    g_padded[:, channels:] = float("nan")
    g = g_padded[:, :channels]
    gm = torch.where(y.cpu() > 0, g.cpu(), 0).double()
    a = per_channel(scale)
    sum_g, sum_gx = gm.sum((0, 2, 3)), (gm * centred).sum((0, 2, 3))
    b = -scale * invstd * invstd * sum_gx / pixels
    d = -scale * sum_g / pixels - b * mean.double().cpu()
    for grad_dtype in dict.fromkeys((stats_dtype, dtype)):
        accumulate = _random((n, total, height, width), device, grad_dtype, generator).contiguous(memory_format=last)
        out = accumulate.clone()
        coefficients = _random((2, total), device, stats_dtype, generator)
        start = coefficients.clone()
        grad_weight, grad_bias = kernels.norm_relu_backward(g_padded, y_padded, padded, x, total, pixels,
                                                            channels, mean, var, weight, eps, out, total,
                                                            True, coefficients)
        into = f" into {str(grad_dtype).removeprefix('torch.')}"
        _close(out[:, :channels], accumulate[:, :channels].double().cpu() + gm * a, TOLERANCES[grad_dtype]
               if grad_dtype != stats_dtype else tolerance, "norm_relu_backward's gradient" + into)
        _close(out[:, channels:], accumulate[:, channels:], (0, 0), "norm_relu_backward beyond its channels" + into)
        _close(grad_bias, sum_g, sums, "norm_relu_backward's bias gradient" + into)
        _close(grad_weight, sum_gx * invstd, sums, "norm_relu_backward's weight gradient" + into)
        _close(coefficients[0, :channels], start[0, :channels].double().cpu() + b, sums, "the coefficients b" + into)
        _close(coefficients[1, :channels], start[1, :channels].double().cpu() + d, sums, "the coefficients d" + into)
        _close(coefficients[:, channels:], start[:, channels:], (0, 0), "the coefficients beyond its channels" + into)
    # and writing them, for a tensor of its own
    alone = torch.empty(g.shape, dtype=stats_dtype, device=device).contiguous(memory_format=last)
    written = torch.empty(2, channels, dtype=stats_dtype, device=device)
    kernels.norm_relu_backward(g_padded, y_padded, padded, shared[:, :channels].contiguous(memory_format=last),
                               channels, pixels, channels, mean, var, weight, eps, alone, channels, False,
                               written)
    _close(alone, gm * a, tolerance, "norm_relu_backward's gradient, written")
    _close(written, torch.stack([b, d]), sums, "the coefficients, written")

    # finish_grad of channels 2:channels of the buffer, with 3 zero channels (a padded feature's)
    coefficients = _random((2, total), device, stats_dtype, generator)
    grad = out.clone()
    finished = kernels.finish_grad(grad[:, 2:channels], total, shared[:, 2:channels], total,
                                   coefficients[:, 2:channels], dtype, channels + 1)
    expected = F.pad(out[:, 2:channels].double().cpu() + shared[:, 2:channels].double().cpu()
                     * per_channel(coefficients[0, 2:channels]) + per_channel(coefficients[1, 2:channels]), (0, 0, 0, 0, 0, 3))
    assert finished.dtype == dtype and finished.shape == (n, channels + 1, height, width)
    _close(finished, expected, tolerance, "finish_grad")


def _check_block(device: torch.device, memory_efficient: bool, gemm: bool = False, channels: int = 6,
                 growth: int = 5) -> None:
    """A fused dense block (of fused_gemm's GEMMs with ``gemm``) against the same block on
    ATen's path: output, input gradient, parameter gradients and BatchNorm running statistics,
    in float32 without TF32."""
    generator = torch.Generator().manual_seed(1)
    n, height, width = PIXELS
    torch_state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        fused_block = DenseBlock(3, channels, growth, True, 0.0, memory_efficient)
    finally:
        torch.set_rng_state(torch_state)  # the run's random numbers are not the check's
    aten_block = copy.deepcopy(fused_block)
    fuse(fused_block, gemm)
    x = _random((n, channels, height, width), device, torch.float32, generator)
    grad = _random((n, channels + 3 * growth, height, width), device, torch.float32, generator)
    results = []
    untested = device.type not in tested_on
    tested_on.add(device.type)  # for the check's own block only: nothing else runs meanwhile
    try:
        with _tf32_off():
            for block in (fused_block, aten_block):
                block.to(device, memory_format=torch.channels_last).train()
                inputs = x.contiguous(memory_format=torch.channels_last).requires_grad_()
                out = block(inputs)
                out.backward(grad.contiguous(memory_format=torch.channels_last))
                results.append([out.detach(), inputs.grad,
                                *(p.grad for p in block.parameters()), *block.buffers()])
    finally:
        if untested:
            tested_on.discard(device.type)
    for got, expected in zip(*results):
        _close(got, expected, BLOCK_TOLERANCE, "the block against ATen's")


class _tf32_off:
    """TF32 off for convolutions and matrix products while the block is compared, through
    torch's precision settings (``fp32_precision``): reading the legacy ``allow_tf32`` raises
    where a user has set those, and would fail the self-test for a reason not the kernels'."""

    def __enter__(self) -> None:
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            self.settings, self.name, off = (torch.backends.cuda.matmul, conv), "fp32_precision", "ieee"
        else:  # a torch from before the precision settings
            self.settings, self.name, off = (torch.backends.cuda.matmul, torch.backends.cudnn), "allow_tf32", False
        self.saved = [getattr(setting, self.name) for setting in self.settings]
        for setting in self.settings:
            setattr(setting, self.name, off)

    def __exit__(self, *exc) -> None:
        for setting, value in zip(self.settings, self.saved):
            setattr(setting, self.name, value)
