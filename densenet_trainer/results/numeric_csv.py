"""The numeric CSV files a run keeps (train.csv, test.csv, val.csv; lr_find.csv), read
strictly, one way for every reader: the trainer on resume, plot.py, the tables. torch-free.

A file may still be growing: the piece after its last newline is a row being written and is
left for the next read. Every whole row must have as many fields as the header, every field a
finite number within its column's range (layout.COLUMN_RANGES), and the key column (the epoch, or the sweep's step) whole numbers from 1 in
order; anything else is named by file and line in one line, never read as something it is not
(a trailing comma shifting every column, say).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from densenet_trainer.config.cli import UserError
from densenet_trainer.results.layout import COLUMN_RANGES


class BadCsv(UserError):
    """A CSV file that is not what the project writes; the message names the file and line."""


@dataclass
class NumericCsv:
    """A CSV file's text, its header, and its whole rows: their numbers and their lines."""
    path: Path
    text: str
    header: list[str]
    rows: list[list[float]]
    lines: list[str]

    def column(self, name: str) -> list[float]:
        index = self.header.index(name)
        return [row[index] for row in self.rows]

    def keys(self, key: str = "epoch") -> list[int]:
        """The key column's whole numbers (the epochs)."""
        return [int(value) for value in self.column(key)]


def read_numeric_csv(path: Path, advice: str, key: str = "epoch",
                     columns: list[str] | None = None) -> NumericCsv:
    """``path`` read strictly (FileNotFoundError where absent), with the header ``columns``
    where given; ``advice`` ends every refusal: what the user can do."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as error:
        raise BadCsv(f"{path} cannot be read ({error}); {advice}") from None
    complete = text.split("\n")[:-1]  # the piece after the last newline is incomplete or empty
    if not complete or not complete[0].strip():
        raise BadCsv(f"{path} has no header line; {advice}")
    header = complete[0].split(",")
    if columns is not None and header != columns:
        raise BadCsv(f"{path} does not start with the header {','.join(columns)}; {advice}")
    if key not in header or len(set(header)) != len(header) or not all(header):
        raise BadCsv(f"{path} does not start with a header of distinct named columns with "
                     f"{key} among them; {advice}")
    at = header.index(key)
    rows, lines = [], []
    for number, line in enumerate(complete[1:], start=2):
        if not line:
            continue
        fields = line.split(",")
        if len(fields) != len(header):
            raise BadCsv(f"{path}, line {number}: {len(fields)} fields where the header has "
                         f"{len(header)}; {advice}")
        values = []
        for name, field in zip(header, fields):
            try:
                value = float(field)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise BadCsv(f"{path}, line {number}: {name} is {field!r}, not a finite number; "
                             f"{advice}")
            low, high = COLUMN_RANGES.get(name, (None, None))
            if (low is not None and value < low) or (high is not None and value > high):
                wanted = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
                raise BadCsv(f"{path}, line {number}: {name} is {field}, where it is {wanted}; "
                             f"{advice}")
            values.append(value)
        expected = len(rows) + 1
        if values[at] != expected:
            raise BadCsv(f"{path}, line {number}: {key} {fields[at]} where {expected} comes next "
                         f"({key}s are whole numbers from 1, in order); {advice}")
        rows.append(values)
        lines.append(line)
    return NumericCsv(path, text, header, rows, lines)
