"""Shared fixtures and helpers: generated datasets, the shared real subset, runs of the trainer
through its command line, snapshots of folders, and the markers ``cuda`` and ``slow``."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    # Triton kernels (tests/test_triton.py) run in Triton's interpreter on CPU tensors. It must
    # be chosen before anything imports triton: the library's own helpers (tl.sum's) are
    # compiled or interpreted when triton.language is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# A tiny model and few images keep every CLI run to a few seconds on 2 cores. The tests force
# the CPU: --device auto would pick a GPU where there is one, and these tests are about the
# CPU path (the cuda-marked ones name their device).
TINY_MODEL = ["--depth", "10", "--growth-rate", "4", "--batch-size", "32", "--device", "cpu"]
TINY = [*TINY_MODEL, "--eval-batch-size", "64"]  # train.py's, which evaluates

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

def write_cifar10(root: Path, train_per_batch: int = 32, test: int = 48, seed: int = 0) -> Path:
    """A CIFAR-10 folder in the official python layout with random images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, count: int) -> None:
        content = {"batch_label": name, "filenames": [f"{i}.png" for i in range(count)],
                   "labels": rng.integers(0, 10, count).tolist(),
                   "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", train_per_batch)
    dump("test_batch", test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"]}, f)
    return root


def write_cifar100(root: Path, train: int = 30, test: int = 10, seed: int = 0) -> Path:
    """A CIFAR-100 folder in the official python layout with random images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", train), ("test", test)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, count).tolist(),
                         "coarse_labels": rng.integers(0, 20, count).tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"the shared CIFAR-10 subset is not at {SHARED_DATA} (only CI and "
                    f"developer checkouts have it)")
    return SHARED_DATA


# ---------------------------------------------------------------- running the scripts

def run_cli(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, in a fresh process."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_main(capsys, main: Callable[[list[str]], int], *argv) -> tuple[int, str, str]:
    """A script's ``main`` in this process (its command's own code, without another start-up
    of torch): (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def start_run(capsys, work: Path, data_dir: Path, *flags) -> str:
    """train.py with the tiny model into ``work``; must succeed. Returns what it printed."""
    import train
    status, out, err = run_main(capsys, train.main, "--data-dir", data_dir, "--save", work, *TINY,
                                *flags)
    assert status == 0, err
    return out


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


def check_refused(code: int, stderr: str, message: str, status: int = 2) -> None:
    """A refusal as the project makes them: ``status``, one line on stderr, no traceback."""
    assert code == status, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


# ---------------------------------------------------------------- what runs leave

def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def metrics(work: Path) -> tuple[list, list]:
    """Per-epoch losses and errors of a run, the columns that must not depend on how it ran
    (interruptions, resumes, the version that wrote it); not its timings."""
    return ([(r["epoch"], r["lr"], r["loss"], r["error"]) for r in read_csv(work / "train.csv")],
            [(r["epoch"], r["loss"], r["error"]) for r in read_csv(work / "test.csv")])


def snapshot(folder: Path) -> dict[str, str]:
    """A hash of every file under ``folder``, to show that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Payload:
    """A pickled object that, when unpickled, would create ``marker``: what a tampered
    dataset or checkpoint could smuggle in."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- models

def same_weights(*kernels: str, **kwargs) -> list:
    """DenseNets with the same weights, one per kernel choice (``DenseNet(**kwargs)``)."""
    from densenet import DenseNet
    models = []
    for choice in kernels:
        torch.manual_seed(0)
        models.append(DenseNet(**kwargs, kernels=choice))
    return models


@contextlib.contextmanager
def on_forward(callback: Callable, training: bool) -> Iterator[None]:
    """Call ``callback(count, model, output)`` after every forward of a whole DenseNet in
    training (or evaluation) mode, ``count`` from 1; what it returns, if not None, replaces
    the output. A public PyTorch hook on every module: a test injects a fault into a real run
    without touching the trainer's code."""
    from densenet import DenseNet
    calls = 0

    def hook(module, args, output):
        nonlocal calls
        if isinstance(module, DenseNet) and module.training == training:
            calls += 1
            return callback(calls, module, output)
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
