"""Every mistake a user can make: one line that says what to do, non-zero exit, nothing changed."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import train
from conftest import TINY, folder_snapshot, run_cli, write_cifar10


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_dir) -> Path:
    work = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("train.py", "--data-dir", cifar_dir, "--save", work, *TINY, "--epochs", "1")
    assert result.returncode == 0, result.stderr
    return work


@pytest.fixture
def cli(capsys):
    """train.py's main in this process: the same code path as the script, without the start-up."""
    def run(*argv) -> tuple[int, str]:
        try:
            status = train.main([str(a) for a in argv])
        except SystemExit as exit:  # argparse
            status = exit.code
        return status, capsys.readouterr().err
    return run


def check_refused(result, message: str, status: int = 2) -> None:
    if isinstance(result, tuple):
        code, stderr = result
    else:
        code, stderr = result.returncode, result.stderr
    assert code == status, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr  # one line, no traceback
    assert message in lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--depth", "41"], "depth 41 is impossible for DenseNet-BC (bottleneck): depth - 4 must be a "
                        "positive multiple of 6; nearest valid depths: 40 or 46"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--batch-size", "-4"], "--batch-size must be a positive integer, got -4"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--depth", "ten"], "argument --depth: invalid int value: 'ten'"),
])
def test_bad_flags(cli, tmp_path, flags, message):
    check_refused(cli("--save", tmp_path / "run", *flags), message)
    assert not (tmp_path / "run").exists()


def test_data_absent_and_no_download(cli, tmp_path):
    result = cli("--data-dir", tmp_path / "nothing", "--no-download",
                     "--save", tmp_path / "run")
    check_refused(result, f"cifar10 is not in {tmp_path / 'nothing' / 'cifar-10-batches-py'}; "
                          f"point --data-dir at the folder that holds cifar-10-batches-py/")
    assert not (tmp_path / "run").exists()


def test_data_absent_offline_download_fails(tmp_path):
    result = run_cli("train.py", "--data-dir", tmp_path / "nothing", "--save", tmp_path / "run",
                     env={"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})
    check_refused(result, "could not be downloaded")
    assert "point --data-dir at the folder that holds cifar-10-batches-py/" in result.stderr
    assert not (tmp_path / "run").exists()


def test_corrupt_dataset_file(cli, tmp_path, cifar_dir):
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    (data / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04not a pickle at all")
    check_refused(cli("--data-dir", data, "--save", tmp_path / "run", *TINY),
                  f"{data / 'cifar-10-batches-py' / 'data_batch_3'} is not a readable CIFAR python file")
    assert not (tmp_path / "run").exists()


def test_dataset_pickle_cannot_run_code(cli, tmp_path):
    data = write_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    import pickle
    (data / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Payload()}))
    check_refused(cli("--data-dir", data, "--save", tmp_path / "run", *TINY),
                  "unexpected object")
    assert not marker.exists()


def test_existing_run_without_resume(cli, finished_run, cifar_dir):
    before = folder_snapshot(finished_run)
    check_refused(cli("--data-dir", cifar_dir, "--save", finished_run, *TINY),
                  f"{finished_run} already holds a run; continue it with --resume")
    assert folder_snapshot(finished_run) == before


def test_resume_with_no_run(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    check_refused(cli("--resume", "--save", tmp_path / "empty"),
                  "holds no run to resume (no checkpoint.pt or config.json)")
    assert not list((tmp_path / "empty").iterdir())


def test_unwritable_work_directory(cli, tmp_path, cifar_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    check_refused(cli("--data-dir", cifar_dir, "--save", blocker / "run", *TINY),
                  f"cannot write to the work directory {blocker / 'run'}")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint(cli, tmp_path, finished_run, cifar_dir, damage):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    checkpoint = work / "checkpoint.pt"
    content = checkpoint.read_bytes()
    checkpoint.write_bytes(content[:len(content) // 2] if damage == "truncated" else b"\x00" * 100)
    before = folder_snapshot(work)
    result = cli("--resume", "--save", work, "--epochs", "2", "--data-dir", cifar_dir)
    check_refused(result, f"{checkpoint} is truncated or corrupt")
    assert folder_snapshot(work) == before


def test_malicious_checkpoint_is_refused_and_never_runs(cli, tmp_path, finished_run, cifar_dir):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = torch.load(work / "checkpoint.pt", weights_only=True)
    state["model"]["evil"] = Payload()
    torch.save(state, work / "checkpoint.pt")
    before = folder_snapshot(work)
    for command in (["--resume", "--save", work, "--epochs", "2"],
                    ["--evaluate", work / "checkpoint.pt"]):
        result = cli(*command, "--data-dir", cifar_dir)
        check_refused(result, f"refusing to load {work / 'checkpoint.pt'}: it holds objects "
                              f"other than tensors and plain data")
    assert not marker.exists()
    assert folder_snapshot(work) == before


def test_non_finite_loss_stops_and_keeps_rows(tmp_path, cifar_dir):
    work = tmp_path / "run"
    result = run_cli("train.py", "--data-dir", cifar_dir, "--save", work, *TINY, "--lr", "1e30",
                     "--epochs", "2")
    check_refused(result, "the loss is not finite at epoch 1, step ", status=1)
    assert (work / "train.csv").read_text() == "epoch,lr,loss,error,seconds,images_per_s\n"
    assert not (work / "checkpoint.pt").exists()


def test_evaluate_missing_checkpoint(cli, tmp_path):
    check_refused(cli("--evaluate", tmp_path / "nope.pt"),
                  f"no checkpoint file at {tmp_path / 'nope.pt'}")
