"""--kernels fused-gemm: the 1x1 convolutions as Triton GEMMs that normalise on load
(gemm_kernels.py, fused_gemm.py) against float64 references.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
set by conftest.py for these tests); with one, on CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from densenet import DenseNet
from densenet_trainer.speed import fused, fused_densenet, fused_gemm, kernel_check
from helpers import assert_step_matches_float64, padding_spied

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LAST = torch.channels_last
EPS = 1e-5


@pytest.fixture
def gemm(monkeypatch):
    """gemm_kernels, interpreted unless there is a GPU, as fused-gemm's kernels on this test's
    device, with triton_kernels as fused.py's."""
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    from densenet_trainer.speed import gemm_kernels, triton_kernels
    monkeypatch.setattr(fused, "backend", lambda device_type: triton_kernels)
    monkeypatch.setattr(fused_gemm, "backend", lambda device_type: gemm_kernels)
    monkeypatch.setattr(fused_densenet, "tested_on", {DEVICE.type})
    return gemm_kernels


def per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.double().cpu()[None, :, None, None]


def layer_inputs(n: int, size: int, channels: int, stride: int, out_channels: int, dtype: torch.dtype):
    """The first ``channels`` of a channels-last buffer of ``stride`` channels, its batch
    statistics, a BatchNorm's weight and bias, and a 1x1 convolution's weight."""
    generator = torch.Generator().manual_seed(channels * 100 + out_channels)
    buffer = (torch.randn(n, stride, size, size, generator=generator) * 2 + 0.5).to(DEVICE, dtype)
    x = buffer.contiguous(memory_format=LAST)[:, :channels]
    mean = x.double().mean((0, 2, 3)).float()
    var = x.double().var((0, 2, 3), unbiased=False).float()
    weight = (torch.rand(channels, generator=generator) + 0.5).to(DEVICE)
    bias = (torch.randn(channels, generator=generator) * 0.5).to(DEVICE)
    w = (torch.randn(out_channels, channels, 1, 1, generator=generator) * 0.2).to(DEVICE, dtype)
    return x, mean, var, weight, bias, w


def reference(x, mean, var, weight, bias, w):
    """relu(batch_norm(x)) then the 1x1 convolution, in float64 on the CPU, the statistics held
    fixed (their gradients are the coefficients, checked apart)."""
    x = x.double().cpu().requires_grad_()
    weight, bias, w = (t.double().cpu().requires_grad_() for t in (weight, bias, w))
    a = torch.relu((x - per_channel(mean)) / (per_channel(var) + EPS).sqrt() * weight[None, :, None, None]
                   + bias[None, :, None, None])
    return (x, weight, bias, w), F.conv2d(a, w)


TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
# (batch, size, channels, pixel stride, output channels): pixels not a multiple of a tile,
# channel counts that are and are not multiples of 8, output widths of 12 to 48
SHAPES = [(2, 5, 13, 32, 48), (3, 7, 37, 48, 20), (1, 8, 32, 48, 48), (2, 6, 24, 32, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_the_gemms_match_float64(gemm, dtype, shape, accumulate, monkeypatch):
    """Forward with the output's statistics and the running statistics' update, and backward:
    the data gradient added into (or written to) the block's gradient buffer, the batch
    statistics' coefficients, and the gradients of the BatchNorm and of the weight. Tiles of 16
    pixels, rows of programs that loop over several and channel tiles of several rows: the
    pixel split of the weight gradient and of the partial sums, and the last program of each
    pass, which combines them, then sets its counter back to zero."""
    monkeypatch.setattr(gemm, "BLOCK_P", 16)
    monkeypatch.setattr(gemm, "MIN_BLOCK_P", 16)
    monkeypatch.setattr(gemm, "TARGET_PROGRAMS", 4)
    n, size, channels, stride, out_channels = shape
    x, mean, var, weight, bias, w = layer_inputs(n, size, channels, stride, out_channels, dtype)
    pixels = n * size * size
    stats = torch.empty(2, out_channels, device=DEVICE)
    running_mean, running_var = torch.zeros(channels, device=DEVICE), torch.ones(channels, device=DEVICE)
    counters = torch.zeros(stride + 1, dtype=torch.int32, device=DEVICE)  # a model's (pass_counters.py)
    out = gemm.norm_relu_matmul(x, stride, pixels, channels, mean, var, weight, bias, EPS, w, stats,
                                counters, running_mean, running_var, 0.1)
    assert not counters.any()  # the last program set its counter back
    leaves, expected = reference(x, mean, var, weight, bias, w)
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous(memory_format=LAST)
    torch.testing.assert_close(out.double().cpu(), expected.detach(), **TOLERANCE[dtype])
    as_stored = out.double().cpu()  # the statistics are those of the values as stored
    torch.testing.assert_close(stats[0].double().cpu(), as_stored.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats[1].double().cpu(), as_stored.var((0, 2, 3), unbiased=False),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(running_mean.cpu(), 0.1 * mean.cpu())
    torch.testing.assert_close(running_var.cpu(), 0.9 + 0.1 * var.cpu() * pixels / (pixels - 1))

    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    g = g.contiguous(memory_format=LAST)
    expected.backward(g.double().cpu())
    grad_buffer = torch.randn(n, stride, size, size).to(DEVICE, dtype).contiguous(memory_format=LAST)
    before = grad_buffer.double().cpu()
    coefficients = torch.randn(2, stride, device=DEVICE)
    coefficients_before = coefficients.double().cpu()
    grad_w, grad_weight, grad_bias = gemm.norm_relu_matmul_backward(
        g, w, x, stride, pixels, channels, mean, var, weight, bias, EPS, grad_buffer[:, :channels], stride,
        accumulate, coefficients, counters)
    assert not counters.any()
    x_leaf, weight_leaf, bias_leaf, w_leaf = leaves
    added = grad_buffer[:, :channels].double().cpu() - (before[:, :channels] if accumulate else 0)
    torch.testing.assert_close(added, x_leaf.grad, **TOLERANCE[dtype])
    assert torch.equal(grad_buffer[:, channels:].double().cpu(), before[:, channels:])  # never written
    assert grad_w.dtype == dtype and grad_w.shape == w.shape
    scale = w_leaf.grad.abs().max()
    torch.testing.assert_close(grad_w.double().cpu() / scale, w_leaf.grad / scale, **TOLERANCE[dtype])
    torch.testing.assert_close(grad_weight.double().cpu(), weight_leaf.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad_bias.double().cpu(), bias_leaf.grad, rtol=1e-3, atol=1e-3)
    # the batch statistics' part: with gm the gradient through the ReLU, b = -a/(var+eps)
    # sum(gm (x - mean))/P and d = -a sum(gm)/P - b mean, added to what was there
    invstd = 1 / (var.double().cpu() + EPS).sqrt()
    a = weight.double().cpu() * invstd
    b = -a * invstd * invstd * weight_leaf.grad / invstd / pixels
    d = -a * bias_leaf.grad / pixels - b * mean.double().cpu()
    expected_coefficients = torch.stack([b, d]) + (coefficients_before[:, :channels] if accumulate else 0)
    torch.testing.assert_close(coefficients[:, :channels].double().cpu(), expected_coefficients,
                               rtol=1e-3, atol=1e-3)


def test_nan_passes_through_the_relu_as_in_aten(gemm):
    """A NaN in the features reaches the output and its channel's gradients, as ATen's would."""
    x, mean, var, weight, bias, w = layer_inputs(1, 4, 16, 16, 16, torch.float32)
    x[0, 3, 1, 1] = float("nan")
    out = gemm.norm_relu_matmul(x, 16, 16, 16, mean, var, weight, bias, EPS, w, None, None)
    assert out[0, :, 1, 1].isnan().all() and not out[0, :, 0, 0].isnan().any()
    grad_buffer = torch.zeros(1, 16, 4, 4, device=DEVICE).contiguous(memory_format=LAST)
    grad_w, _, _ = gemm.norm_relu_matmul_backward(
        torch.ones_like(out), w, x, 16, 16, 16, mean, var, weight, bias, EPS, grad_buffer, 16, False, None,
        None)
    assert grad_w[:, 3].isnan().all() and not grad_w[:, 2].isnan().any()


def bc_models(memory_efficient: bool, depth: int = 22, growth_rate: int = 12):
    """A DenseNet-BC in float64 on ATen's path, and the same weights on the fused-gemm path."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(DenseNet(depth=depth, growth_rate=growth_rate, num_classes=5,
                               memory_efficient=memory_efficient))
    reference, ours = models
    fused_densenet.fuse(ours, gemm=True)
    return reference.double().to(DEVICE).train(), ours.to(DEVICE, memory_format=LAST).train()


@pytest.mark.slow
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_a_bc_22_12_step_on_the_gemm_path_matches_aten_in_float64(gemm, memory_efficient, monkeypatch):
    """Forward, input and parameter gradients, and running statistics of DenseNet-BC-22-12,
    every bottleneck's 1x1 convolution a GEMM, within the fused path's tolerances (TF32 off:
    the GEMMs multiply as cuDNN would be let to); no activation is kept."""
    from densenet_trainer.speed import triton_kernels
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    reference, ours = bc_models(memory_efficient)
    calls, counters = [], []
    monkeypatch.setattr(fused_gemm, "norm_relu_matmul", lambda *args, wrapped=fused_gemm.norm_relu_matmul:
                        calls.append(args[1]) or wrapped(*args))
    real = triton_kernels.counters_for
    for module in (triton_kernels, gemm):  # every pass, forward and backward, counts in the model's counters
        monkeypatch.setattr(module, "counters_for", lambda channels, device, given:
                            counters.append(given) or real(channels, device, given))
    assert_step_matches_float64(reference, ours, torch.randn(2, 3, 8, 8, device=DEVICE),
                                torch.tensor([1, 3], device=DEVICE))
    assert len(calls) == 9 and all(conv.kernel_size == (1, 1) for conv in calls)  # every bottleneck
    # per layer: the GEMM's two passes, its feature's statistics, norm2's backward; per block, its
    # input's statistics; the transitions' and the final BatchNorm's backward
    assert len(counters) == 9 * 4 + 3 + 3 and all(c is ours.pass_counters for c in counters)
    assert not ours.pass_counters.any()  # each pass set back what it counted
    assert [m.num_batches_tracked.item() for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)] \
        == [1] * len([m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)])


@pytest.mark.slow
def test_bf16_on_the_gemm_path_within_its_precision(gemm, monkeypatch):
    """bfloat16 features and weights on the GEMM path, the layers' 4 output channels padded to
    8, against float64: no further from it than ATen's path in bfloat16 (1.5 times that, at
    most, as the fused path's test allows)."""
    from densenet_trainer.speed.precision import CastWeights
    reference, ours = bc_models(False, depth=16, growth_rate=4)
    aten = bc_models(False, depth=16, growth_rate=4)[0].float().to(memory_format=LAST)
    padded = padding_spied(monkeypatch)
    x = torch.randn(16, 3, 8, 8, device=DEVICE)
    labels = torch.arange(16, device=DEVICE) % 5
    expected = reference(x.double())
    F.cross_entropy(expected, labels).backward()
    exact = torch.cat([p.grad.flatten() for p in reference.parameters()])
    errors = {}
    for name, model in (("aten", aten), ("fused-gemm", ours)):
        precision = CastWeights(model, "bf16")
        with precision.computing():
            out = model(precision.inputs(x.contiguous(memory_format=LAST))).float()
            F.cross_entropy(out, labels).backward()
        grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
        errors[name] = (((out.double() - expected).norm() / expected.norm()).item(),
                        ((grads - exact).norm() / exact.norm()).item())
    for ours_error, aten_error in zip(errors["fused-gemm"], errors["aten"]):
        assert ours_error <= 1.5 * aten_error + 0.01, errors
    assert set(padded["outputs"]) == {4}, padded


def test_layers_the_gemms_do_not_fit_compute_as_on_the_fused_path(gemm):
    """A DenseNet without bottlenecks, and one whose 4k output channels exceed MAX_N, take the
    fused path's convolutions; the model still says fused-gemm, which it was given."""
    for model in (DenseNet(depth=10, growth_rate=4, bottleneck=False, compression=1.0, num_classes=5),
                  DenseNet(depth=10, growth_rate=gemm.MAX_N // 4 + 1, num_classes=5)):
        fused_densenet.fuse(model, gemm=True)
        assert fused_densenet.kernels_of(model) == "fused-gemm"
        layer = next(m for m in model.modules() if isinstance(m, fused_densenet.GemmDenseLayer))
        x = torch.randn(2, layer.conv1.in_channels, 4, 4, device=DEVICE).contiguous(memory_format=LAST)
        assert not (layer.bottleneck and fused_gemm.applies(layer.conv1, x))
        model.to(DEVICE, memory_format=LAST)(torch.randn(2, 3, 8, 8, device=DEVICE)).sum().backward()
    fused_densenet.unfuse(model)
    assert fused_densenet.kernels_of(model) == "aten"


@pytest.mark.slow
def test_the_self_test_passes_the_gemm_kernels(gemm):
    """kernel_check's blocks of GEMMs against ATen's, unaligned and aligned (interpreted here)."""
    kernel_check.gemm_failure.cache_clear()
    try:
        assert kernel_check.gemm_failure(DEVICE.type) is None
    finally:
        kernel_check.gemm_failure.cache_clear()


@pytest.mark.cuda
def test_the_gemm_path_on_cuda(gemm, monkeypatch):
    """The checks above on a GPU, selected with the others by -m cuda."""
    test_the_gemms_match_float64(gemm, torch.bfloat16, SHAPES[0], True, monkeypatch)
    test_a_bc_22_12_step_on_the_gemm_path_matches_aten_in_float64(gemm, True, monkeypatch)
    test_bf16_on_the_gemm_path_within_its_precision(gemm)


def test_a_gemm_model_that_fails_the_runs_own_self_test_goes_on_fused(monkeypatch, capsys):
    """The next best, checked in turn: a fused-gemm model that computes the run's first batches
    otherwise than ATen's is put on the fused kernels alone, with one warning, and config.json's
    why says so; fused failing too would leave ATen's."""
    from densenet_trainer.runtime import Runtime
    from densenet_trainer.speed import kernel_choice
    model = DenseNet(depth=10, growth_rate=4, num_classes=5)
    fused_densenet.fuse(model, gemm=True)
    checked = []
    monkeypatch.setattr(kernel_check, "model_failure", lambda model, *args: checked.append(
        fused_densenet.kernels_of(model)) or ("the loss is off" if checked[-1] == "fused-gemm" else None))
    choice = kernel_choice.confirm_on_model(kernel_choice.KernelChoice("fused-gemm", "--kernels fused-gemm on cuda"),
                                            model, *[None] * 3, "fp32", Runtime(torch.device("cpu")))
    assert checked == ["fused-gemm", "fused"] and fused_densenet.kernels_of(model) == "fused"
    assert choice == kernel_choice.KernelChoice(
        "fused", "--kernels fused-gemm on cuda, but the run's own self-test failed: the loss is off")
    assert capsys.readouterr().out == (
        "warning: the fused-gemm kernels computed this run's model otherwise than ATen's (the loss is off); "
        "the run computes with the fused kernels instead: the same function, slower\n")


def test_apply_fused_kernels_with_gemms_where_there_are_none_says_so_and_fuses(monkeypatch):
    """torchvision-style use on the CPU, which has no GEMM kernels: one warning, the fused path."""
    from densenet_trainer.speed import apply_fused_kernels
    model = DenseNet(depth=10, growth_rate=4, num_classes=5)
    with pytest.warns(UserWarning, match=r"the GEMM kernels are unavailable on cpu \(Triton, on CUDA only\); "
                                         "the 1x1 convolutions compute as with the fused kernels alone"):
        reason = apply_fused_kernels(model, "cpu", gemm=True)
    assert fused_densenet.kernels_of(model) == ("aten" if reason else "fused")


def test_float32_gemms_multiply_as_cudnns_convolutions_are_let_to(gemm, monkeypatch):
    """TF32 where torch's settings let cuDNN's convolutions use it, a "none" deferring to the
    level above (where reading the legacy allow_tf32 would raise); bfloat16 as it is."""
    conv, cudnn = torch.backends.cudnn.conv, torch.backends.cudnn
    for conv_value, cudnn_value, expected in (("tf32", "none", "tf32"), ("ieee", "tf32", "ieee"),
                                              ("none", "tf32", "tf32"), ("none", "none", "ieee")):
        monkeypatch.setattr(conv, "fp32_precision", conv_value)
        monkeypatch.setattr(cudnn, "fp32_precision", cudnn_value)
        assert gemm._precision(torch.float32) == expected, (conv_value, cudnn_value)
        assert gemm._precision(torch.bfloat16) == "ieee"


def test_a_fused_gemm_run_evaluated_on_the_cpu_computes_with_the_fused_kernels_and_says_nothing():
    """--evaluate builds the run's model with the kernels its --kernels means on the device: a
    fused-gemm run's, on a CPU that has no GEMM kernels, is the fused model, without a warning."""
    import warnings

    from densenet_trainer.config.run_config import RunConfig
    from densenet_trainer.run import build
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build.build_model(RunConfig(depth=10, growth_rate=4, kernels="fused-gemm"), "fused-gemm",
                                  torch.device("cpu"))
    assert fused_densenet.kernels_of(model) == "fused"
