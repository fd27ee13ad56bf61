"""The fused kernels' self-test (kernel_check.py): the CPU kernels pass it, and a kernel set
that raises or is wrong in one output fails it, naming why."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from densenet_trainer.speed import kernel_check
from densenet_trainer.speed.fused_densenet import is_fused
from helpers import densenet, start_run


def test_the_cpu_kernels_pass_their_self_test():
    assert kernel_check.check(torch.device("cpu")) is None


@pytest.mark.parametrize("fault, reason", [
    ("error", "the kernels in torch.float32: RuntimeError: Triton launcher: Python.h: No such file"),
    ("tail", "the kernels in torch.float32: stats' variance: Tensor-likes are not close!")])
def test_a_kernel_that_raises_or_is_wrong_fails_naming_why(broken, fault, reason):
    """A launcher's error, or one channel tail's variance 1% off: the self-test says which,
    and ``failure``, what a run asks before using the kernels, says the same."""
    broken(fault)
    assert kernel_check.check(torch.device("cpu")).startswith(reason)
    assert kernel_check.failure("cpu").startswith(reason)


def test_the_self_test_leaves_a_users_precision_settings_as_they_were():
    """A user who chose TF32 through torch's precision settings: the self-test turns it off
    for its comparison (it would raise reading the legacy flag) and puts it back."""
    if not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} predates its precision settings")
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        kernel_check.failure.cache_clear()
        assert kernel_check.check(torch.device("cpu")) is None
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved
        kernel_check.failure.cache_clear()


def test_a_densenet_built_directly_never_computes_with_kernels_that_failed(broken):
    """torchvision-style use, without the trainer: kernels that fail their self-test are not
    applied (one warning, and the reason returned), and the outputs are ATen's."""
    from densenet import DenseNet
    from densenet_trainer.speed import apply_fused_kernels
    from densenet_trainer.speed.fused_densenet import is_fused
    torch.manual_seed(0)
    model = DenseNet(10, 4)
    aten_model = DenseNet(10, 4)
    aten_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    broken("tail")
    with pytest.warns(UserWarning, match="the fused kernels failed their self-test on cpu"):
        assert apply_fused_kernels(model).startswith("the fused kernels failed their self-test")
    assert not is_fused(model)
    assert torch.equal(model(x), aten_model(x))


def test_a_fused_model_on_a_device_its_kernels_were_not_tested_on_computes_with_aten():
    """apply_fused_kernels tests the kernels where the model is; moved to another device type
    afterwards, the model says so once and computes with ATen's operations there."""
    from densenet import DenseNet
    from densenet_trainer.speed import apply_fused_kernels, fused_densenet
    model = DenseNet(10, 4)
    if apply_fused_kernels(model) is not None:
        pytest.skip("the fused CPU kernels are unavailable here")
    model.to("meta", memory_format=torch.channels_last)
    fused_densenet._warned.discard("meta")
    x = torch.empty(2, 3, 32, 32, device="meta").contiguous(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match="the fused kernels were not tested on meta"):
        assert model(x).shape == (2, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once


def test_a_kernel_wrong_on_aligned_shapes_only_is_caught_by_the_device_self_test(broken):
    """A vectorised variant miscompiled (channels and pixel stride multiples of 8): the
    self-test's aligned shapes select it, its awkward ones do not."""
    broken("aligned")
    assert kernel_check.check(torch.device("cpu")).startswith(
        "the kernels in torch.float32 on 32 of 48 channels: norm_relu")


def test_a_kernel_wrong_on_a_runs_shapes_only_is_caught_by_the_runs_own_self_test(
        broken, capsys, tmp_path, cifar_dir):
    """A vectorised variant miscompiled for full 32x32 maps only, which the device self-test's
    small shapes never select: the run's own model on its own first batch catches it, before
    the first step. One warning names the worst tensor; the run trains with ATen's kernels
    and config.json says why."""
    broken("aligned, full tiles")
    assert kernel_check.check(torch.device("cpu")) is None
    out = start_run(capsys, tmp_path / "run", cifar_dir, "--epochs", "1")
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "computed this run's model otherwise than ATen's" in warning[0]
    assert "of its largest value from float64's, where ATen's fp32 allows" in warning[0]
    assert out.index("warning:") < out.index("epoch 1/1")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["kernels_used"] == "aten on cpu"
    assert "the run's own self-test failed" in saved["kernels_chosen"]["why"]
    assert "self-test" in saved["startup_seconds"]


@pytest.mark.parametrize("options", [{}, {"memory_efficient": True, "dropout": 0.2}])
def test_a_sound_fused_model_passes_the_runs_own_self_test_and_is_left_as_it_was(options):
    """The fused kernels computing a model as ATen's does (dropout's masks too): no failure;
    the model's weights, statistics and gradients are untouched by the test."""
    model = densenet("fused", depth=16, growth_rate=8, **options).to(memory_format=torch.channels_last)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (16,), generator=generator)
    assert kernel_check.model_failure(model, images, labels, images[:5], "fp32") is None
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and is_fused(model)


def test_the_runs_own_self_test_runs_once_a_process_for_a_model_and_its_shapes(monkeypatch):
    """The weights and images do not choose the kernels launched: another run of the same model
    and batch shapes in the process (a seed after a seed) takes the first one's answer."""
    calls = []
    monkeypatch.setattr(kernel_check, "MODELS_CHECKED", {})
    monkeypatch.setattr(kernel_check, "_model_failure", lambda *args: calls.append(args) or None)
    images = torch.zeros(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for depth, batch in ((10, 4), (10, 4), (16, 4), (10, 2)):
        model = densenet("fused", depth=depth, growth_rate=4)
        assert kernel_check.model_failure(model, images[:batch], torch.zeros(batch, dtype=torch.long),
                                          images, "fp32") is None
    assert len(calls) == 3
