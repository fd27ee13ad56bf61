"""What every script of the project shares on its command line: one-line errors and flag types.

A mistake a user can make (a bad flag, a missing dataset, a damaged file, a busy or
unwritable work directory) ends as one line on stderr that says what to do, exit status 2,
and no file changed. Scripts raise ``UserError`` (or a subclass: datasets.DataError,
files.RunError, plot.PlotError) and wrap their ``main`` in ``one_line_errors``; flags get
their range checked by argparse through the types below, so train.py, plot.py, attic/ and
bench/ refuse the same values with the same words.

This module imports no torch: plot.py must run where only the CSVs are.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import numbers
import os
import signal
import sys
from collections.abc import Callable, Iterator

FIGURE_FORMATS = ("png", "pdf", "svg")  # what plot.py and attic/summary.py write


class UserError(Exception):
    """A mistake the user can fix; the message says how. Printed as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not for derived or off-by-default flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        derived = action.default is None or action.default is False  # "is": 0 is shown
        if derived or action.default == argparse.SUPPRESS or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)



class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the whole usage, and shows
    every flag's default in --help (see HelpFormatter)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def one_line_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Turn a ``UserError`` escaping ``main`` into ``error: ...`` on stderr and exit status 2;
    output that cannot be written never stops the command (output_may_close)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        with output_may_close():
            try:
                return main(*args, **kwargs)
            except UserError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
    return wrapper


class OutputThatMayClose:
    """A text stream (stdout, stderr) whose reader may go away (``| head``, a closed terminal
    or ssh session) or that cannot take more (a full disk): the first write that fails points
    the stream at /dev/null and the command goes on; a run's CSVs and checkpoints are its
    record. Text the stream's encoding cannot hold is written with escapes."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def _closed(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(devnull, self.stream.fileno())  # what is left to flush at exit goes there too
        os.close(devnull)
        self.stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            try:
                return self.stream.write(text)
            except UnicodeEncodeError:
                encoding = getattr(self.stream, "encoding", None) or "ascii"
                return self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except OSError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            self._closed()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def output_may_close() -> Iterator[None]:
    """Within it, stdout and stderr survive their reader's going away (OutputThatMayClose)."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = OutputThatMayClose(sys.stdout), OutputThatMayClose(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams


# The training step computes in float32: a rate or a decay beyond its range would be
# infinite there, and a positive one below its smallest normal number as good as 0.
FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if kind is float and abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.3g} (the largest "
                                         f"float32 number), got {value:g}")
    if kind is float and 0 < abs(value) < FLOAT32_TINY:
        raise argparse.ArgumentTypeError(f"must be 0 or at least {FLOAT32_TINY:.3g} (the "
                                         f"smallest float32 number), got {value:g}")
    return value


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low or (high is not None and value > high):
            wanted = (f"between {low} and {high}" if high is not None else
                      {0: "0 or more", 1: "a positive integer"}.get(low, f"at least {low}"))
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def float_range(low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in the interval from ``low`` to ``high``."""
    interval = (f"{'(' if low_open else '['}{low:g}, {high:g}"
                f"{')' if high_open or high == math.inf else ']'}")
    wanted = {"(0, inf)": "a positive number", "[0, inf)": "0 or more"}.get(interval, f"in {interval}")

    def parse(text: str) -> float:
        value = _number(float, text)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value:g}")
        return value
    parse.__name__ = "number"
    return parse


positive_int = int_range(1)
count = int_range(0)  # 0 or more
positive_float = float_range(0, low_open=True)
non_negative_float = float_range(0)
seed = int_range(0, 2**32 - 1)  # what numpy's global generator accepts


NAME_MAX, PATH_MAX = 255, 4096  # bytes: Linux's limits on a file name and on a whole path


def path(text: str) -> str:
    """An argparse type: a path the operating system can take (each name at most NAME_MAX
    bytes, the whole under PATH_MAX) and a line can show (no control characters), refused
    before anything is read or written."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names nothing; give a path")
    if any(ord(character) < 32 or ord(character) == 127 for character in text):
        raise argparse.ArgumentTypeError(f"the path {text!r} holds a control character (a newline, a "
                                         f"tab): no line of a log or table could show it; rename it")
    encoded = os.fsencode(text)
    if len(encoded) >= PATH_MAX:
        raise argparse.ArgumentTypeError(f"the path is {len(encoded):,} bytes long; the system "
                                         f"takes at most {PATH_MAX - 1:,}")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        shown = os.fsdecode(longest[:24])
        raise argparse.ArgumentTypeError(f"the name {shown}... is {len(longest)} bytes long; a "
                                         f"file or folder name takes at most {NAME_MAX}")
    return text


def first_line(error: BaseException) -> str:
    """An exception as one line: its message's first, or its type's name."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def one_line_interrupt(message: str) -> None:
    """From now on Ctrl-C prints ``message`` and exits 130 at once: for the seconds a script
    spends importing torch, where KeyboardInterrupt would end in a traceback (the script puts
    signal.default_int_handler back once loaded). A SIGINT ignored (a background job) stays so."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda *_: (print(message, file=sys.stderr), os._exit(130)))


def value_problem(spec, value) -> str | None:
    """Why ``value`` cannot be the setting ``spec`` (a RunConfig field: its type, its choices,
    its flag's own check, as the command line runs it), as the end of a sentence naming the
    setting; None where it can. numpy's numbers count as Python's."""
    kind = spec.type
    if value is None:
        return None if spec.default is None and kind == "str" else "must be given"  # an unresolved --save
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        try:
            ok = ok and math.isfinite(value)
        except OverflowError:  # an int beyond any float
            ok = False
    else:
        ok = isinstance(value, str)
    if not ok:
        wanted = {"bool": "True or False", "int": "a whole number", "float": "a finite number"}
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"must be {wanted.get(kind, 'a string')}, got {shown}"
    choices = spec.metadata["choices"]
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    parse = spec.metadata["type"]
    if parse is not None:
        try:
            parse(repr(int(value) if kind == "int" else float(value)) if kind in ("int", "float") else value)
        except (argparse.ArgumentTypeError, ValueError) as error:
            return str(error)
    return None
