"""Shared fixtures: a generated CIFAR-10 folder, the shared real subset, and a CLI runner."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
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
sys.path.insert(0, str(ROOT))

# A tiny model and few images keep every CLI run to a few seconds on 2 cores.
TINY = ["--depth", "10", "--growth-rate", "4", "--batch-size", "32", "--eval-batch-size", "64"]


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


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped, with the reason, without one")


def pytest_collection_modifyitems(config, items) -> None:
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar-10-batches-py").is_dir():
        pytest.skip(f"the shared CIFAR-10 subset is not at {SHARED_DATA} (only CI and "
                    f"developer checkouts have it)")
    return SHARED_DATA


def run_cli(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, in a fresh process."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its content, to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
