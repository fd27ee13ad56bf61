"""Writes that are whole and stay where they are meant, for every writer (the trainer's CSVs,
JSON, checkpoints and lock; plot.py's figures and tables; the tools' files). torch-free.

A file is replaced by a complete new one: a temporary beside it, written, fsynced and renamed
over it, so that a failure or a kill at any moment leaves the old file or the new one and no
temporary; it gets the permissions the umask gives. Nothing is written through a symbolic
link, dangling or not, or into anything but a regular file: such a target is refused before
anything is created or changed (``lstat`` first; ``O_NOFOLLOW`` where a file is opened in
place: appending a CSV row, the lock). A rename replaces a link planted after the check,
never what it points to.
"""
from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from pathlib import Path

from densenet_trainer.config.cli import UserError


class NotARegularFile(UserError):
    """Where a file is to be written there is a link or something else: refused, unchanged."""


def _refusal(path: Path, mode: int) -> NotARegularFile:
    what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    return NotARegularFile(f"{path} is {what}; a run's files are written only as regular files "
                           f"inside its folder: remove it or choose another folder")


def refuse_unless_regular(path: Path) -> None:
    """NotARegularFile where ``path`` exists as anything but a regular file (a link included)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there: the write says what fails
        return
    if not stat.S_ISREG(mode):
        raise _refusal(path, mode)


def refuse_unless_file(path: Path) -> None:
    """NotARegularFile where ``path`` exists (through links) as anything but a regular file:
    a FIFO read would wait forever, a device would never end."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{path} is not a regular file; move it away, or name a file")


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file; an
    OSError names ``path``, never the temporary, which is gone."""
    path = Path(path)
    refuse_unless_regular(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; files follow the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # name the file meant, not the temporary one
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def write_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure, written whole in the format its suffix names."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=Path(path).suffix[1:].lower())
    atomic_write(path, buffer.getvalue())


def open_in_place(path: Path, flags: int) -> int:
    """``os.open`` of a file that is written where it is (appended to, locked), never through
    a link: O_NOFOLLOW, and the descriptor must be a regular file; NotARegularFile otherwise."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _refusal(path, stat.S_IFLNK) from None
        raise
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise _refusal(path, status.st_mode)
    if status.st_nlink > 1:  # a hard link: writing here writes to the file's other names too
        os.close(fd)
        raise NotARegularFile(f"{path} has other names (hard links) elsewhere; a run's files are "
                              f"written only as files of their own: remove it or choose another folder")
    return fd


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` whole, fsynced (a CSV row)."""
    try:
        fd = open_in_place(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
