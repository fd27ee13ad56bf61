"""A run's files: one process per work directory, crash-safe CSV logs, atomic writes, safe loading.

A work directory belongs to one process at a time: an exclusive lock (flock) on its
``.lock`` file, which the kernel drops when the process ends however it ends, so a killed
run never leaves a lock that blocks the next one.

Every write that replaces a file goes through a temporary file in the same folder, is
flushed and fsynced, then renamed over the old one, so a kill at any moment leaves either
the old file or the new one, never a mix; the temporary file of a killed write is removed
when the run next starts. CSV rows are appended whole and fsynced; on resume, rows past the
checkpoint and a half-written last line are dropped, so every epoch appears exactly once.
A write that fails (disk full, read-only folder) raises RunError naming the file.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pickle
import re
import socket
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from densenet_trainer.config.cli import UserError
from densenet_trainer.data.datasets import DATASET_FOLDERS
from densenet_trainer.loop.training import non_finite
from densenet_trainer.results.layout import EVALUATION_FILES, LOCK_FILE, RUN_FILES
from densenet_trainer.results.numeric_csv import read_numeric_csv
from densenet_trainer.whole_files import (
    append_line,
    atomic_write,
    open_in_place,
    refuse_unless_file,
    write_text,
)


class RunError(UserError):
    """A problem with a run's files that the user can fix; the message says how."""


def run_files_in(folder: Path) -> list[str]:
    """The files in ``folder`` that a run writes, or its --evaluate beside its checkpoints."""
    return [name for name in RUN_FILES if (folder / name).exists()] + sorted(
        found.name for pattern in EVALUATION_FILES for found in folder.glob(pattern))


def holds_run(folder: Path) -> bool:
    return bool(run_files_in(folder))


def refuse_foreign_folder(folder: Path, data_dir: str) -> None:
    """RunError where ``folder`` is a place no run may write in: git's own folder (.git), or
    the folder of the images it reads (--data-dir, or a dataset's folder in it)."""
    resolved, data = folder.resolve(), Path(data_dir).resolve()
    if ".git" in resolved.parts:
        raise RunError(f"{folder} is inside a .git folder, which is git's own; choose another with --save")
    if resolved == data or (data in resolved.parents and resolved.relative_to(data).parts[0] in DATASET_FOLDERS):
        raise RunError(f"{folder} is where the images are read from (--data-dir {data_dir}); "
                       f"choose another with --save")


class WorkDirLock:
    """Exclusive use of a work directory by this process, from ``acquire`` to ``release``.

    The holder writes who it is into the lock file (pid, host, command) so that a refused
    process can name it, on this machine or another one sharing the folder, and removes the
    file when it is done, so that a finished or refused run leaves no trace; only a killed
    one leaves the file, which the next holder takes over. ``advice`` ends both refusals:
    what the user can do instead.
    """

    def __init__(self, folder: Path, advice: str) -> None:
        self.folder, self.advice = folder, advice
        self._fd: int | None = None
        self.made = False  # whether acquire made the folder: released empty (a refusal), it goes

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, creating the folder if needed; RunError if it is busy or unwritable."""
        path = self.folder / LOCK_FILE
        while self._fd is None:
            try:
                self.made = self.made or not self.folder.exists()
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = open_in_place(path, os.O_RDWR | os.O_CREAT)
            except OSError as error:
                raise RunError(f"cannot write to {self.folder} ({error.strerror}); "
                               f"{self.advice}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 1000, 0).decode(errors="replace").strip()
                os.close(fd)
                raise RunError(f"{self.folder} is in use by {holder or 'another process'}: wait "
                               f"for it to end or stop it, or {self.advice}") from None
            try:  # the file may have been removed by its last holder before we locked it
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current and os.pread(fd, 4, 0) not in (b"", b"pid "):  # not ours: a user's own .lock
                os.close(fd)
                raise RunError(f"{path} is not a lock file of this trainer; move it, or {self.advice}")
            if current:
                self._fd = fd
            else:
                os.close(fd)
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        with contextlib.suppress(OSError):  # naming the holder is a courtesy, not a condition
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({command})".encode(errors="surrogateescape"), 0)

    def acquire_if_present(self) -> None:
        """``acquire`` where the folder exists already; a new one is made (and locked) only
        once whatever is to be written there is sure to be written."""
        if self.folder.is_dir():
            self.acquire()

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                (self.folder / LOCK_FILE).unlink()  # while still locked: see acquire
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None
            if self.made:
                with contextlib.suppress(OSError):  # only an empty one
                    self.folder.rmdir()

    def __enter__(self) -> WorkDirLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def write_errors(advice: str) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, permissions) into a RunError ending in ``advice``."""
    try:
        yield
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        raise RunError(f"cannot write{where} ({error.strerror or error}); {advice}") from None


