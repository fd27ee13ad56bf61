"""The fused CPU path (fused.py) against the ATen path: same outputs, gradients, statistics."""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from densenet import DenseLayer, DenseNet
from densenet_trainer.speed import apply_fused_kernels, cpu_kernels, fused
from helpers import densenet, padding_spied, same_weights

pytestmark = pytest.mark.skipif(fused.backend("cpu") is None,
                                reason="no C compiler with OpenMP: the fused path is not built")
CHANNELS_LAST = torch.channels_last


def twins(**kwargs) -> list[DenseNet]:
    """Two float64 DenseNets with the same weights; which path each takes depends on its input
    (contiguous: ATen's, channels-last: the fused one)."""
    return [m.double() for m in same_weights("fused", "fused", depth=16, growth_rate=4, **kwargs)]


def step(model: DenseNet, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = model.train()(x)
    F.cross_entropy(out, labels).backward()
    return out, x.grad


def padding_recorded(monkeypatch, multiple: int) -> dict[str, list[int]]:
    """The CPU's convolutions given channels padded to ``multiple``, as bfloat16's are on CUDA
    (conv_padding); returns helpers.padding_spied's record."""
    from densenet_trainer.speed import kernel_check
    kernel_check.failure("cpu")  # the self-test (once per process) before anything is recorded
    monkeypatch.setattr(cpu_kernels, "CONV_CHANNEL_MULTIPLE", {torch.float64: multiple, torch.float32: multiple})
    return padding_spied(monkeypatch)


@pytest.mark.parametrize("bottleneck", [True, False])
@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("conv_multiple", [1, 8])
def test_fused_matches_aten_in_float64(bottleneck, memory_efficient, conv_multiple, monkeypatch):
    """The same outputs, gradients and running statistics, also where the convolutions'
    inputs and the layers' outputs are padded with zero channels (to 8 here: 8 + 4i channels
    are for odd i; the growth rate of 4 always)."""
    aten, fast = twins(bottleneck=bottleneck, compression=0.5, memory_efficient=memory_efficient)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,))
    assert not fused.available(x) and fused.available(x.contiguous(memory_format=CHANNELS_LAST))
    padded = padding_recorded(monkeypatch, conv_multiple)
    out_aten, grad_aten = step(aten, x, labels)
    assert padded == {"inputs": [], "outputs": []}  # the ATen path pads nothing
    out_fast, grad_fast = step(fast, x.contiguous(memory_format=CHANNELS_LAST), labels)
    assert (max(padded["inputs"], default=0) == 4) == (conv_multiple == 8), padded
    assert set(padded["outputs"]) == ({4} if conv_multiple == 8 else set()), padded
    torch.testing.assert_close(out_fast, out_aten, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_fast, grad_aten, rtol=1e-10, atol=1e-14)
    for (name, a), b in zip(aten.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-14, msg=name)
    for (name, a), b in zip(aten.named_buffers(), fast.buffers()):  # running statistics
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)
    with torch.no_grad():  # evaluation uses those running statistics
        torch.testing.assert_close(fast.eval()(x.contiguous(memory_format=CHANNELS_LAST)),
                                   aten.eval()(x), rtol=1e-12, atol=1e-12)


def test_fused_float32_close_to_aten():
    torch.manual_seed(0)
    aten = DenseNet(16, 6)
    fast = copy.deepcopy(aten).to(memory_format=CHANNELS_LAST)
    apply_fused_kernels(fast)
    x = torch.randn(8, 3, 32, 32)
    labels = torch.randint(0, 10, (8,))
    out_aten, _ = step(aten, x, labels)
    out_fast, _ = step(fast, x.contiguous(memory_format=CHANNELS_LAST), labels)
    torch.testing.assert_close(out_fast, out_aten, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(aten.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_memory_efficient_fused_with_dropout_matches_standard_fused():
    """Dropout masks depend on the memory layout, so both models take the fused path here."""
    standard, efficient = twins(dropout=0.2)
    efficient.load_state_dict(standard.state_dict())
    for layer in efficient.modules():
        if hasattr(layer, "memory_efficient"):
            layer.memory_efficient = True
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=CHANNELS_LAST)
    labels = torch.randint(0, 10, (4,))
    results = []
    for model in (standard, efficient):
        torch.manual_seed(1)
        results.append(step(model, x, labels))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(standard.named_parameters(), efficient.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CHANNELS_LAST])
