#!/usr/bin/env python3
"""Draw loss and error curves from train.py's work directories, at any time.

It reads only the CSV files and config.json, never torch, so it starts fast, works while a
run is still writing, and runs on a machine that has just the CSVs.

  ./plot.py work/RUN                 # loss.png, error.png, curves.png in work/RUN
  ./plot.py work/A work/B work/C     # overlaid curves in work/comparison.png and a table
  ./plot.py work/RUN --watch 60      # redraw every minute while it trains
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

import cli  # noqa: E402

# Okabe & Ito's colour-blind-safe palette.
COLOURS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
NUMERIC_COLUMNS = ("epoch", "lr", "loss", "error")  # what the curves are drawn from
SPLITS = {"train": ("-", 0), "val": (":", 2), "test": ("--", 1)}  # line style, colour index


class PlotError(cli.UserError):
    """A problem with the input the user can fix; printed as one line, exit status 2."""


@dataclass
class Run:
    """Everything plot.py reads from one work directory, read before any figure is written."""
    folder: Path
    logs: dict[str, pd.DataFrame]  # "train", "test", "val": one row per epoch
    config: dict = field(default_factory=dict)
    sweep: pd.DataFrame | None = None  # lr_find.csv
    suggested_lr: float | None = None  # from lr_find.json
    per_class: dict[Path, pd.DataFrame] = field(default_factory=dict)  # *-classes*.csv
    confusion: dict[Path, tuple[list[str], object]] = field(default_factory=dict)  # names, counts

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def epochs(self) -> int:
        return len(self.logs["train"]) if "train" in self.logs else 0


def read_csv(path: Path, required: tuple[str, ...] = ("epoch",)) -> pd.DataFrame:
    """Read a CSV that may still be growing: whole lines only, columns by name.

    The required columns that are curves must hold at least one number once there are rows.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise PlotError(f"{path} is not a readable text file ({error}); move it away") from None
    whole = text[:text.rfind("\n") + 1]  # a half-written last line is left for next time
    if not whole.strip():
        raise PlotError(f"{path} has no header line; is it a train.py log?")
    try:
        frame = pd.read_csv(io.StringIO(whole))
    except (pd.errors.ParserError, ValueError) as error:
        raise PlotError(f"{path} is not a readable CSV ({str(error).strip()})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise PlotError(f"{path} lacks the column(s) {', '.join(missing)}; is it a train.py log?")
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    bad = [c for c in frame.columns if c in NUMERIC_COLUMNS and numeric[c].isna().any()
           and not frame[c].isna().all()]
    if bad:
        raise PlotError(f"{path} has non-numeric values in {', '.join(bad)}")
    empty = [c for c in required if c in NUMERIC_COLUMNS and len(frame) and frame[c].isna().all()]
    if empty:
        raise PlotError(f"{path} has no numbers in {', '.join(empty)}; nothing to draw from it")
    return frame


def read_json(path: Path) -> dict:
    """A JSON object written by train.py or attic/lr_find.py."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlotError(f"{path} is not readable JSON ({error}); repair it or move it away") from None
    if not isinstance(content, dict):
        raise PlotError(f"{path} holds no JSON object; repair it or move it away")
    return content


def load_run(folder: Path) -> Run:
    """Read a work directory (or a folder with only a learning-rate sweep), refusing bad files."""
    if not folder.is_dir():
        raise PlotError(f"{folder} does not exist or is not a directory")
    run = Run(folder, {})
    if (folder / "lr_find.csv").is_file():
        run.sweep = read_csv(folder / "lr_find.csv", ("lr", "loss"))
        if (folder / "lr_find.json").is_file():
            lr = read_json(folder / "lr_find.json").get("suggested_lr")
            if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise PlotError(f"{folder / 'lr_find.json'} has no valid suggested_lr; run "
                                f"attic/lr_find.py again or move the file away")
            run.suggested_lr = lr
        if not (folder / "train.csv").exists():
            return run  # a sweep without a training run
    if not (folder / "train.csv").is_file():
        raise PlotError(f"{folder} holds no train.csv: it is not a train.py work directory")
    run.logs["train"] = read_csv(folder / "train.csv", ("epoch", "loss", "error"))
    for split in ("test", "val"):
        if (folder / f"{split}.csv").is_file():
            run.logs[split] = read_csv(folder / f"{split}.csv", ("epoch", "loss", "error"))
    if (folder / "config.json").is_file():
        run.config = read_json(folder / "config.json")
        parameters = run.config.get("parameters")
        if parameters is not None and (not isinstance(parameters, int) or isinstance(parameters, bool)):
            raise PlotError(f"{folder / 'config.json'} has a parameter count that is not a whole "
                            f"number; repair it or move it away")
    for path in sorted(folder.glob("*-classes*.csv")):
        run.per_class[path] = read_csv(path, ("name", "error"))
    for path in sorted(folder.glob("*-confusion*.csv")):
        frame = read_csv(path, ())
        try:
            matrix = frame.iloc[:, 1:].to_numpy(dtype=float)
        except ValueError:
            matrix = None
        if matrix is None or matrix.shape != (len(frame), len(frame)) or not len(frame):
            raise PlotError(f"{path} is not a square confusion matrix of counts; evaluate the "
                            f"checkpoint again (train.py --evaluate) or move the file away")
        run.confusion[path] = (list(frame.columns[1:]), matrix)
    return run


def epoch_window(frame: pd.DataFrame, epochs: tuple[int, int] | None) -> pd.DataFrame:
    if epochs is None:
        return frame
    return frame[(frame["epoch"] >= epochs[0]) & (frame["epoch"] <= epochs[1])]


def lr_drops(run: Run) -> list[tuple[float, float]]:
    """(epoch, new lr) where the learning rate fell at least twofold: the step schedule's drops."""
    train = run.logs["train"]
    if "lr" not in train.columns:
        return []
    lr = train["lr"].astype(float).tolist()
    return [(train["epoch"].iloc[i] - 0.5, lr[i]) for i in range(1, len(lr)) if lr[i] <= lr[i - 1] / 2]


def draw_metric(ax, runs: list[Run], metric: str, opts: argparse.Namespace) -> None:
    """One panel: ``metric`` per split; one colour per split for a run, per run for several."""
    single = len(runs) == 1
    for index, run in enumerate(runs):
        for split, (style, colour_index) in SPLITS.items():
            if split not in run.logs:
                continue
            frame = epoch_window(run.logs[split], opts.epochs)
            colour = COLOURS[colour_index if single else index % len(COLOURS)]
            label = split if single else f"{run.name} {split}"
            ax.plot(frame["epoch"], frame[metric], style, color=colour, label=label,
                    linewidth=1.6 if split == "test" else 1.2)
    if single:
        for epoch, lr in lr_drops(runs[0]):
            if opts.epochs is None or opts.epochs[0] <= epoch <= opts.epochs[1]:
                ax.axvline(epoch, color="0.5", linewidth=0.8, linestyle="-.")
                ax.annotate(f"lr {lr:g}", (epoch, 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.35")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss" if metric == "loss" else "error (%)")
    scale = opts.loss_scale if metric == "loss" else opts.error_scale
    ax.set_yscale(scale)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if scale == "log":  # plain numbers, and minor labels only where few majors show
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if high / low < 20 else NullFormatter())
    ax.legend(fontsize=8)
    ax.set_title("loss" if metric == "loss" else "error")


def make_figure(runs: list[Run], metrics: list[str], opts: argparse.Namespace):
    with plt.style.context(opts.style):
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            draw_metric(ax, runs, metric, opts)
        title = opts.title or (runs[0].name if len(runs) == 1 else f"{len(runs)} runs")
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def lr_find_figure(run: Run, opts: argparse.Namespace):
    """The learning-rate finder's sweep, with its suggestion marked."""
    with plt.style.context(opts.style):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.plot(run.sweep["lr"], run.sweep["loss"], color=COLOURS[0], label="loss (smoothed)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        if run.suggested_lr is not None:
            ax.axvline(run.suggested_lr, color=COLOURS[3], linestyle="--",
                       label=f"suggested lr {run.suggested_lr:.3g}")
        ax.legend(fontsize=8)
        ax.set_title(f"{run.name}: learning-rate finder")
        fig.tight_layout()
    return fig


def evaluation_figures(run: Run, opts: argparse.Namespace) -> list[tuple[object, Path]]:
    """Per-class errors and confusion matrices written by ``train.py --evaluate``."""
    figures = []
    for path, frame in run.per_class.items():
        with plt.style.context(opts.style):
            fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(frame)), 4.2))
            ax.bar(frame["name"].astype(str), frame["error"], color=COLOURS[0])
            ax.set_ylabel("error (%)")
            ax.tick_params(axis="x", labelrotation=60)
            ax.set_title(f"{run.name}: per-class test error")
            fig.tight_layout()
        figures.append((fig, path.with_suffix("")))
    for path, (names, matrix) in run.confusion.items():
        with plt.style.context(opts.style):
            size = max(5, 0.45 * len(names))
            fig, ax = plt.subplots(figsize=(size + 1, size))
            image = ax.imshow(matrix, cmap="viridis")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.grid(False)
            fig.colorbar(image, ax=ax, label="images")
            ax.set_title(f"{run.name}: confusion matrix")
            fig.tight_layout()
        figures.append((fig, path.with_suffix("")))
    return figures