# What atomic_write's temporary files are called: "." + the file's name + "." + mkstemp's 8
# random characters + ".tmp", for the checkpoints, JSON and CSV files it writes.
TEMPORARY = re.compile(r"\.[^/]+\.(pt|json|csv)\.[A-Za-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what atomic writes killed halfway left behind (only while holding the lock),
    and nothing else: a user's own dot-files stay."""
    for leftover in folder.glob(".*.tmp"):
        if TEMPORARY.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)


def write_json(path: Path, content: dict) -> None:
    write_text(path, json.dumps(content, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path, keys: tuple[str, ...] = ("model", "config"),
                    map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint holding only tensors and plain data; never unpickle code.

    ``weights_only=True`` refuses any other object, so a crafted file cannot run anything.
    A checkpoint must hold ``keys`` and finite weights: the trainer never saves a diverged
    model, so NaN weights mean a damaged file or an older version's diverged save.
    """
    refuse_unless_file(path)
    if not path.is_file():
        raise RunError(f"no checkpoint file at {path}")
    corrupt = RunError(f"{path} is truncated or corrupt; use another checkpoint or start a "
                       f"new run with --save")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise corrupt
    try:  # every entry against its CRC-32, which torch.load does not check
        damaged = zipfile.ZipFile(path).testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError):
        raise corrupt from None
    if damaged is not None:
        raise RunError(f"{path} is damaged: its entry {damaged} does not match its checksum "
                       f"(a changed or flipped byte); use another checkpoint or start a new "
                       f"run with --save")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), "unsupported content")
        raise RunError(f"refusing to load {path}: it holds objects other than tensors and "
                       f"plain data ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError):
        raise corrupt from None
    if (not isinstance(state, dict) or any(key not in state for key in keys)
            or not isinstance(state["model"], dict) or not isinstance(state["config"], dict)):
        raise RunError(f"{path} is not a checkpoint of this trainer; use one that train.py wrote")
    bad = non_finite(state["model"])
    if bad:
        raise RunError(f"{path} holds non-finite weights ({', '.join(bad[:3])}): the run had "
                       f"diverged when it was saved; use an earlier checkpoint or start a new "
                       f"run with a lower --lr")
    return state


class CsvLog:
    """One CSV file of per-epoch rows with a header line; columns are fixed per file."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns

    def create(self) -> None:
        atomic_write(self.path, (",".join(self.columns) + "\n").encode())

    def epochs(self) -> list[int]:
        """The epochs of the whole rows logged so far (none when the file is absent)."""
        return [epoch for epoch, _ in self._rows()[1]]

    def check_resumable(self, last_epoch: int) -> None:
        """Refuse, changing nothing, unless the file holds a row for every epoch up to
        ``last_epoch``: resuming would otherwise leave a run with rows missing."""
        self._text_up_to(last_epoch)

    def keep_epochs_up_to(self, last_epoch: int) -> None:
        """Drop rows after ``last_epoch`` and any half-written line (used on resume)."""
        text, new_text = self._text_up_to(last_epoch)
        if new_text != text:
            atomic_write(self.path, new_text.encode())

    def _rows(self) -> tuple[str | None, list[tuple[int, str]]]:
        """The file's text (None when absent) and its whole rows, each with its epoch, read
        strictly (results/numeric_csv.py)."""
        try:
            log = read_numeric_csv(self.path, "repair it or start a new run with another --save",
                                   columns=self.columns)
        except FileNotFoundError:
            return None, []
        return log.text, list(zip(log.keys(), log.lines))

    def _text_up_to(self, last_epoch: int) -> tuple[str | None, str]:
        """The file's text now, and with the rows after ``last_epoch`` dropped."""
        text, rows = self._rows()
        kept = [(epoch, line) for epoch, line in rows if epoch <= last_epoch]
        if [epoch for epoch, _ in kept] != list(range(1, last_epoch + 1)):
            raise RunError(f"{self.path} does not hold a row for each of the epochs 1-{last_epoch} "
                           f"that the checkpoint has trained; put the file back or start a new "
                           f"run with another --save")
        return text, "\n".join([",".join(self.columns)] + [line for _, line in kept]) + "\n"

    def append(self, row: dict) -> None:
        append_line(self.path, ",".join(_format(row[column]) for column in self.columns))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
