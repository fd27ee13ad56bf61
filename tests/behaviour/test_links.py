"""Nothing is written through a link, or into anything but a regular file, by any script:
the lock, a run's CSVs, config.json and checkpoints, the evaluation files, the figures and
the tables. Each is refused in one line before anything changes, inside the folder or
outside it; and a figure whose write fails keeps the previous one."""
from __future__ import annotations

import os
import shutil

import pytest

import plot
import train
from helpers import TINY, check_refused, run_main, snapshot

REFUSED = "is a symbolic link; a run's files are written only as regular files inside its folder"


@pytest.fixture
def outside(tmp_path):
    """A folder that is not the run's, holding a file of someone else's."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_text("mine\n")
    return folder


def run_copy(finished_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    return work


@pytest.mark.parametrize("dangling", [False, True])
def test_a_lock_that_is_a_link_is_refused(tmp_path, cifar_dir, capsys, outside, dangling):
    """A .lock linked to a file elsewhere, or dangling: the file is not truncated, the target
    not created, the run not started."""
    work = tmp_path / "run"
    work.mkdir()
    target = outside / ("nowhere.txt" if dangling else "precious.txt")
    (work / ".lock").symlink_to(target)
    before = snapshot(outside)
    code, _, err = run_main(capsys, train.main, "--data-dir", cifar_dir, "--save", work, *TINY,
                            "--epochs", "1")
    check_refused(code, err, f"{work / '.lock'} {REFUSED}")
    assert snapshot(outside) == before and not (outside / "nowhere.txt").exists()
    assert sorted(p.name for p in work.iterdir()) == [".lock"]


def test_a_run_whose_files_link_into_another_is_refused(tmp_path, finished_run, cifar_dir, capsys):
    """`ln -s A/* B/` then resuming B: refused before anything is read or written; A, the run
    the links lead to, is unchanged."""
    a, b = run_copy(finished_run, tmp_path), tmp_path / "b"
    b.mkdir()
    for path in a.iterdir():
        (b / path.name).symlink_to(path)
    before = snapshot(a)
    code, _, err = run_main(capsys, train.main, "--resume", "--save", b, "--epochs", "3",
                            "--data-dir", cifar_dir)
    assert code == 2 and REFUSED in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(a) == before


def test_a_csv_that_is_a_directory_is_refused(tmp_path, finished_run, cifar_dir, capsys):
    work = run_copy(finished_run, tmp_path)
    (work / "val.csv").mkdir()
    before = snapshot(work)
    code, _, err = run_main(capsys, train.main, "--resume", "--save", work, "--epochs", "3",
                            "--data-dir", cifar_dir)
    check_refused(code, err, f"{work / 'val.csv'} is not a regular file")
    assert snapshot(work) == before


def test_evaluation_files_that_are_links_are_refused(tmp_path, finished_run, cifar_dir, capsys, outside):
    work = run_copy(finished_run, tmp_path)
    (work / "checkpoint-classes.csv").symlink_to(outside / "precious.txt")
    before = snapshot(outside)
    code, _, err = run_main(capsys, train.main, "--evaluate", work, "--data-dir", cifar_dir)
    check_refused(code, err, f"{work / 'checkpoint-classes.csv'} {REFUSED}")
    assert snapshot(outside) == before and not (work / "checkpoint-confusion.csv").exists()


@pytest.mark.parametrize("name, flags", [("curves.png", []),
                                         ("results.md", ["--table", "--table-format", "all"])])
def test_figures_and_tables_that_are_links_are_refused(tmp_path, finished_run, capsys, outside,
                                                       name, flags):
    work = run_copy(finished_run, tmp_path)
    folder = work if name == "curves.png" else tmp_path
    (folder / name).symlink_to(outside / "precious.txt")
    before = snapshot(outside)
    code, _, err = run_main(capsys, plot.main, work, *flags)
    check_refused(code, err, f"{folder / name} {REFUSED}")
    assert snapshot(outside) == before


@pytest.mark.slow
def test_a_figure_whose_write_fails_keeps_the_previous_one(tmp_path, finished_run, capsys, monkeypatch):
    """A full disk while the new figure is written: the old figure stays whole, no temporary
    is left, and the message names the figure."""
    work = run_copy(finished_run, tmp_path)
    assert run_main(capsys, plot.main, work)[0] == 0
    before = snapshot(work)

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    code, _, err = run_main(capsys, plot.main, work, "--style", "ggplot")
    check_refused(code, err, f"cannot write {work / 'loss.png'} (No space left on device)")
    assert snapshot(work) == before


def test_a_lock_that_is_a_hard_link_is_refused(tmp_path, cifar_dir, capsys, outside):
    work = tmp_path / "run"
    work.mkdir()
    os.link(outside / "precious.txt", work / ".lock")
    before = snapshot(outside)
    code, _, err = run_main(capsys, train.main, "--data-dir", cifar_dir, "--save", work, *TINY,
                            "--epochs", "1")
    check_refused(code, err, f"{work / '.lock'} has other names (hard links) elsewhere")
    assert snapshot(outside) == before


def test_an_evaluation_refused_writes_neither_file(tmp_path, finished_run, cifar_dir, capsys, outside):
    """The second of the two evaluation files is a link: the first is not written either."""
    work = run_copy(finished_run, tmp_path)
    (work / "checkpoint-confusion.csv").symlink_to(outside / "precious.txt")
    code, _, err = run_main(capsys, train.main, "--evaluate", work, "--data-dir", cifar_dir)
    check_refused(code, err, f"{work / 'checkpoint-confusion.csv'} {REFUSED}")
    assert not (work / "checkpoint-classes.csv").exists()


def test_reads_never_wait_on_a_fifo(tmp_path, finished_run, cifar_dir, capsys):
    """A FIFO where a file is read (config.json beside a checkpoint, an image) is passed over or
    refused at once, never read (which would wait for a writer forever)."""
    from attic import predict
    work = run_copy(finished_run, tmp_path)
    (work / "config.json").unlink()
    os.mkfifo(work / "config.json")
    code, _, err = run_main(capsys, train.main, "--evaluate", work, "--data-dir", cifar_dir)
    assert code == 0, err
    os.mkfifo(tmp_path / "image.png")
    code, _, err = run_main(capsys, predict.main, work, tmp_path / "image.png")
    check_refused(code, err, f"{tmp_path / 'image.png'} is not a regular file")


@pytest.mark.slow
def test_output_that_cannot_be_written_never_stops_a_run(tmp_path, cifar_dir):
    """stdout on a full device (/dev/full), and a save path that is not UTF-8: the run ends
    normally, its files whole."""
    import subprocess
    import sys

    from helpers import ROOT
    save = os.fsencode(str(tmp_path)) + b"/caf\xe9"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data-dir", str(cifar_dir),
                                 "--save", save, *TINY, "--epochs", "1"], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (os.fsdecode(save) and (tmp_path / os.fsdecode(b"caf\xe9") / "checkpoint.pt").is_file())
