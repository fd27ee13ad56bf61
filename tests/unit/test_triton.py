"""The Triton kernels of the fused block path (triton_kernels.py) against float64 references.

Without a GPU they run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set
for this module's tests only); with one, on CUDA. Small shapes: each test takes well under a
second or two in the interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from densenet_trainer.speed import fused
from helpers import assert_step_matches_float64, padding_spied, same_weights

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LAST = torch.channels_last


@pytest.fixture(scope="module")
def kernels():
    """triton_kernels, interpreted unless there is a GPU (conftest.py sets TRITON_INTERPRET)."""
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    from densenet_trainer.speed import triton_kernels
    return triton_kernels


@pytest.fixture
def triton_path(kernels, monkeypatch):
    """fused.py's path with every kernel from Triton, on this test's device."""
    monkeypatch.setattr(fused, "backend", lambda device_type: kernels)


def twins(memory_efficient: bool, *kernels: str) -> list:
    """Tiny DenseNets with the same weights, one per kernel choice."""
    return same_weights(*kernels, depth=10, growth_rate=4, num_classes=5,
                        memory_efficient=memory_efficient)


def buffer(n: int, channels: int, size: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, channels, size, size, dtype=dtype, device=DEVICE).contiguous(memory_format=LAST)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 5, 13, 21), (1, 1, 7, 7, 10), (2, 5, 5, 33, 40),
                                   (1, 9, 9, 37, 45), (2, 6, 6, 16, 64)])
def test_kernels_match_float64(kernels, dtype, shape):
    """Every kernel on a channel prefix of a block buffer against float64 (kernel_check's
    checks, which a run makes on its GPU): pixel counts that leave a tile part-full, channel
    tails over 32, pixel strides that are and are not multiples of 16, batch 1."""
    from densenet_trainer.speed import kernel_check
    kernel_check.check_kernels(kernels, DEVICE, dtype, shape)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_programs_that_loop_over_several_pixel_tiles_sum_as_one(kernels, dtype, monkeypatch):
    """The partial-sum passes keep at most PARTIAL_ROWS rows of programs, each looping over
    every rows-th pixel tile: with 2 rows and 3 or 5 tiles, programs hold one, two or three
    tiles, and every result still matches float64."""
    from densenet_trainer.speed import kernel_check
    monkeypatch.setattr(kernels, "PARTIAL_ROWS", 2)
    for shape in [(3, 10, 10, 13, 21), (5, 8, 8, 40, 48)]:  # 300 pixels in 128s, 320 in 64s
        assert kernels.partial_grid(shape[0] * shape[1] * shape[2], shape[3])[0][1] == 2
        kernel_check.check_kernels(kernels, DEVICE, dtype, shape)


def test_kernels_propagate_nan_and_store_bf16(kernels):
    x = buffer(2, 6, 3)
    x[1, 2, 0, 1] = float("nan")
    y = torch.empty_like(x)
    ones, zeros = torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE)
    kernels.norm_relu(x, 6, 18, 6, zeros, ones, ones, zeros, 0.0, y, 6)
    assert torch.isnan(y[1, 2, 0, 1]) and torch.isnan(y).sum() == 1
    mean, var = torch.empty(6, device=DEVICE), torch.empty(6, device=DEVICE)
    kernels.stats(x, 6, 18, 6, None, 0, mean, var)
    assert torch.isnan(mean[2]) and torch.isnan(var[2]) and not torch.isnan(mean[3])
    low = x.nan_to_num().bfloat16()
    out = torch.empty_like(low)
    kernels.norm_relu(low, 6, 18, 6, zeros, ones, torch.full((6,), 0.5, device=DEVICE), zeros, 0.0, out, 6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (low.float() * 0.5).clamp(min=0), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_densenet_on_the_triton_path_matches_aten_in_float64(triton_path, memory_efficient):
    """Forward, input and parameter gradients, and running statistics of a whole tiny DenseNet."""
    reference, ours = twins(memory_efficient, "aten", "fused")
    reference.double().to(DEVICE).train()
    ours.to(DEVICE).train()
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    labels = torch.tensor([1, 3], device=DEVICE)
    assert fused.available(x.contiguous(memory_format=LAST))
    assert_step_matches_float64(reference, ours, x, labels)


@pytest.mark.slow
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_bf16_on_the_triton_path_within_its_precision(triton_path, memory_efficient, monkeypatch):
    """bfloat16 features with float32 statistics and gradient sums, the convolutions' inputs
    and the layers' outputs padded to 8 channels, against the float64 reference: no further
    from it than the ATen path in bfloat16 is (1.5 times, at most); parameters and their
    gradients stay float32."""
    from densenet_trainer.speed.precision import CastWeights
    reference, aten, ours = twins(memory_efficient, "aten", "aten", "fused")
    reference.double().to(DEVICE).train()
    x = torch.randn(16, 3, 8, 8, device=DEVICE)
    labels = torch.arange(16, device=DEVICE) % 5
    expected = reference(x.double())
    F.cross_entropy(expected, labels).backward()
    errors = {}
    padded = padding_spied(monkeypatch)  # bfloat16 convolutions' channels, padded to multiples of 8
    for name, model in (("aten", aten), ("fused", ours)):
        model.to(DEVICE, memory_format=LAST).train()
        precision = CastWeights(model, "bf16")
        with precision.computing():
            inputs = precision.inputs(x.contiguous(memory_format=LAST))
            assert fused.available(inputs)  # taken by the fused model only
            out = model(inputs).float()
            F.cross_entropy(out, labels).backward()
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
        grads = torch.cat([p.grad.double().flatten() for p in model.parameters()])
        exact = torch.cat([p.grad.flatten() for p in reference.parameters()])
        errors[name] = ((out.double() - expected).norm() / expected.norm()).item(), \
            ((grads - exact).norm() / exact.norm()).item()
    for ours_error, aten_error in zip(errors["fused"], errors["aten"]):  # relative, in the L2 norm
        assert ours_error <= 1.5 * aten_error + 0.01, errors
    # the transitions' 12 and 10 inputs, blocks 2's 6 and 3's 5; every layer's 4 output channels
    assert set(padded["inputs"]) == {4, 6, 2, 3} and set(padded["outputs"]) == {4}, padded


@pytest.mark.cuda
def test_the_triton_path_on_cuda(kernels, triton_path):
    """The checks above on a GPU, selected with the others by -m cuda."""
    test_kernels_match_float64(kernels, torch.float32, (3, 5, 5, 13, 21))
    test_kernels_propagate_nan_and_store_bf16(kernels)
    test_densenet_on_the_triton_path_matches_aten_in_float64(None, True)


@pytest.mark.slow
def test_the_self_test_passes_the_triton_kernels(triton_path):
    """kernel_check's shapes and tolerances hold for the Triton kernels (interpreted here)."""
    from densenet_trainer.speed import kernel_check
    assert kernel_check.check(DEVICE) is None


def test_block_buffers_pad_their_pixels_to_16_elements(triton_path):
    """On the Triton path a block's pixels start on 16-element boundaries; the padding is
    invisible: the buffer has its channels, and its output still takes the fused path."""
    x = buffer(2, 5, 4)
    shared = fused.SharedFeatures.for_block(x, 21)
    assert shared.buffer.shape == (2, 21, 4, 4) and shared.pixel_stride == 32
    assert torch.equal(shared.buffer[:, :5], x)
    output = fused.gather(shared, x)
    assert fused.pixel_stride(output) == 32 and fused.available(output)
    assert fused.pixel_stride(x) == 5 and fused.pixel_stride(x.contiguous()) is None
    # the gradient buffer lines up with the features: the same pixel stride (every channel
    # written first: the newest feature's gradient reads its values)
    shared = fused.SharedFeatures.for_block(x, 21)
    newest = buffer(2, 16, 4).requires_grad_(True)
    shared.append(newest.detach())
    fused.gather(shared, newest).sum().backward()
    assert shared.grad.shape == (2, 21, 4, 4) and fused.pixel_stride(shared.grad) == 32
    assert torch.equal(newest.grad, torch.ones_like(newest))
