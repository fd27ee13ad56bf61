"""train.py end to end, as a user runs it: CSVs, schedule, resume, refusals, evaluation."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import TINY, folder_snapshot, run_cli


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def train(work: Path, data_dir: Path, *extra: str):
    return run_cli("train.py", "--data-dir", data_dir, "--save", work, *TINY, *extra)


def test_two_epochs_on_shared_subset(tmp_path, shared_data):
    work = tmp_path / "run"
    result = train(work, shared_data, "--epochs", "2", "--train-subset", "256",
                   "--test-subset", "128")
    assert result.returncode == 0, result.stderr
    assert "found 4660 training and 846 test images" in result.stdout
    assert "2,666 parameters" in result.stdout
    assert "final test error" in result.stdout
    train_rows, test_rows = read_csv(work / "train.csv"), read_csv(work / "test.csv")
    assert list(train_rows[0]) == ["epoch", "lr", "loss", "error", "seconds", "images_per_s"]
    assert list(test_rows[0]) == ["epoch", "loss", "error", "seconds"]
    assert [r["epoch"] for r in train_rows] == ["1", "2"] == [r["epoch"] for r in test_rows]
    for row in train_rows + test_rows:
        assert 0 <= float(row["error"]) <= 100 and float(row["loss"]) > 0
    config = json.loads((work / "config.json").read_text())
    assert config["parameters"] == 2666 and config["config"]["depth"] == 10
    assert config["train_images"] == 256 and config["environment"]["torch"]
    assert (work / "checkpoint.pt").is_file()


def test_schedule_validation_and_refusal_to_overwrite(tmp_path, cifar_dir):
    work = tmp_path / "run"
    result = train(work, cifar_dir, "--epochs", "4", "--val-size", "32")
    assert result.returncode == 0, result.stderr
    assert "using 128 training, 32 validation and 48 test images" in result.stdout
    lrs = [float(r["lr"]) for r in read_csv(work / "train.csv")]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])  # divided by 10 at 50% and 75%
    assert [r["epoch"] for r in read_csv(work / "val.csv")] == ["1", "2", "3", "4"]
    before = folder_snapshot(work)
    again = train(work, cifar_dir, "--epochs", "4")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {work} already holds a run; continue it with --resume --save {work} "
        f"or start a new one with another --save DIR"]
    assert folder_snapshot(work) == before


def metrics(work: Path) -> list[tuple]:
    """Per-epoch losses and errors, the columns that must not depend on interruptions."""
    return ([(r["epoch"], r["lr"], r["loss"], r["error"]) for r in read_csv(work / "train.csv")],
            [(r["epoch"], r["loss"], r["error"]) for r in read_csv(work / "test.csv")])


def test_resume_equals_uninterrupted_run(tmp_path, cifar_dir):
    flags = ["--epochs", "2", "--dropout", "0.1"]  # dropout: the torch RNG must be restored too
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(whole, cifar_dir, *flags).returncode == 0
    first = train(parts, cifar_dir, *flags, "--stop-after", "1")
    assert first.returncode == 0 and "continue with --resume" in first.stdout
    assert len(read_csv(parts / "train.csv")) == 1
    resumed = run_cli("train.py", "--resume", "--save", parts, "--data-dir", cifar_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert metrics(parts) == metrics(whole)
    config = json.loads((parts / "config.json").read_text())
    assert config["resumes"][0]["from_epoch"] == 1


def test_resume_refuses_contradicting_flags(tmp_path, cifar_dir):
    work = tmp_path / "run"
    assert train(work, cifar_dir, "--epochs", "1").returncode == 0
    before = folder_snapshot(work)
    result = run_cli("train.py", "--resume", "--save", work, "--depth", "16", "--data-dir", cifar_dir)
    assert result.returncode == 2
    assert "--depth 16 (the run has 10)" in result.stderr
    assert folder_snapshot(work) == before
    finished = run_cli("train.py", "--resume", "--save", work, "--data-dir", cifar_dir)
    assert finished.returncode == 0 and "pass --epochs N to train longer" in finished.stdout
    extended = run_cli("train.py", "--resume", "--save", work, "--epochs", "2", "--data-dir", cifar_dir)
    assert extended.returncode == 0, extended.stderr
    assert [r["epoch"] for r in read_csv(work / "train.csv")] == ["1", "2"]


def test_evaluate_writes_per_class_errors(tmp_path, cifar_dir):
    work = tmp_path / "run"
    assert train(work, cifar_dir, "--epochs", "1").returncode == 0
    last_error = float(read_csv(work / "test.csv")[-1]["error"])
    result = run_cli("train.py", "--evaluate", work / "checkpoint.pt", "--data-dir", cifar_dir)
    assert result.returncode == 0, result.stderr
    assert f"test error {last_error:.2f}%" in result.stdout
    rows = read_csv(work / "checkpoint-classes.csv")
    assert [r["name"] for r in rows][:2] == ["airplane", "automobile"]
    assert sum(int(r["images"]) for r in rows) == 48
    assert sum(int(r["errors"]) for r in rows) == round(last_error * 48 / 100)
    confusion = list(csv.reader(open(work / "checkpoint-confusion.csv")))
    assert len(confusion) == 11 and sum(int(v) for row in confusion[1:] for v in row[1:]) == 48
    flipped = run_cli("train.py", "--evaluate", work / "checkpoint.pt", "--data-dir", cifar_dir, "--tta")
    assert flipped.returncode == 0 and "flip test-time augmentation" in flipped.stdout
    assert (work / "checkpoint-classes-tta.csv").is_file()


@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "fp16"],
                                   ["--compile", "--memory-efficient", "--no-channels-last"]])
def test_speed_flags_train_on_cpu(tmp_path, cifar_dir, flags):
    work = tmp_path / "run"
    result = train(work, cifar_dir, "--epochs", "1", *flags)
    assert result.returncode == 0, result.stderr
    assert float(read_csv(work / "test.csv")[0]["loss"]) > 0
