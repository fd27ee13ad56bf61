"""A run's file primitives (files.py): whole writes that leave the old file or the new one,
CSV logs that keep every epoch once, the one-process lock, and strict checkpoint loading."""
from __future__ import annotations

import os
import re

import pytest
import torch

from densenet_trainer.config.cli import UserError
from densenet_trainer.run import files
from densenet_trainer.run.files import CsvLog, RunError, WorkDirLock


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """The new content goes to a temporary beside the file; a write that fails there (a full
    disk) leaves the old file as it was, removes the temporary and names the file meant."""
    path = tmp_path / "config.json"
    files.write_text(path, "old\n")

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as raised:
        files.write_text(path, "new\n")
    assert raised.value.filename == str(path) and raised.value.errno == 28
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_only_the_temporaries_of_killed_writes_are_removed(tmp_path):
    killed = tmp_path / ".checkpoint.pt.ab12CD_z.tmp"
    mine = [tmp_path / ".notes.tmp", tmp_path / ".checkpoint.pt.short.tmp", tmp_path / "train.csv"]
    for path in [killed, *mine]:
        path.write_text("x")
    files.remove_stale_temporaries(tmp_path)
    assert not killed.exists() and all(path.exists() for path in mine)


def test_a_csv_log_keeps_each_epoch_once(tmp_path):
    """On resume the rows after the checkpoint's epoch and a half-written last line go; a
    file that lacks an epoch the checkpoint trained is refused, unchanged."""
    log = CsvLog(tmp_path / "test.csv", ["epoch", "loss", "error"])
    log.create()
    for epoch in (1, 2, 3):
        log.append({"epoch": epoch, "loss": 1 / epoch, "error": 50.0})
    with open(log.path, "a") as f:
        f.write("4,0.2")  # a row killed halfway
    assert log.epochs() == [1, 2, 3]
    log.keep_epochs_up_to(2)
    assert log.path.read_text() == "epoch,loss,error\n1,1,50\n2,0.5,50\n"
    before = log.path.read_text()
    with pytest.raises(RunError, match="does not hold a row for each of the epochs 1-3"):
        log.check_resumable(3)
    assert log.path.read_text() == before


@pytest.mark.parametrize("text, message", [
    ("epoch,loss\n1,2\n", "does not start with the header epoch,loss,error"),
    ("epoch,loss,error\none,2,3\n", "line 2: epoch is 'one', not a finite number"),
    ("epoch,loss,error\n1,2,3,\n2,2,3,\n", "line 2: 4 fields where the header has 3"),
    ("epoch,loss,error\n1,2,3\n2,2\n", "line 3: 2 fields where the header has 3"),
    ("epoch,loss,error\n1,inf,3\n", "line 2: loss is 'inf', not a finite number"),
    ("epoch,loss,error\n1,2,3\n3,2,3\n", "line 3: epoch 3 where 2 comes next"),
    ("epoch,loss,error\n1.5,2,3\n", "line 2: epoch 1.5 where 1 comes next"),
    (b"\xff\xfe", "cannot be read")])
def test_a_csv_log_that_is_not_ours_is_refused(tmp_path, text, message):
    """Read strictly: the header, every field a finite number, as many as the header names,
    epochs 1, 2, ... in order; the refusal names the file and the line."""
    path = tmp_path / "test.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        CsvLog(path, ["epoch", "loss", "error"]).epochs()


def test_the_lock_admits_one_holder_and_names_it(tmp_path):
    """A second holder is refused with the first one's pid and the advice; a released lock
    leaves no file and can be taken again."""
    first, second = WorkDirLock(tmp_path / "run", "use another --save"), WorkDirLock(tmp_path / "run", "wait")
    first.acquire()
    with pytest.raises(RunError, match=rf"is in use by pid {os.getpid()} on .*: wait for it to end"):
        second.acquire()
    first.release()
    assert not (tmp_path / "run" / ".lock").exists()
    second.acquire()
    assert second.held
    second.release()


def test_a_checkpoint_is_loaded_only_whole_finite_and_ours(tmp_path):
    good = tmp_path / "good.pt"
    files.save_checkpoint(good, {"model": {"w": torch.ones(2)}, "config": {}})
    assert torch.equal(files.load_checkpoint(good)["model"]["w"], torch.ones(2))
    cases = {"missing.pt": (None, "no checkpoint file at"),
             "cut.pt": (good.read_bytes()[:-40], "is truncated or corrupt"),
             "other.pt": ({"weights": {}}, "is not a checkpoint of this trainer"),
             "nan.pt": ({"model": {"w": torch.tensor([float("nan")])}, "config": {}},
                        r"holds non-finite weights \(w\)")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            files.save_checkpoint(path, content)
        with pytest.raises(RunError, match=message):
            files.load_checkpoint(path)
