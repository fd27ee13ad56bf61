"""The fixtures (a generated CIFAR-10 folder, the shared real subset, finished runs of the
tiny model) and the ``cuda`` marker's skip; the helpers are helpers.py's."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch  # does not import triton

from helpers import SHARED_DATA, TINY, Broken, write_cifar10

if not torch.cuda.is_available():
    # Triton kernels (tests/unit/test_triton.py) run in Triton's interpreter on CPU tensors. It must
    # be chosen before anything imports triton: the library's own helpers (tl.sum's) are
    # compiled or interpreted when triton.language is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The C kernels are built once for the whole session, its subprocesses included, into a cache
# of its own: never into the user's (~/.cache/densenet-trainer), whatever it holds.
_KERNEL_CACHE = tempfile.TemporaryDirectory(prefix="densenet-test-kernels-")
os.environ["DENSENET_KERNEL_CACHE"] = _KERNEL_CACHE.name


# On a GPU, float32 convolutions and matrix products use TF32 by default, about 1e-3 from
# float64: the tests compare paths against float64 and each other far tighter than that.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- data

@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"the shared CIFAR-10 subset is not at {SHARED_DATA} (only CI and "
                    f"developer checkouts have it)")
    return SHARED_DATA


# ---------------------------------------------------------------- runs

@pytest.fixture(scope="session")
def finished(tmp_path_factory, cifar_dir) -> Callable[..., Path]:
    """``finished(*flags)``: a finished run of the tiny model on ``cifar_dir`` with ``flags``,
    trained once per session. Shared: copy it before changing anything in it."""
    import train
    runs: dict[tuple, Path] = {}

    def run(*flags: str) -> Path:
        if flags not in runs:
            work = tmp_path_factory.mktemp("finished") / "run"
            argv = ["--data-dir", str(cifar_dir), "--save", str(work), *TINY, *flags]
            assert train.main(argv) == 0
            runs[flags] = work
        return runs[flags]
    return run


@pytest.fixture(scope="session")
def finished_run(finished) -> Path:
    """A finished two-epoch run of the tiny model."""
    return finished("--epochs", "2")


@pytest.fixture
def broken(monkeypatch):
    """fused.py's kernels on the CPU replaced by a faulty set; the self-test's memo cleared."""
    from densenet_trainer.speed import fused, kernel_check

    def use(fault: str) -> None:
        monkeypatch.setattr(fused, "backend", lambda device_type: Broken(fault))
        kernel_check.failure.cache_clear()
        kernel_check.MODELS_CHECKED.clear()
    yield use
    kernel_check.failure.cache_clear()
    kernel_check.MODELS_CHECKED.clear()
