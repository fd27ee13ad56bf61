"""Reading the datasets (datasets.py): the official CIFAR and SVHN layouts, every file checked
value by value, a failed download leaving nothing, the validation split."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densenet_trainer.config.run_config import NUM_CLASSES
from densenet_trainer.data import datasets
from helpers import write_cifar10, write_cifar100


def test_reads_official_layout_with_fewer_images(cifar_dir):
    dataset = datasets.load_dataset("cifar10", cifar_dir, download=False)
    assert dataset.train.images.shape == (160, 3, 32, 32) and dataset.train.images.dtype == torch.uint8
    assert len(dataset.test) == 48 and dataset.classes[0] == "airplane"
    assert int(dataset.train.labels.max()) < 10


def test_validation_split_is_disjoint_and_seeded(cifar_dir):
    train = datasets.load_dataset("cifar10", cifar_dir, download=False).train
    rest, val = datasets.split_validation(train, 40, seed=1)
    again, val_again = datasets.split_validation(train, 40, seed=1)
    assert len(rest) == 120 and len(val) == 40 and torch.equal(val.images, val_again.images)
    together = torch.cat([rest.images, val.images]).flatten(1)
    assert len(torch.unique(together, dim=0)) == 160


def test_data_dir_may_name_the_dataset_folder_itself(cifar_dir):
    dataset = datasets.load_dataset("cifar10", cifar_dir / "cifar-10-batches-py", download=False)
    assert len(dataset.train) == 160


def test_reads_cifar100_layout(tmp_path):
    write_cifar100(tmp_path)
    dataset = datasets.load_dataset("cifar100", tmp_path, download=False)
    assert (len(dataset.train), len(dataset.test), len(dataset.classes)) == (30, 10, 100)
    assert int(dataset.train.labels.max()) < NUM_CLASSES["cifar100"] == 100


def test_reads_svhn_mat_files(tmp_path):
    import numpy as np
    from scipy.io import savemat
    folder = tmp_path / "svhn"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = {}
    for name, count in (("train", 12), ("extra", 8), ("test", 5)):
        pixels[name] = rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
        labels = (np.arange(count) + 9) % 10 + 1  # 10, 1, 2, ...: SVHN writes digit 0 as 10
        savemat(folder / f"{name}_32x32.mat", {"X": pixels[name], "y": labels.reshape(-1, 1)})
    dataset = datasets.load_dataset("svhn", tmp_path, download=False)
    assert (len(dataset.train), len(dataset.test)) == (20, 5)
    assert torch.equal(dataset.test.images[2], torch.from_numpy(pixels["test"][..., 2]).permute(2, 0, 1))
    assert dataset.test.labels.tolist() == [0, 1, 2, 3, 4]
    no_extra = datasets.load_dataset("svhn", tmp_path, download=False, svhn_extra=False)
    assert len(no_extra.train) == 12


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch, name):
    """What the download created (the data folder, a partial archive) goes; what was there stays."""
    import torchvision

    def offline(root, *args, **kwargs):
        Path(root).mkdir(parents=True)
        (Path(root) / "partial.tar.gz").write_bytes(b"\0" * 10)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(torchvision.datasets, "SVHN", offline)
    (tmp_path / "mine").mkdir()
    with pytest.raises(datasets.DataError, match="could not be downloaded .*network is unreachable"):
        datasets.load_dataset(name, tmp_path / "mine" / "data")
    assert list((tmp_path / "mine").iterdir()) == []


def _cifar_with(tmp_path, **changes):
    """The generated CIFAR-10 with test_batch's entries replaced by ``changes``."""
    import pickle
    root = write_cifar10(tmp_path / "data")
    path = root / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        content = pickle.load(f)
    content.update(changes)
    with open(path, "wb") as f:
        pickle.dump(content, f)
    return root, path


def _svhn_with(tmp_path, X, y):
    import numpy as np
    from scipy.io import savemat
    folder = tmp_path / "svhn"
    folder.mkdir()
    good = np.zeros((32, 32, 3, 4), dtype=np.uint8)
    for name in ("train", "extra"):
        savemat(folder / f"{name}_32x32.mat", {"X": good, "y": np.ones((4, 1))})
    savemat(folder / "test_32x32.mat", {"X": X, "y": y})
    return folder / "test_32x32.mat"


