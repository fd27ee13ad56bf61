"""Runs gathered into results: groups of seeds, their mean and spread, beside the paper's numbers.

A group is the finished runs whose configurations differ only in the seed and in settings
that cannot change the numbers (layout.NUMBER_NEUTRAL: where the files go, which device, kernels, graph or
memory layout compute them). Each unfinished run (still training, or stopped early) is a row
of its own and stays out of the finished runs' means. A row's configuration is matched to
Table 2 of the DenseNet paper (table2.json) by depth, growth rate, bottleneck, compression,
dataset, augmentation and the paper's epoch count; anything else gets no paper number, never
a wrong one. torch-free, like plot.py, which prints and writes these tables (--table).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from densenet_trainer.records.layout import NUMBER_NEUTRAL, duration
from densenet_trainer.settings.cli import UserError
from densenet_trainer.settings.config import RunConfig

TABLE_2 = Path(__file__).with_name("table2.json")
# Runs whose configurations differ only in these are one group: the seeds, and the settings
# that cannot change the numbers.
GROUPED_OVER = NUMBER_NEUTRAL | {"seed"}
DATASET_COLUMNS = {"cifar10": "C10", "cifar100": "C100", "svhn": "SVHN"}


@dataclass
class Result:
    """What one run's files say of it."""
    folder: Path
    config: dict
    parameters: int | None
    model: str
    epochs: int  # trained
    test_error: float  # the last epoch's
    best_val_test_error: float | None  # the test error at the epoch of lowest validation error
    top5_error: float | None
    seconds: float  # training, all epochs

    @property
    def planned(self) -> int:
        return int(self.config.get("epochs", self.epochs))

    @property
    def finished(self) -> bool:
        return self.epochs >= self.planned

    @property
    def data(self) -> str:
        """The paper's name for the dataset and augmentation: C10+, C100, SVHN, ..."""
        name = DATASET_COLUMNS.get(self.config.get("dataset"), str(self.config.get("dataset")))
        return name + ("+" if self.config.get("augment") else "")

    def key(self) -> tuple:
        return tuple(sorted((k, json.dumps(v)) for k, v in self.config.items() if k not in GROUPED_OVER))


def read_result(folder: Path, logs: dict[str, pd.DataFrame], record: dict) -> Result:
    """A Result from a run's parsed CSVs (``logs``) and config.json (``record``); ValueError
    if they do not describe a trained run."""
    config = record.get("config")
    if not isinstance(config, dict):
        raise ValueError("its config.json holds no configuration")
    try:  # checked as a resume checks it; settings added since its version take their defaults
        config = RunConfig.from_dict(config, "its config.json").to_dict()
    except UserError as error:
        raise ValueError(str(error).split("; ")[0]) from None
    if "test" not in logs or not len(logs["test"]) or not len(logs.get("train", [])):
        raise ValueError("no epoch is logged yet")
    test, train = logs["test"], logs["train"]
    train = train[train["epoch"] <= test["epoch"].iloc[-1]]  # an epoch being written counts once whole
    best_val = None
    if "val" in logs and len(logs["val"]):
        epoch = logs["val"].loc[logs["val"]["error"].idxmin(), "epoch"]
        matching = test[test["epoch"] == epoch]
        best_val = float(matching["error"].iloc[0]) if len(matching) else None
    top5 = float(test["top5_error"].iloc[-1]) if "top5_error" in test else None
    seconds = float(train["seconds"].sum()) if "seconds" in train else math.nan
    parameters = record.get("parameters")
    return Result(folder, config, parameters if isinstance(parameters, int) else None,
                  str(record.get("model", folder.name)), int(train["epoch"].iloc[-1]),
                  float(test["error"].iloc[-1]), best_val, top5, seconds)


def paper_error(config: dict) -> float | None:
    """Table 2's test error for this configuration, or None where the paper has none."""
    table = json.loads(TABLE_2.read_text())
    dataset = config.get("dataset")
    if int(config.get("epochs", 0)) != table["epochs"].get(dataset):
        return None
    column = DATASET_COLUMNS.get(dataset, "") + ("+" if config.get("augment") else "")
    for row in table["rows"]:
        if all(config.get(name) == row[name] for name in ("depth", "growth_rate", "bottleneck",
                                                           "compression")):
            return row.get(column)
    return None


@dataclass
class Row:
    """One line of the table: a group of finished runs, or one unfinished run."""
    results: list[Result]

    @property
    def first(self) -> Result:
        return self.results[0]

    def mean_std(self, values: list[float | None]) -> tuple[float, float | None] | None:
        known = [v for v in values if v is not None and math.isfinite(v)]
        if not known:
            return None
        return statistics.mean(known), statistics.stdev(known) if len(known) > 1 else None

    def cells(self) -> dict[str, str]:
        first, n = self.first, len(self.results)
        test = self.mean_std([r.test_error for r in self.results])
        paper = paper_error(first.config)
        seconds = self.mean_std([r.seconds for r in self.results])
        return {
            "model": first.model,
            "parameters": f"{first.parameters:,}" if first.parameters is not None else "",
            "data": first.data,
            "epochs": f"{first.epochs}/{first.planned}" + ("" if first.finished else " (unfinished)"),
            "n": str(n),
            "test error (%)": _spread(test),
            "best-val test error (%)": _spread(self.mean_std([r.best_val_test_error for r in self.results])),
            "top-5 error (%)": _spread(self.mean_std([r.top5_error for r in self.results])),
            "training time": duration(seconds[0]) if seconds else "",
            "paper (%)": f"{paper:.2f}" if paper is not None else "",
            "difference": f"{test[0] - paper:+.2f}" if paper is not None and test else "",
        }


def _spread(value: tuple[float, float | None] | None) -> str:
    if value is None:
        return ""
    mean, std = value
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def rows(results: list[Result]) -> list[Row]:
    """Finished runs grouped by configuration (seeds together), then each unfinished run."""
    groups: dict[tuple, list[Result]] = {}
    for result in results:
        if result.finished:
            groups.setdefault(result.key(), []).append(result)
    unfinished = [Row([r]) for r in results if not r.finished]
    return [Row(group) for group in groups.values()] + unfinished


def table(table_rows: list[Row], style: str) -> str:
    """The rows as ``style``: text (aligned columns), markdown, csv or latex. Columns that are
    empty in every row are left out."""
    cells = [row.cells() for row in table_rows]
    columns = [c for c in cells[0] if any(row[c] for row in cells)]
    if style == "csv":
        frame = pd.DataFrame([{c: row[c] for c in columns} for row in cells])
        return frame.to_csv(index=False)
    if style == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(row[c] for c in columns) + " |"
                                  for row in cells]) + "\n"
    if style == "latex":
        def tex(text: str) -> str:
            for plain, escaped in (("\\", r"\textbackslash{}"), ("%", r"\%"), ("&", r"\&"),
                                   ("_", r"\_"), ("#", r"\#"), ("$", r"\$"), ("±", r"$\pm$")):
                text = text.replace(plain, escaped)
            return text
        lines = [r"\begin{tabular}{" + "l" * len(columns) + "}", r"\hline",
                 " & ".join(tex(c) for c in columns) + r" \\", r"\hline"]
        lines += [" & ".join(tex(row[c]) for c in columns) + r" \\" for row in cells]
        return "\n".join(lines + [r"\hline", r"\end{tabular}"]) + "\n"
    widths = [max(len(c), *(len(row[c]) for row in cells)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(row[c].ljust(w) for c, w in zip(columns, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"
