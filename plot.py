#!/usr/bin/env python3
"""Draw loss and error curves from train.py's work directories, at any time.

It reads only the CSV files and config.json, never torch, so it starts fast, works while a
run is still writing, and runs on a machine that has just the CSVs.

  ./plot.py work/RUN                 # loss.png, error.png, curves.png in work/RUN
  ./plot.py work/A work/B work/C     # overlaid curves in work/comparison.png and a table
  ./plot.py work/RUN --watch 60      # redraw every minute while it trains
  ./plot.py --table work/*           # seeds grouped, mean ± std, beside the paper's Table 2
  ./plot.py --group work/*           # each group's mean curve with its spread
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

from densenet_trainer.config import cli
from densenet_trainer.config.run_config import NUMBER_NEUTRAL
from densenet_trainer.results.layout import CONFIG_FILE

OPEN_END = 10**9  # the last epoch of a range like 50:


# ---------------------------------------------------------------- command line

def epoch_range(text: str) -> tuple[int, int]:
    try:
        first, _, last = text.partition(":")
        first, last = int(first or 1), int(last) if last else OPEN_END
    except ValueError:
        raise argparse.ArgumentTypeError(f"epoch range must look like 10:200, 50: or :100, got {text!r}")
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"epoch range {text!r} must run from 1 or later to a "
                                         f"last epoch no earlier than the first")
    return first, last



def build_parser() -> argparse.ArgumentParser:
    """Every flag of plot.py (torch-, numpy- and pyplot-free: --help answers at once)."""
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="WORKDIR", type=cli.path,
                   help="work directories written by train.py; of several (a glob such as "
                        "work/*), the figures and tables plot.py wrote there (comparison.*, "
                        "groups.*, results.*) are passed over in silence, and anything else "
                        "that holds no run is named in one warning line")
    p.add_argument("--out", type=cli.path, help="figure file for several runs, or a folder to write it in "
                                   "(default: comparison.FORMAT in the folder that holds the runs, or "
                                   "in the current folder for runs in several folders); each run's own "
                                   "figures (one run's curves, its --evaluate's) go into its folder")
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
    results_group = p.add_argument_group(
        "results across runs", "Runs whose config.json differ only in the seed and in settings "
        "that cannot change the numbers (" + ", ".join(sorted(NUMBER_NEUTRAL)) + "), trained "
        "and tested on the same images (count and fingerprint of each split; with --val-size, "
        "which each seed draws, the same pool and counts), on the same "
        "number of processes and with the same learning rate each epoch, are one group; a "
        "run reached twice (the same run_id) counts once; an unfinished run is a row of its "
        "own, outside the means. The data column gives the image counts where they are not "
        "the official splits', the settings column what sets a row apart. The paper's column "
        "is Table 2 of Huang et al. (table2.json) where the model, dataset, augmentation, "
        "the paper's recipe (optimiser, learning rate and schedule, momentum, weight decay, "
        "batch, dropout), its epochs and its images all match.")
    results_group.add_argument("--table", action="store_true",
                               help="print the results table: mean ± sample std of the final "
                                    "test error per group, beside the paper's")
    results_group.add_argument("--table-format", default="text",
                               choices=["text", "markdown", "csv", "latex", "all"],
                               help="how --table prints; all: text, and results.md, results.csv "
                                    "and results.tex beside the runs (or in --out's folder)")
    results_group.add_argument("--group", action="store_true",
                               help="draw each group's mean curves with a band: groups.FORMAT "
                                    "beside the runs (or --out)")
    results_group.add_argument("--band", default="minmax", choices=["minmax", "std"],
                               help="--group's band: min to max, or mean ± one standard deviation")
    results_group.add_argument("--strict", action="store_true",
                               help="refuse a folder that cannot be read instead of skipping it")
    return p


if __name__ == "__main__":  # --help and a flag out of its range answer before pandas and pyplot load
    with cli.output_may_close():
        build_parser().parse_args()

# The drawing's own imports.
import matplotlib
import matplotlib.text

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from densenet_trainer.results import groups, table_formats
from densenet_trainer.results.numeric_csv import read_numeric_csv
from densenet_trainer.whole_files import refuse_unless_regular, write_figure, write_text

# Okabe & Ito's colour-blind-safe palette.
COLOURS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
NUMERIC_COLUMNS = ("epoch", "lr", "loss", "error", "top5_error")  # what the curves are drawn from
SPLITS = {"train": ("-", 0), "val": (":", 2), "test": ("--", 1)}  # line style, colour index
MARKERS_UP_TO = 30  # epochs drawn with a marker on each point
CELL_NUMBERS_UP_TO = 20  # classes in a confusion matrix with the percentages written in
# What plot.py writes beside several runs by default: passed over in silence when a glob
# over the runs' folder (./plot.py --table work/*) names them again.
OWN_OUTPUTS = {"comparison": cli.FIGURE_FORMATS, "groups": cli.FIGURE_FORMATS,
               "results": ("md", "csv", "tex")}
METRIC_TITLES = {"loss": "loss", "error": "error", "top5_error": "top-5 error"}
RUN_MARKERS = "osD^vP*X"  # with the colours, past eight runs
LEGEND_FONT, LEGEND_HANDLE = 8, 3.2  # points; the line's length in font sizes (long enough to show a dash)


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


def read_log(path: Path, required: tuple[str, ...], key: str = "epoch") -> pd.DataFrame:
    """A run's numeric CSV (train.csv, test.csv, val.csv, lr_find.csv), read as the trainer
    reads it (results/numeric_csv.py: whole rows, finite numbers, epochs in order), as a frame
    with the ``required`` columns."""
    log = read_numeric_csv(path, "repair it or move it away", key)
    missing = [c for c in required if c not in log.header]
    if missing:
        raise PlotError(f"{path} lacks the column(s) {', '.join(missing)}; is it a train.py log?")
    frame = pd.DataFrame(log.rows, columns=log.header, dtype=float)
    frame[key] = frame[key].astype(int)
    return frame


def read_csv(path: Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read one of --evaluate's CSV files (class names and numbers): whole lines only,
    columns by name, never a column taken for the index.

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
        frame = pd.read_csv(io.StringIO(whole), index_col=False, keep_default_na=False, na_values=[""])
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
        raise PlotError(f"{folder} is a file, not a train.py work directory" if folder.exists()
                        else f"{folder} does not exist")
    run = Run(folder, {})
    if (folder / "lr_find.csv").is_file():
        run.sweep = read_log(folder / "lr_find.csv", ("lr", "loss"), key="step")
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
    run.logs["train"] = read_log(folder / "train.csv", ("epoch", "loss", "error"))
    for split in ("test", "val"):
        if (folder / f"{split}.csv").is_file():
            run.logs[split] = read_log(folder / f"{split}.csv", ("epoch", "loss", "error"))
            if len(run.logs[split]) > len(run.logs["train"]):  # each epoch logs train first
                raise PlotError(f"{folder / f'{split}.csv'} logs {len(run.logs[split])} epochs "
                                f"where train.csv logs {len(run.logs['train'])}: they are not one "
                                f"run's; repair them or move the folder away")
    if (folder / CONFIG_FILE).is_file():
        run.config = read_json(folder / CONFIG_FILE)
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
        counts = (matrix is not None and np.isfinite(matrix).all() and (matrix >= 0).all()
                  and (matrix == np.round(matrix)).all())
        if not counts or matrix.shape != (len(frame), len(frame)) or not len(frame):
            raise PlotError(f"{path} is not a square confusion matrix of counts; evaluate the "
                            f"checkpoint again (train.py --evaluate) or move the file away")
        run.confusion[path] = (list(frame.columns[1:]), matrix)
    return run


def epoch_window(frame: pd.DataFrame, epochs: tuple[int, int] | None) -> pd.DataFrame:
    if epochs is None:
        return frame
    return frame[(frame["epoch"] >= epochs[0]) & (frame["epoch"] <= epochs[1])]


def lr_drops(run: Run) -> list[tuple[float, float, float]]:
    """(epoch, new lr, factor) where the learning rate fell at least twofold: the step
    schedule's drops."""
    train = run.logs["train"]
    if "lr" not in train.columns:
        return []
    lr = train["lr"].astype(float).tolist()
    return [(train["epoch"].iloc[i] - 0.5, lr[i], lr[i - 1] / lr[i] if lr[i] else math.inf)
            for i in range(1, len(lr)) if lr[i] <= lr[i - 1] / 2]