def test_padded_weight_copies_keep_their_layout_and_hand_back_gradients_as_views(memory_format):
    """conv_padding's copies with zero output channels: the weights' values, then zeros; their
    first rows with the weights' strides (one multi-tensor copy, and nothing for cuDNN to
    convert); gradients back to the weights, none to a weight whose copy went unused."""
    from densenet_trainer.speed.conv_padding import _ZeroRows
    weights = [torch.randn(shape).to(memory_format=memory_format).requires_grad_()
               for shape in ((4, 6, 3, 3), (5, 3, 3, 3))]
    padded = _ZeroRows.apply([8, 16], *weights)
    for weight, copy_, rows in zip(weights, padded, (8, 16)):
        assert copy_.shape == (rows, *weight.shape[1:]) and copy_[:len(weight)].stride() == weight.stride()
        assert torch.equal(copy_[:len(weight)], weight) and not copy_[len(weight):].any()
    (padded[0] * torch.arange(8.0).view(8, 1, 1, 1)).sum().backward()
    assert torch.equal(weights[0].grad, torch.arange(4.0).view(4, 1, 1, 1).expand(4, 6, 3, 3))
    assert weights[1].grad is None


def test_layers_are_called_as_modules_on_the_fused_path():
    """Forward hooks (attic/summary.py uses them) see every dense layer on both paths."""
    model = densenet("fused", depth=16, growth_rate=4).to(memory_format=CHANNELS_LAST)
    layers = [m for m in model.modules() if isinstance(m, DenseLayer)]
    seen = []
    for layer in layers:
        layer.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CHANNELS_LAST)
    assert fused.available(model.stem(x))
    model(x)
    assert seen == [4] * len(layers)


def test_aten_path_where_fused_cannot_run(monkeypatch):
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=CHANNELS_LAST)
    assert fused.available(x)
    assert not fused.available(x.half())
    assert not fused.available(x.contiguous())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.available(x)
    monkeypatch.setattr(fused, "backend", lambda device_type: None)  # no compiler: it still trains
    assert not fused.available(x)
    model = densenet("fused", depth=10, growth_rate=4).to(memory_format=CHANNELS_LAST)
    model(torch.randn(2, 3, 32, 32).contiguous(memory_format=CHANNELS_LAST)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_statistics_kernel_is_accurate_far_from_zero():
    """A feature with a large mean and a small spread: E[x^2] - E[x]^2 must not cancel."""
    x = (1000 + torch.randn(16, 5, 8, 8)).contiguous(memory_format=CHANNELS_LAST)
    shared = fused.SharedFeatures.holding(x, batch_stats=True)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(shared.mean.double(), mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(shared.var.double(), var, rtol=1e-3, atol=0)


@pytest.mark.parametrize("compiler, reason", [
    ("false", "false failed"),  # a "compiler" that always fails
    ("empty-library", "empty-library built a library without the kernel norm_relu_f32")])
def test_a_failing_compiler_warns_and_falls_back(monkeypatch, tmp_path, compiler, reason):
    """A compiler that fails, or one that builds a library without the kernels' symbols: one
    warning, and the model computes with ATen's operations."""
    if compiler == "empty-library":  # compiles an empty file to the -o it is given
        script = tmp_path / compiler
        script.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\n'
                          'echo "" | exec cc -shared -fPIC -x c - -o "$2"\n')
        script.chmod(0o755)
        compiler = str(script)
    monkeypatch.setenv("CC", compiler)
    fused.backend.cache_clear()
    cpu_kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"fused CPU kernels are unavailable.*{reason}"):
            assert fused.backend("cpu") is None
        assert not fused.available(torch.randn(2, 3, 4, 4).contiguous(memory_format=CHANNELS_LAST))
    finally:
        monkeypatch.delenv("CC")
        fused.backend.cache_clear()
        cpu_kernels.library.cache_clear()
    assert fused.backend("cpu") is cpu_kernels


