"""The datasets, read from their official files: CIFAR-10, CIFAR-100 and SVHN as uint8
tensors (downloaded with torchvision where asked), checked as they are read (shapes, label
ranges, no pickle that could run code), with the training images' channel statistics and the
validation split.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from densenet_trainer.whole_files import refuse_unless_file
from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import DATASETS, NUM_CLASSES


class DataError(UserError):
    """A dataset problem the user can fix; the message says how."""


@dataclass
class Split:
    images: Tensor  # uint8, (N, 3, 32, 32)
    labels: Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> Split:
        return Split(self.images[indices], self.labels[indices])

    def first(self, count: int) -> Split:
        """The first ``count`` images (all of them when there are fewer)."""
        return self.subset(torch.arange(min(count, len(self))))

    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the images and labels, in order: the same images give
        the same fingerprint wherever they are stored, other images another."""
        digest = hashlib.sha256(self.images.cpu().contiguous().numpy().tobytes())
        digest.update(self.labels.cpu().to(torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What a protocol-2 pickle written by Python 3 calls to make bytes (``_codecs.encode``),
    allowed only for the one encoding such pickles use."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected encoding {encoding!r} for bytes")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR files, which hold only dicts, lists, bytes, numpy arrays and numpy
    scalars (labels rewritten as numpy integers, say).

    Refusing every other global means a tampered dataset file cannot run code.
    """
    _allowed = {(prefix + suffix, name) for prefix in ("numpy.core", "numpy._core")
                for suffix, name in ((".multiarray", "_reconstruct"), (".multiarray", "scalar"))}
    _allowed |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    refuse_unless_file(path)
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing; the folder must hold the official python "
                        f"version of the dataset") from None
    except Exception as error:  # any failure to parse means a damaged file
        raise DataError(f"{path} is not a readable CIFAR python file ({error}); "
                        f"replace it with a fresh copy") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a readable CIFAR python file; replace it with a fresh copy")
    return content


def _checked(path: Path, images, labels, shape: tuple[int, ...], lowest: int, highest: int) -> tuple:
    """One file's images and labels, checked value by value, as (uint8 images, int64 labels):
    8-bit pixels (integers 0-255, never floats), images of ``shape`` (N first, or where -1
    stands), whole-number labels from ``lowest`` to ``highest``, as many labels as images, and at
    least one image. The same checks for every dataset; each failure names the file."""
    fix = "replace it with a fresh copy"
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype.kind not in "ui":
        raise DataError(f"{path} holds {images.dtype} pixels, not 8-bit integers 0-255; {fix}")
    if labels.dtype.kind == "f":  # MATLAB stores numbers as doubles: whole ones are labels
        fractional = labels[labels != np.round(labels)]  # NaN too
        if len(fractional):
            raise DataError(f"{path} holds labels that are not whole numbers (such as "
                            f"{fractional.flat[0]}); {fix}")
    elif labels.dtype.kind not in "ui":
        raise DataError(f"{path} holds {labels.dtype} labels, not integers; {fix}")
    if images.dtype != np.uint8 and images.size and (images.min() < 0 or images.max() > 255):
        raise DataError(f"{path} holds pixels outside 0-255 (such as "
                        f"{images.max() if images.max() > 255 else images.min()}); {fix}")
    axis = shape.index(-1)
    if images.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, images.shape)):
        sizes = "x".join(str(s) for i, s in enumerate(images.shape) if i != axis) or "empty"
        wanted = "x".join(str(s) for i, s in enumerate(shape) if i != axis)
        raise DataError(f"{path} holds images of {sizes}, not {wanted}; {fix}")
    labels = labels.reshape(-1)
    if images.shape[axis] != len(labels):
        raise DataError(f"{path} has {images.shape[axis]} images but {len(labels)} labels; {fix}")
    if not len(labels):
        raise DataError(f"{path} holds no images; {fix}")
    outside = labels[(labels < lowest) | (labels > highest)]
    if len(outside):
        raise DataError(f"{path} has labels outside {lowest}-{highest} (such as {outside[0]:g}); {fix}")
    return images.astype(np.uint8, copy=False), labels.astype(np.int64, copy=False)


def _read_cifar_files(paths: list[Path], label_key: str, num_classes: int) -> Split:
    images, labels = [], []
    for path in paths:
        content = _unpickle(path)
        try:
            data, target = content["data"], content[label_key]
            data = np.asarray(data)
            if data.ndim == 2 and data.shape[1] == 3 * 32 * 32:  # the official layout: rows of pixels
                data = data.reshape(-1, 3, 32, 32)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path} lacks CIFAR image data or labels ({error}); "
                            f"replace it with a fresh copy") from None
        data, target = _checked(path, data, target, (-1, 3, 32, 32), 0, num_classes - 1)
        images.append(data)
        labels.append(target)
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


_CIFAR = {
    # name: (folder, train files, test files, label key, meta file, class-name key, torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "batches.meta", "label_names", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta",
                 "fine_label_names", "CIFAR100"),
}
DATASET_FOLDERS = frozenset([*(folder for folder, *_ in _CIFAR.values()), "svhn"])  # in --data-dir


def _download(folder: Path, fetch) -> None:
    """``fetch()`` a dataset into ``folder``; a failure removes the folders it created."""
    created = None
    if not folder.exists():
        created = folder
        while not created.parent.exists():
            created = created.parent
    try:
        fetch()
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _download_failed(name: str, where: Path, error: Exception, holds: str) -> DataError:
    return DataError(f"{name} is not in {where} and could not be downloaded ({error}); "
                     f"copy it there or point --data-dir at the folder that holds {holds}")


def _load_cifar(name: str, root: Path, download: bool) -> Dataset:
    folder, train_files, test_files, label_key, meta_file, names_key, tv_class = _CIFAR[name]
    where = root / folder
    if not where.is_dir() and (root / meta_file).is_file():
        where = root  # --data-dir names the dataset folder itself
    if not where.is_dir():
        if not download:
            raise DataError(f"{name} is not in {where}; point --data-dir at the folder that "
                            f"holds {folder}/ (or allow the download)")
        try:
            import torchvision
            _download(root, lambda: getattr(torchvision.datasets, tv_class)(str(root), download=True))
        except Exception as error:  # network errors come in many types
            raise _download_failed(name, where, error, f"{folder}/") from None
    names = [str(n) for n in _unpickle(where / meta_file).get(names_key, [])]
    classes = NUM_CLASSES[name]
    return Dataset(name, _read_cifar_files([where / f for f in train_files], label_key, classes),
                   _read_cifar_files([where / f for f in test_files], label_key, classes),
                   names if len(names) == classes else [])  # a damaged list: numbers instead


def _read_svhn_file(path: Path) -> Split:
    """One SVHN ``*_32x32.mat`` file: X is (32, 32, 3, N), y holds 1..10 with 10 for digit 0."""
    from scipy.io import loadmat
    try:
        content = loadmat(path)
        images, labels = content["X"], content["y"]
    except Exception as error:  # scipy raises several types for damaged files
        raise DataError(f"{path} is not a readable SVHN .mat file ({error}); replace it "
                        f"with a fresh copy") from None
    images, labels = _checked(path, images, labels, (32, 32, 3, -1), 1, 10)
    images = np.ascontiguousarray(images.transpose(3, 2, 0, 1))
    return Split(torch.from_numpy(images), torch.from_numpy(labels % 10))


def _load_svhn(root: Path, download: bool, extra: bool) -> Dataset:
    """Read SVHN's .mat files from ``root/svhn`` directly, so copies need no checksum match."""
    where = root / "svhn"  # one of DATASET_FOLDERS

    def split(name: str) -> Split:
        path = where / f"{name}_32x32.mat"
        if not path.is_file():
            if not download:
                raise DataError(f"SVHN's {path.name} is not in {where}; point --data-dir at the "
                                f"folder that holds svhn/ (or allow the download)")
            try:
                import torchvision
                _download(where, lambda: torchvision.datasets.SVHN(str(where), split=name, download=True))
            except Exception as error:  # network errors come in many types
                raise _download_failed(f"SVHN's {path.name}", where, error, "svhn/") from None
        return _read_svhn_file(path)

    train = split("train")
    if extra:
        more = split("extra")
        train = Split(torch.cat([train.images, more.images]), torch.cat([train.labels, more.labels]))
    return Dataset("svhn", train, split("test"), [str(d) for d in range(10)])


def load_dataset(name: str, root: str | os.PathLike, download: bool = True,
                 svhn_extra: bool = True) -> Dataset:
    """Read a dataset from ``root`` (torchvision layout), downloading it when absent.

    CIFAR is read from the official python files directly, so copies that hold fewer images
    than the official release (or whose checksums differ) work as they are.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(root)
    if name == "svhn":
        return _load_svhn(root, download, svhn_extra)
    return _load_cifar(name, root, download)


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0-1 scale.

    This is what the trainer normalises with; attic/dataset_stats.py prints it.
    """
    pixels = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255
    std, mean = torch.std_mean(pixels, dim=1, correction=0)
    return mean.tolist(), std.tolist()


def split_validation(train: Split, size: int, seed: int) -> tuple[Split, Split]:
    """Hold ``size`` training images out as a validation set, chosen by ``seed``."""
    if not 0 < size < len(train):
        raise DataError(f"--val-size must be between 1 and {len(train) - 1}, got {size}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[size:].sort().values), train.subset(order[:size].sort().values)