def readable_log_ticks(axis) -> None:
    """Plain numbers on a log axis, about six of them whatever its range: 1-2-5 steps per
    decade over a wide range, evenly spaced values over a narrow one (say 0.8 to 2.3)."""
    low, high = axis.axes.get_ylim()
    if high / low < 10:
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    else:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_locator(LogLocator(base=10, subs="auto"))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def draw_metric(ax, runs: list[Run], metric: str, opts: argparse.Namespace,
                names: list[str] | None = None) -> None:
    """One panel: ``metric`` per split; one colour per split for a run, per run for several
    (then each run is named once, by ``names``, and the line styles are keyed: split_key;
    past the palette's eight colours, runs differ in their markers too).

    Every point is visible at any length: markers where there are few epochs, and the x axis
    spans whole epochs. The learning-rate drops are lines (mark_lr_drops).
    """
    single = len(runs) == 1
    epochs = []
    for index, run in enumerate(runs):
        named = single
        for split, (style, colour_index) in SPLITS.items():
            if split not in run.logs or metric not in run.logs[split]:
                continue
            frame = epoch_window(run.logs[split], opts.epochs)
            colour = COLOURS[colour_index if single else index % len(COLOURS)]
            label = split if single else (None if named else (names or [r.name for r in runs])[index])
            named = True
            few = len(frame) <= MARKERS_UP_TO
            marker = RUN_MARKERS[index // len(COLOURS) % len(RUN_MARKERS)]
            ax.plot(frame["epoch"], frame[metric], style, color=colour, label=label,
                    linewidth=1.6 if split == "test" else 1.2,
                    marker=marker if few or index >= len(COLOURS) else None,
                    markevery=1 if few else max(1, len(frame) // 12),
                    markersize=4 if split == "test" else 3)
            epochs += frame["epoch"].tolist()
    if not single:
        split_key(ax)
    mark_lr_drops(ax, [(COLOURS[index % len(COLOURS)], lr_drops(run)) for index, run in enumerate(runs)],
                  opts)
    finish_panel(ax, metric, epochs, opts)


def split_key(ax) -> None:
    """Legend entries for the line styles of the splits drawn in ``ax`` (train solid, test
    dashed, val dotted), in grey: where colours tell runs or groups apart."""
    for split, (style, _) in SPLITS.items():
        if any(line.get_linestyle() == style for line in ax.get_lines()):
            ax.plot([], [], style, color="0.3", label=split)


def mark_lr_drops(ax, drops: list[tuple[str, list[tuple[float, float, float]]]],
                  opts: argparse.Namespace) -> None:
    """Each epoch where a learning rate drops, once, as a dash-dot line: in the colour of the
    one curve whose rate drops there, grey where several share it (or for a single run);
    labelled with the new rate for a single run, and for several with the factor where every
    drop has the same one (lr ÷10)."""
    at: dict[float, list[tuple[str, float, float]]] = {}
    for colour, triples in drops:
        for epoch, lr, factor in triples:
            at.setdefault(epoch, []).append((colour, lr, factor))
    factors = {f"{factor:.3g}" for found in at.values() for _, _, factor in found}
    for index, (epoch, found) in enumerate(sorted(at.items())):
        if opts.epochs is not None and not opts.epochs[0] <= epoch <= opts.epochs[1]:
            continue
        colours = {colour for colour, _, _ in found}
        colour = next(iter(colours)) if len(colours) == 1 and len(drops) > 1 else "0.5"
        rates = {lr for _, lr, _ in found}
        text = (f"lr {next(iter(rates)):g}" if len(drops) == 1 and len(rates) == 1 else
                f"lr ÷{next(iter(factors))}" if len(factors) == 1 else "lr drops")
        ax.axvline(epoch, color=colour, linewidth=0.8, linestyle="-.", alpha=0.8)
        ax.annotate(text, (epoch, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12 - 10 * (index % 3)), textcoords="offset points", fontsize=8,
                    color="0.35" if colour == "0.5" else colour)


def finish_panel(ax, metric: str, epochs: list[float], opts: argparse.Namespace) -> None:
    """A panel's axes, ticks, scale, legend and title, the same in every figure: whole epochs
    on x, plain numbers on a log y axis, legend lines long enough to show their dashes."""
    if epochs:
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss" if metric == "loss" else f"{METRIC_TITLES[metric]} (%)")
    scale = opts.loss_scale if metric == "loss" else opts.error_scale
    ax.set_yscale(scale)
    if epochs and max(epochs) - min(epochs) < 10:  # a tick at every epoch, and only there
        ax.set_xticks(range(int(min(epochs)), int(max(epochs)) + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if scale == "log":
        readable_log_ticks(ax.yaxis)
    ax.legend(fontsize=LEGEND_FONT, handlelength=LEGEND_HANDLE)
    ax.set_title(METRIC_TITLES[metric])


def figure_legend(fig) -> tuple[float, float, float, float]:
    """One legend beneath the panels in place of each panel's own, for figures where colours
    tell several runs or groups apart: each entry once, over no curve, in as many columns as
    the figure's width holds. The figure grows to make room; returns the rectangle left for
    the panels (tight_layout's rect)."""
    entries: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    points = LEGEND_FONT * 0.55 * max(map(len, entries), default=1) + LEGEND_FONT * (LEGEND_HANDLE + 2)
    columns = max(1, min(len(entries), int(fig.get_figwidth() * 72 // points)))
    height = (-(-len(entries) // columns) * LEGEND_FONT * 1.45 + 10) / 72  # inches
    fig.set_figheight(fig.get_figheight() + height)
    fig.legend(entries.values(), entries.keys(), loc="lower center", ncol=columns,
               fontsize=LEGEND_FONT, handlelength=LEGEND_HANDLE, frameon=False,
               bbox_to_anchor=(0.5, 0))
    return 0, height / fig.get_figheight(), 1, 1


def legend_names(runs: list[Run]) -> tuple[str, list[str]]:
    """For several runs, the start of a name that all share, up to a '-' (for the title), and
    what each name adds to it (for the legend); ('', the names) where that would leave a
    name empty."""
    names = [run.name for run in runs]
    shared = os.path.commonprefix(names) if len(names) > 1 else ""
    shared = shared[:shared.rfind("-") + 1]
    rest = [name[len(shared):] for name in names]
    return (shared, rest) if shared and all(rest) else ("", names)


def run_names(runs: list[Run], width: int = 90) -> str:
    """The runs' names for a title: all of them, or as many as fit and a count of the rest."""
    names = [run.name for run in runs]
    for shown in range(len(names), 0, -1):
        text = " vs ".join(names[:shown]) + (f" and {len(names) - shown} more" if shown < len(names) else "")
        if len(text) <= width or shown == 1:
            return text
    return ""


def undrawable(runs: list[Run], metrics: list[str], opts: argparse.Namespace) -> list[str]:
    """A note for each curve with values that leave a gap: NaN or infinite ones, and on a log
    axis zero or negative ones."""
    notes = []
    for run in runs:
        for split, frame in run.logs.items():
            frame = epoch_window(frame, opts.epochs)
            for metric in metrics:
                if metric not in frame:
                    continue
                values = frame[metric].to_numpy(dtype=float)
                log = (opts.loss_scale if metric == "loss" else opts.error_scale) == "log"
                gaps = {"not finite": ~np.isfinite(values),
                        "not positive, on a log axis": np.isfinite(values) & (values <= 0) & log}
                for what, where in gaps.items():
                    if where.any():
                        epochs = frame["epoch"].to_numpy()[where]
                        notes.append(f"note: {run.folder} {split} {metric}: {where.sum()} value(s) "
                                     f"{what} left out (epoch {', '.join(f'{e:g}' for e in epochs[:5])}"
                                     f"{', ...' if len(epochs) > 5 else ''})")
    return notes


def make_figure(runs: list[Run], metrics: list[str], opts: argparse.Namespace):
    with plt.style.context(opts.style):
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
        shared, names = legend_names(runs)
        for ax, metric in zip(axes[0], metrics):
            draw_metric(ax, runs, metric, opts, names)
        fig.suptitle(opts.title or (f"{shared}… ({len(runs)} runs)" if shared else run_names(runs)))
        panels = figure_legend(fig) if len(runs) > 1 else (0, 0, 1, 1)
        as_written(fig)
        fig.tight_layout(rect=panels)
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
        as_written(fig)
        fig.tight_layout()
    return fig


def evaluation_figures(run: Run, opts: argparse.Namespace) -> list[tuple[object, Path]]:
    """Per-class errors and confusion matrices written by ``train.py --evaluate``.

    The confusion matrix is normalised by row (each true class's images sum to 100%), with the
    percentages written in the cells where there are few enough classes to read them, and the
    overall error in the title. Files from ``--tta`` are titled as such.
    """
    figures = []

    def how(path: Path) -> str:
        return f"{path.stem.split('-')[0]}{', flip TTA' if path.stem.endswith('-tta') else ''}"

    for path, frame in run.per_class.items():
        with plt.style.context(opts.style):
            fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(frame)), 4.2))
            ax.bar(frame["name"].astype(str), frame["error"], color=COLOURS[0])
            ax.set_ylabel("error (%)")
            ax.tick_params(axis="x", labelrotation=60)
            ax.set_title(f"{run.name}: per-class test error ({how(path)})")
            as_written(fig)
            fig.tight_layout()
        figures.append((fig, path.with_suffix("")))
    for path, (names, matrix) in run.confusion.items():
        totals = matrix.sum(axis=1, keepdims=True)
        percent = 100 * matrix / np.where(totals > 0, totals, 1)
        error = 100 * (1 - np.trace(matrix) / max(matrix.sum(), 1))
        with plt.style.context(opts.style):
            size = max(5, 0.45 * len(names))
            fig, ax = plt.subplots(figsize=(size + 1, size))
            image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
            if len(names) <= CELL_NUMBERS_UP_TO:
                for (row, col), value in np.ndenumerate(percent):
                    ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 50 else "black")
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.grid(False)
            fig.colorbar(image, ax=ax, label="% of the true class")
            ax.set_title(f"{run.name}: confusion ({how(path)}), test error {error:.2f}% "
                         f"of {int(matrix.sum()):,} images", fontsize=10)
            as_written(fig)
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
    runs = [run for run, _ in readable_runs(opts, as_results=False)]
    for run in runs:
        if "train" in run.logs and run.epochs == 0:
            print(f"{run.folder}: no epochs logged yet")
    trained = [run for run in runs if run.epochs > 0]
    refuse_empty_window(trained, opts.epochs)
    figures = [(lr_find_figure(run, opts), run.folder / "lr_find") for run in runs
               if run.sweep is not None]
    metrics = ["loss", "error"] + (["top5_error"] if any(
        "top5_error" in run.logs["train"] for run in trained) else [])
    for line in undrawable(trained, metrics, opts):
        print(line)
    if len(trained) == 1 and len(runs) == 1:
        folder = trained[0].folder
        figures += [(make_figure(trained, [metric], opts), folder / metric.replace("_", "-"))
                    for metric in metrics]
        figures.append((make_figure(trained, metrics, opts), folder / "curves"))
    elif trained:
        figures.append((make_figure(trained, metrics, opts), output_path(opts, trained, "comparison")))
    for run in trained:
        figures += evaluation_figures(run, opts)
    paths = [with_format(path, opts.format) for _, path in figures]
    try:
        for folder in sorted({path.parent for path in paths}):
            try:
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as error:
                raise PlotError(f"cannot write to {folder} ({error.strerror}); make it writable, "
                                f"or for several runs choose another folder with --out") from None
        for path in paths:  # every figure refused before any is replaced
            refuse_unless_regular(path)
        for (fig, _), path in zip(figures, paths):
            save_figure(fig, path, opts.dpi)
    finally:
        for fig, _ in figures:
            plt.close(fig)
    if trained:
        print(summary(trained))
    for path in paths:
        print(f"wrote {path}")
    return paths


# what only a figure uses: refused with --table alone, which prints
IDLE_WITH_TABLE = {"style", "format", "dpi", "loss_scale", "error_scale", "title", "epochs", "watch", "band"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with what argparse cannot check: the style, --out's format and folder."""
    p = build_parser()
    opts = p.parse_args(argv)
    given = {name for name, value in vars(opts).items() if value != p.get_default(name)}
    one_run = len(opts.runs) == 1 and not (opts.table or opts.group)
    mode = ("--table and --group" if opts.table and opts.group else "--table" if opts.table
            else "--group" if opts.group else "one run's figures (they go into its folder)" if one_run
            else "the figures of runs")
    idle = sorted(given & (IDLE_WITH_TABLE if opts.table and not opts.group else set())
                  | given & ({"watch"} if opts.table or opts.group else set())
                  | given & ({"band"} if not opts.group else set())
                  | given & ({"table_format"} if not opts.table else set())
                  | given & ({"out"} if opts.table and not opts.group and opts.table_format != "all" else set())
                  | given & ({"out"} if one_run else set()))
    if idle:
        p.error(f"--{idle[0].replace('_', '-')} does nothing with {mode}; drop it")
    if opts.style not in plt.style.available and opts.style != "default" and not Path(opts.style).is_file():
        p.error(f"unknown --style {opts.style!r}; choose one of: {', '.join(sorted(plt.style.available))}")
    if Path(opts.style).is_file():
        try:
            matplotlib.rc_params_from_file(opts.style, use_default_template=False)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            p.error(f"--style {opts.style} is not a matplotlib style file ({error})")
    if opts.out and opts.out.endswith(("/", os.sep)) and not Path(opts.out).is_dir():
        p.error(f"--out {opts.out}: no such folder; make it first, or name a file")
    if opts.out and not Path(opts.out).is_dir() and not (opts.table and not opts.group):  # a figure's
        out = Path(opts.out)
        if out.suffix:
            if "format" in given and out.suffix.lstrip(".").lower() != opts.format:
                p.error(f"--out {out} is a {out.suffix} file and --format says {opts.format}: give one")
            opts.format = out.suffix.lstrip(".").lower()
            if opts.format not in cli.FIGURE_FORMATS:
                p.error(f"--out {out}: unknown figure format {out.suffix!r}; use "
                        f"{', '.join(cli.FIGURE_FORMATS)}")
        if not out.parent.is_dir():
            p.error(f"--out {out}: the folder {out.parent} does not exist")
    return opts


def own_output(path: Path) -> bool:
    """Whether ``path`` is a figure or table plot.py writes beside several runs (OWN_OUTPUTS)."""
    return (path.stem in OWN_OUTPUTS and path.suffix.lstrip(".").lower() in OWN_OUTPUTS[path.stem]
            and path.is_file())


def readable_runs(opts: argparse.Namespace, as_results: bool) -> list[tuple[Run, groups.Result | None]]:
    """The folders of ``opts.runs`` that hold something to draw (``as_results``: a training
    run with a logged epoch), each run once (results.distinct), with their results.

    Of several paths, plot.py's own outputs (OWN_OUTPUTS) are passed over in silence and the
    others that hold nothing to show are named, each with its reason, in one line (refused
    with --strict); a single path that holds nothing is an error.
    """
    paths = [Path(folder) for folder in opts.runs]
    if len(paths) > 1:
        paths = [path for path in paths if not own_output(path)] or paths
    found, skipped = [], []
    for folder in paths:
        try:
            run = load_run(folder)
            if as_results and run.sweep is not None and "train" not in run.logs:
                raise PlotError(f"{folder} is a learning-rate sweep (attic/lr_find.py), not a training run")
            result = groups.read_result(run.folder, run.logs, run.config) if as_results else None
            found.append((run, result))
        except (cli.UserError, ValueError) as error:  # a bad CSV line (BadCsv) too
            if len(paths) == 1:
                raise PlotError(str(error) if str(error).startswith(str(folder)) else f"{folder}: {error}") from None
            if opts.strict:
                raise PlotError(f"{error}; leave it out, or drop --strict to skip it") from None
            reason = str(error).removeprefix(f"{folder} ").removeprefix(f"{folder}: ")
            skipped.append(f"{folder} ({reason})")
    if skipped:
        print(f"warning: skipped {len(skipped)} of {len(paths)} path(s): {'; '.join(skipped)}",
              file=sys.stderr)
    if not found:
        raise PlotError(f"none of the {len(paths)} path(s) holds a run with a logged epoch; "
                        f"name train.py work directories")
    run_ids = [run.config.get("run_id") if isinstance(run.config.get("run_id"), str) else None
               for run, _ in found]
    kept, notes = groups.distinct([(run_id, run.folder) for run_id, (run, _) in zip(run_ids, found)])
    for note in notes:
        print(note, file=sys.stderr)
    return [found[index] for index in kept]


def results_rows(opts: argparse.Namespace) -> tuple[list[groups.Row], list[Run]]:
    """The table's rows from the readable runs; a seed that repeats within a row is named."""
    found = readable_runs(opts, as_results=True)
    table_rows = groups.rows([result for _, result in found])
    for row, label in zip(table_rows, groups.labels(table_rows)[1]):
        if repeated := row.repeated_seeds():
            print(f"note: seed {', '.join(map(str, repeated))} appears more than once in "
                  f"{label}: {', '.join(str(r.folder) for r in row.results if r.seed in repeated)}",
                  file=sys.stderr)
    return table_rows, [run for run, _ in found]


def write_table(opts: argparse.Namespace) -> list[Path]:
    """--table: print the results table; with --table-format all, also write it as Markdown,
    CSV and LaTeX beside the runs (or into --out's folder). Nothing is replaced on failure."""
    table_rows, runs = results_rows(opts)
    style = "text" if opts.table_format == "all" else opts.table_format
    print(table_formats.table(table_rows, style), end="")
    if opts.table_format != "all":
        return []
    folder = output_path(opts, runs, "results").parent
    texts = {folder / f"results.{suffix}": table_formats.table(table_rows, style)
             for suffix, style in (("md", "markdown"), ("csv", "csv"), ("tex", "latex"))}
    for path in texts:  # every table refused before any is replaced
        refuse_unless_regular(path)
    for path, text in texts.items():
        try:
            write_text(path, text)
        except OSError as error:
            raise PlotError(f"cannot write {path} ({error.strerror}); make the folder writable "
                            f"or choose another with --out") from None
        print(f"wrote {path}")
    return list(texts)


def refuse_empty_window(runs: list[Run], window: tuple[int, int] | None) -> None:
    """PlotError where --epochs ``window`` holds no epoch any of ``runs`` logged."""
    if window is None or not runs or any(len(epoch_window(run.logs["train"], window)) for run in runs):
        return
    held = ", ".join(f"{run.name} {int(run.logs['train']['epoch'].min())}-"
                     f"{int(run.logs['train']['epoch'].max())}" for run in runs)
    first, last = window
    raise PlotError(f"--epochs {first}:{'' if last == OPEN_END else last} holds no logged "
                    f"epoch (logged: {held}); choose a range within them")


def group_figure(opts: argparse.Namespace):
    """--group: the panels of curves.png (loss, error, top-5 error), each group's mean curve
    per split in one colour per group, with a band (min to max, or mean ± one standard
    deviation: --band) where the group has two runs or more; legend entries say what sets
    the groups apart."""
    table_rows, runs = results_rows(opts)
    refuse_empty_window(runs, opts.epochs)
    by_folder = {run.folder: run for run in runs}
    metrics = ["loss", "error"] + (["top5_error"] if any(
        "top5_error" in run.logs["test"] for run in runs) else [])
    with plt.style.context(opts.style):
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
        shared, labels = groups.labels(table_rows, leave_out_shared=True)
        for ax, metric in zip(axes[0], metrics):
            epochs, drops = [], []
            for index, (row, label) in enumerate(zip(table_rows, labels)):
                colour = COLOURS[index % len(COLOURS)]
                logs = [by_folder[r.folder].logs for r in row.results]
                drops.append((colour, lr_drops(by_folder[row.first.folder])))
                for split, (style, _) in SPLITS.items():
                    if not all(split in log and metric in log[split] for log in logs):
                        continue
                    curves = pd.concat([epoch_window(log[split], opts.epochs).set_index("epoch")[metric]
                                        for log in logs], axis=1)
                    mean = curves.mean(axis=1)
                    ax.plot(mean.index, mean, style, color=colour, linewidth=1.6 if split == "test" else 1.2,
                            label=label)
                    if len(logs) > 1:
                        spread = curves.std(axis=1)
                        low, high = ((mean - spread, mean + spread) if opts.band == "std"
                                     else (curves.min(axis=1), curves.max(axis=1)))
                        ax.fill_between(mean.index, low, high, color=colour, alpha=0.2, linewidth=0)
                    epochs += mean.index.tolist()
            split_key(ax)
            mark_lr_drops(ax, drops, opts)
            finish_panel(ax, metric, epochs, opts)
        band = "min to max" if opts.band == "minmax" else "mean ± one standard deviation"
        fig.suptitle(opts.title or f"{shared + chr(10) if shared else ''}mean over each group's runs; "
                                   f"bands ({band}) where a group has two or more")
        panels = figure_legend(fig)
        as_written(fig)
        fig.tight_layout(rect=panels)
    return fig, runs


def as_written(fig) -> None:
    """Draw every title, label, legend entry and note of ``fig`` as written: a $ in a run's
    folder name or a --title is text, not math markup (tick labels keep matplotlib's), and a
    non-ASCII name is drawn under any locale."""
    ticks = {label for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in axis.get_major_ticks() + axis.get_minor_ticks()
             for label in (tick.label1, tick.label2)}
    for text in fig.findobj(matplotlib.text.Text):
        if text not in ticks:
            text.set_parse_math(False)
            # a name from the command line under an ASCII locale holds the bytes it could not
            # decode as surrogates, which no font can draw: the name as UTF-8 instead
            text.set_text(text.get_text().encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def write_groups(opts: argparse.Namespace) -> list[Path]:
    fig, runs = group_figure(opts)
    path = with_format(output_path(opts, runs, "groups"), opts.format)
    try:
        save_figure(fig, path, opts.dpi)
    finally:
        plt.close(fig)
    print(f"wrote {path}")
    return [path]


def with_format(path: Path, figure_format: str) -> Path:
    """``path`` with the figure format's suffix; a suffix the user wrote (--out cmp.PNG) is kept."""
    return path if path.suffix.lower() == f".{figure_format}" else path.with_suffix(f".{figure_format}")


def save_figure(fig, path: Path, dpi: int) -> None:
    """Write ``fig`` whole: a failed or killed write keeps the previous figure."""
    try:
        write_figure(fig, path, dpi)
    except OSError as error:
        raise PlotError(f"cannot write {path} ({error.strerror}); free space, make the folder "
                        f"writable or choose another with --out") from None


def output_path(opts: argparse.Namespace, runs: list[Run], name: str) -> Path:
    """Where an output of several runs named ``name`` goes: --out (a file, or a folder to
    hold it), else the folder that holds every run, or for runs in several folders the
    current one (their common ancestor may be far above them all: /)."""
    if opts.out:
        return Path(opts.out) / name if Path(opts.out).is_dir() else Path(opts.out)
    parents = {run.folder.resolve().parent for run in runs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / name


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.table or opts.group:
        if opts.table:
            write_table(opts)
        if opts.group:
            write_groups(opts)
        return 0
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