def test_both_backends_offer_the_same_kernels():
    """cpu_kernels and triton_kernels: the same functions with the same arguments."""
    import inspect

    triton_kernels = pytest.importorskip("densenet_trainer.speed.triton_kernels")
    for name in ("norm_relu", "norm_relu_backward", "stats", "finish_grad"):
        assert (inspect.signature(getattr(cpu_kernels, name)).parameters.keys()
                == inspect.signature(getattr(triton_kernels, name)).parameters.keys()), name
    assert cpu_kernels.SOURCE.is_file()  # shipped beside the module (pyproject's package-data)
    library = cpu_kernels.library()
    for name in ("norm_relu", "norm_relu_backward", "stats"):  # finish_grad is torch's own
        assert all(hasattr(library, f"{name}_{suffix}") for suffix in ("f32", "f64")), name


# ---------------------------------------------------------------- the C kernels' cache

@pytest.fixture
def kernel_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder for the C kernels, and library() to be loaded anew."""
    monkeypatch.setenv(cpu_kernels.CACHE_VARIABLE, str(tmp_path / "cache"))
    cpu_kernels.library.cache_clear()
    yield tmp_path / "cache"
    cpu_kernels.library.cache_clear()


def built(cache: Path) -> list[str]:
    return sorted(path.name for path in (cache / "cpu-kernels").iterdir())


def test_the_c_kernels_are_built_once_and_loaded_from_the_cache(kernel_cache, monkeypatch):
    cpu_kernels.library()
    assert [name.startswith("kernels-") and name.endswith(".so") for name in built(kernel_cache)] == [True]
    cpu_kernels.library.cache_clear()

    def compile_again(*args):
        raise AssertionError("compiled again")
    monkeypatch.setattr(cpu_kernels, "_compile", compile_again)
    assert hasattr(cpu_kernels.library(), "norm_relu_f32")  # loaded, not built


def test_another_source_or_compiler_is_built_beside_the_first(kernel_cache, monkeypatch, tmp_path):
    cpu_kernels.library()
    source = tmp_path / "cpu_kernels.c"
    source.write_text(cpu_kernels.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    cpu_kernels.library.cache_clear()
    cpu_kernels.library()
    assert len(built(kernel_cache)) == 2


@pytest.mark.slow
def test_two_processes_building_at_once_both_load_whole_kernels(kernel_cache):
    code = ("from densenet_trainer.speed import cpu_kernels; "
            "print(hasattr(cpu_kernels.library(), 'stats_f64'))")
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]
    assert [process.communicate(timeout=120)[0].strip() for process in processes] == ["True"] * 3
    assert len(built(kernel_cache)) == 1  # and no scratch folder left


def test_a_build_killed_on_this_host_leaves_nothing_after_the_next_start(kernel_cache):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = kernel_cache / "cpu-kernels"
    killed = folder / f"{cpu_kernels.BUILDING}{gone.pid}@{socket.gethostname()}@x1"
    elsewhere = folder / f"{cpu_kernels.BUILDING}{gone.pid}@another-host@x2"
    for scratch in (killed, elsewhere):
        scratch.mkdir(parents=True)
        (scratch / "kernels.so").write_bytes(b"half")
    cpu_kernels.library()
    assert not killed.exists() and elsewhere.exists()  # another host's build is its own


def test_a_cache_that_cannot_be_written_builds_a_copy_of_its_own(kernel_cache, monkeypatch):
    kernel_cache.write_text("a file where the folder should be")
    assert hasattr(cpu_kernels.library(), "norm_relu_f64")
    assert kernel_cache.read_text() == "a file where the folder should be"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "another library"])
def test_a_damaged_library_in_the_cache_is_built_again_never_loaded(kernel_cache, damage):
    """Loading a truncated library can kill the process (SIGBUS): its checksum is checked
    first, in a process of its own here so that a failure cannot take the tests down."""
    cpu_kernels.library()
    (library,) = (kernel_cache / "cpu-kernels").glob("kernels-*.so")
    damaged = library.with_name("damaged")  # replaced, not written over: this process maps the library
    damaged.write_bytes(library.read_bytes()[:3000] if damage == "truncated" else Path("/bin/true").read_bytes())
    os.replace(damaged, library)
    code = "from densenet_trainer.speed import cpu_kernels; print(hasattr(cpu_kernels.library(), 'stats_f32'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "True"), result.stderr
    (rebuilt,) = (kernel_cache / "cpu-kernels").glob("kernels-*.so")  # the damaged one is gone
    assert cpu_kernels._digest(rebuilt) == rebuilt.stem.rsplit("-", 1)[1]