def _cifar_cases():
    import numpy as np
    pixels = np.zeros((48, 3072), dtype=np.uint8)
    return {
        "float pixels": ({"data": pixels.astype(np.float32) / 255}, "holds float32 pixels, not 8-bit integers 0-255"),
        "pixels above 255": ({"data": pixels.astype(np.int32) + 300}, "holds pixels outside 0-255 (such as 300)"),
        "fractional labels": ({"labels": [0.5] * 48}, "holds labels that are not whole numbers (such as 0.5)"),
        "text labels": ({"labels": ["cat"] * 48}, "holds <U3 labels, not integers"),
        "labels out of range": ({"labels": [12] * 48}, "has labels outside 0-9 (such as 12)"),
        "fewer labels": ({"labels": [1] * 40}, "has 48 images but 40 labels"),
        "wrong image size": ({"data": np.zeros((48, 3000), dtype=np.uint8)}, "holds images of 3000, not 3x32x32"),
        "empty": ({"data": np.zeros((0, 3072), dtype=np.uint8), "labels": []}, "holds no images"),
    }


@pytest.mark.parametrize("case", list(_cifar_cases()))
def test_cifar_files_are_checked_value_by_value(tmp_path, case):
    changes, message = _cifar_cases()[case]
    root, path = _cifar_with(tmp_path, **changes)
    with pytest.raises(datasets.DataError) as refused:
        datasets.load_dataset("cifar10", root, download=False)
    assert str(refused.value) == f"{path} {message}; replace it with a fresh copy"


def _svhn_cases():
    import numpy as np
    images = np.zeros((32, 32, 3, 6), dtype=np.uint8)
    labels = np.ones((6, 1))
    return {
        "label 37": (images, labels * 37, "has labels outside 1-10 (such as 37)"),
        "label 0": (images, labels * 0, "has labels outside 1-10 (such as 0)"),
        "more images than labels": (images, labels[:4], "has 6 images but 4 labels"),
        "28x28": (np.zeros((28, 28, 3, 6), dtype=np.uint8), labels, "holds images of 28x28x3, not 32x32x3"),
        "float pixels": (images.astype(np.float64) + 0.5, labels, "holds float64 pixels, not 8-bit integers 0-255"),
    }


@pytest.mark.parametrize("case", list(_svhn_cases()))
def test_svhn_files_get_the_same_checks(tmp_path, case):
    X, y, message = _svhn_cases()[case]
    path = _svhn_with(tmp_path, X, y)
    with pytest.raises(datasets.DataError) as refused:
        datasets.load_dataset("svhn", tmp_path, download=False)
    assert str(refused.value) == f"{path} {message}; replace it with a fresh copy"


def test_copies_rewritten_by_python_3_are_read(tmp_path):
    """CIFAR files pickled again by Python 3 with protocol 2 (bytes as ``_codecs.encode``) and
    labels stored as numpy integers: harmless, common, read as the originals are."""
    import pickle

    import numpy as np
    root = write_cifar10(tmp_path / "data")
    original = datasets.load_dataset("cifar10", root, download=False)
    for path in (root / "cifar-10-batches-py").iterdir():
        with open(path, "rb") as f:
            content = pickle.load(f)
        if "labels" in content:
            content["labels"] = [np.int64(label) for label in content["labels"]]
            content["batch_label"] = content["batch_label"].encode()
        with open(path, "wb") as f:
            pickle.dump(content, f, protocol=2)
    assert b"_codecs" in (root / "cifar-10-batches-py" / "test_batch").read_bytes()
    rewritten = datasets.load_dataset("cifar10", root, download=False)
    assert torch.equal(rewritten.train.images, original.train.images)
    assert torch.equal(rewritten.test.labels, original.test.labels)
    assert rewritten.classes == original.classes


def test_bytes_in_another_encoding_are_refused(tmp_path):
    """The one call admitted for bytes takes latin1 only: a pickle that asks for another codec
    (one that decompresses, say) is refused."""
    root = write_cifar10(tmp_path / "data")
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x04\x00\x00\x00zlibq\x02\x86q\x03Rq\x04.")
    with pytest.raises(datasets.DataError, match="unexpected encoding 'zlib' for bytes"):
        datasets.load_dataset("cifar10", root, download=False)
