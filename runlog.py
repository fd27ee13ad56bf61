"""A run's files: crash-safe CSV logs, atomic writes and safe checkpoint loading.

Every write that replaces a file goes through a temporary file in the same folder, is
flushed and fsynced, then renamed over the old one, so a kill at any moment leaves either
the old file or the new one, never a mix. CSV rows are appended whole and fsynced; on
resume, rows past the checkpoint and a half-written last line are dropped, so every epoch
appears exactly once.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

RUN_MARKERS = ("config.json", "train.csv", "test.csv", "checkpoint.pt")


class RunError(Exception):
    """A problem with a run's files that the user can fix; the message says how."""


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_MARKERS)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, content: dict) -> None:
    write_text(path, json.dumps(content, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint holding only tensors and plain data; never unpickle code.

    ``weights_only=True`` refuses any other object, so a crafted file cannot run anything.
    """
    if not path.is_file():
        raise RunError(f"no checkpoint file at {path}")
    corrupt = RunError(f"{path} is truncated or corrupt; use another checkpoint or start a "
                       f"new run with --save")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise corrupt
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), "unsupported content")
        raise RunError(f"refusing to load {path}: it holds objects other than tensors and "
                       f"plain data ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError):
        raise corrupt from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise RunError(f"{path} is not a checkpoint of this trainer")
    return state


class CsvLog:
    """One CSV file of per-epoch rows with a header line; columns are fixed per file."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns

    def create(self) -> None:
        atomic_write(self.path, (",".join(self.columns) + "\n").encode())

    def keep_epochs_up_to(self, last_epoch: int) -> None:
        """Drop rows after ``last_epoch`` and any half-written line (used on resume)."""
        if not self.path.exists():
            self.create()
            return
        text = self.path.read_text()
        lines = text.split("\n")
        complete = lines[:-1]  # the piece after the last newline is incomplete or empty
        if not complete or complete[0].split(",") != self.columns:
            raise RunError(f"{self.path} does not start with the header "
                           f"{','.join(self.columns)}; move it away or start a new run with --save")
        kept = [complete[0]] + [line for line in complete[1:]
                                if line and int(line.split(",", 1)[0]) <= last_epoch]
        new_text = "\n".join(kept) + "\n"
        if new_text != text:
            atomic_write(self.path, new_text.encode())

    def append(self, row: dict) -> None:
        cells = [_format(row[column]) for column in self.columns]
        with open(self.path, "a") as f:
            f.write(",".join(cells) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