def summary(runs: list[Run]) -> str:
    """One line per run: epochs done, final and best test error, parameters."""
    rows = [("run", "epochs", "final test error", "best test error", "parameters")]
    for run in runs:
        test = run.logs.get("test")
        if test is None or test.empty:
            final = best = "-"
        else:
            best_row = test.loc[test["error"].idxmin()]
            final = f"{test['error'].iloc[-1]:.2f}%"
            best = f"{best_row['error']:.2f}% (epoch {int(best_row['epoch'])})"
        parameters = run.config.get("parameters")
        rows.append((run.name, str(run.epochs), final, best, f"{parameters:,}" if parameters else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def draw(opts: argparse.Namespace) -> list[Path]:
    """Draw everything once; returns the files written.

    Every input is read and checked, and every output folder tried, before the first figure
    is written: a refusal leaves the figures of the last good drawing in place.
    """
    runs = [load_run(Path(folder)) for folder in opts.runs]
    for run in runs:
        if "train" in run.logs and run.epochs == 0:
            print(f"{run.folder}: no epochs logged yet")
    trained = [run for run in runs if run.epochs > 0]
    figures = [(lr_find_figure(run, opts), run.folder / "lr_find") for run in runs
               if run.sweep is not None]
    if len(trained) == 1 and len(runs) == 1:
        folder = trained[0].folder
        figures += [(make_figure(trained, ["loss"], opts), folder / "loss"),
                    (make_figure(trained, ["error"], opts), folder / "error"),
                    (make_figure(trained, ["loss", "error"], opts), folder / "curves")]
    elif trained:
        out = Path(opts.out) if opts.out else Path(os.path.commonpath(
            [str(r.folder.resolve().parent) for r in trained])) / "comparison"
        figures.append((make_figure(trained, ["loss", "error"], opts), out))
    for run in trained:
        figures += evaluation_figures(run, opts)
    paths = [path.with_suffix(f".{opts.format}") for _, path in figures]
    try:
        for folder in sorted({path.parent for path in paths}):
            try:
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as error:
                raise PlotError(f"cannot write to {folder} ({error.strerror}); make it writable, "
                                f"or for several runs choose another folder with --out") from None
        for (fig, _), path in zip(figures, paths):
            try:
                fig.savefig(path, dpi=opts.dpi)
            except OSError as error:
                raise PlotError(f"cannot write {path} ({error.strerror}); free space or make "
                                f"the folder writable") from None
    finally:
        for fig, _ in figures:
            plt.close(fig)
    if trained:
        print(summary(trained))
    for path in paths:
        print(f"wrote {path}")
    return paths


def epoch_range(text: str) -> tuple[int, int]:
    try:
        first, _, last = text.partition(":")
        return int(first or 1), int(last) if last else 10**9
    except ValueError:
        raise argparse.ArgumentTypeError(f"epoch range must look like 10:200, 50: or :100, got {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="WORKDIR", help="work directories written by train.py")
    p.add_argument("--out", help="figure file for several runs (default: comparison.FORMAT in the "
                                   "folder that holds the runs)")
    p.add_argument("--style", default="seaborn-v0_8-whitegrid", help="any matplotlib style")
    p.add_argument("--format", default="png", choices=cli.FIGURE_FORMATS, help="figure file type")
    p.add_argument("--dpi", type=cli.int_range(10, 1200), default=130,
                   help="resolution of png figures, dots per inch")
    p.add_argument("--loss-scale", default="log", choices=["log", "linear"], help="loss y axis")
    p.add_argument("--error-scale", default="linear", choices=["log", "linear"], help="error y axis")
    p.add_argument("--epochs", type=epoch_range, default=None, metavar="FIRST:LAST",
                   help="only this range of epochs")
    p.add_argument("--title", default=None, help="figure title (default: the run's name, or the runs' names)")
    p.add_argument("--watch", type=cli.non_negative_float, default=0, metavar="SECONDS",
                   help="redraw every SECONDS until Ctrl-C")
    opts = p.parse_args(argv)
    if opts.style not in plt.style.available and opts.style != "default" and not Path(opts.style).is_file():
        p.error(f"unknown --style {opts.style!r}; choose one of: {', '.join(sorted(plt.style.available))}")
    if opts.out:
        out = Path(opts.out)
        if out.suffix:
            opts.format = out.suffix.lstrip(".").lower()
            if opts.format not in cli.FIGURE_FORMATS:
                p.error(f"--out {out}: unknown figure format {out.suffix!r}; use "
                        f"{', '.join(cli.FIGURE_FORMATS)}")
        if not out.parent.is_dir():
            p.error(f"--out {out}: the folder {out.parent} does not exist")
    return opts


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        draw(opts)
        while opts.watch > 0:
            time.sleep(opts.watch)
            draw(opts)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
