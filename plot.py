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
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

# Okabe & Ito's colour-blind-safe palette.
COLOURS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
NUMERIC_COLUMNS = ("epoch", "lr", "loss", "error")  # what the curves are drawn from
SPLITS = {"train": ("-", 0), "val": (":", 2), "test": ("--", 1)}  # line style, colour index


class PlotError(Exception):
    """A problem with the input the user can fix; printed as one line, exit status 2."""


@dataclass
class Run:
    folder: Path
    logs: dict[str, pd.DataFrame]  # "train", "test", "val": one row per epoch
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def epochs(self) -> int:
        return len(self.logs["train"])


def read_csv(path: Path, required: tuple[str, ...] = ("epoch",)) -> pd.DataFrame:
    """Read a CSV that may still be growing: whole lines only, columns by name."""
    text = path.read_text()
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
    return frame


def load_run(folder: Path) -> Run:
    if not folder.is_dir():
        raise PlotError(f"{folder} does not exist or is not a directory")
    if not (folder / "train.csv").is_file():
        raise PlotError(f"{folder} holds no train.csv: it is not a train.py work directory")
    logs = {"train": read_csv(folder / "train.csv", ("epoch", "loss", "error"))}
    for split in ("test", "val"):
        if (folder / f"{split}.csv").is_file():
            logs[split] = read_csv(folder / f"{split}.csv", ("epoch", "loss", "error"))
    config = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError:
            config = {}  # the table just lacks the parameter count
    return Run(folder, logs, config)


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


def save(fig, path: Path, opts: argparse.Namespace) -> Path:
    path = path.with_suffix(f".{opts.format}")
    fig.savefig(path, dpi=opts.dpi)
    plt.close(fig)
    return path


def draw_lr_find(folder: Path, opts: argparse.Namespace) -> list[Path]:
    """The learning-rate finder's sweep, with its suggestion marked, when the run has one."""
    path = folder / "lr_find.csv"
    if not path.is_file():
        return []
    frame = read_csv(path, ("lr", "loss"))
    with plt.style.context(opts.style):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.plot(frame["lr"], frame["loss"], color=COLOURS[0], label="loss (smoothed)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        suggestion = folder / "lr_find.json"
        if suggestion.is_file():
            lr = json.loads(suggestion.read_text())["suggested_lr"]
            ax.axvline(lr, color=COLOURS[3], linestyle="--", label=f"suggested lr {lr:.3g}")
        ax.legend(fontsize=8)
        ax.set_title(f"{folder.name}: learning-rate finder")
        fig.tight_layout()
    return [save(fig, folder / "lr_find", opts)]


def draw_evaluations(folder: Path, opts: argparse.Namespace) -> list[Path]:
    """Per-class errors and confusion matrices written by ``train.py --evaluate``."""
    written = []
    for path in sorted(folder.glob("*-classes*.csv")):
        frame = read_csv(path, ("name", "error"))
        with plt.style.context(opts.style):
            fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(frame)), 4.2))
            ax.bar(frame["name"].astype(str), frame["error"], color=COLOURS[0])
            ax.set_ylabel("error (%)")
            ax.tick_params(axis="x", labelrotation=60)
            ax.set_title(f"{folder.name}: per-class test error")
            fig.tight_layout()
        written.append(save(fig, path.with_suffix(""), opts))
    for path in sorted(folder.glob("*-confusion*.csv")):
        frame = read_csv(path, ())
        matrix = frame.iloc[:, 1:].to_numpy(dtype=float)
        names = list(frame.columns[1:])
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
            ax.set_title(f"{folder.name}: confusion matrix")
            fig.tight_layout()
        written.append(save(fig, path.with_suffix(""), opts))
    return written


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
    """Draw everything once; returns the files written."""
    runs, written = [], []
    for folder in map(Path, opts.runs):
        if (folder / "lr_find.csv").is_file() and not (folder / "train.csv").exists():
            written += draw_lr_find(folder, opts)  # a learning-rate sweep without a run
        else:
            runs.append(load_run(folder))
    empty = [run for run in runs if run.epochs == 0]
    for run in empty:
        print(f"{run.folder}: no epochs logged yet")
    runs = [run for run in runs if run.epochs > 0]
    if len(runs) == 1 and len(opts.runs) == 1:
        run = runs[0]
        written.append(save(make_figure(runs, ["loss"], opts), run.folder / "loss", opts))
        written.append(save(make_figure(runs, ["error"], opts), run.folder / "error", opts))
        written.append(save(make_figure(runs, ["loss", "error"], opts), run.folder / "curves", opts))
    elif runs:
        out = Path(opts.out) if opts.out else Path(os.path.commonpath(
            [str(r.folder.resolve().parent) for r in runs])) / "comparison"
        if opts.out and out.suffix:
            opts.format = out.suffix.lstrip(".")
        written.append(save(make_figure(runs, ["loss", "error"], opts), out, opts))
    for run in runs:
        written += draw_lr_find(run.folder, opts) + draw_evaluations(run.folder, opts)
    if runs:
        print(summary(runs))
    for path in written:
        print(f"wrote {path}")
    return written


def epoch_range(text: str) -> tuple[int, int]:
    try:
        first, _, last = text.partition(":")
        return int(first or 1), int(last) if last else 10**9
    except ValueError:
        raise argparse.ArgumentTypeError(f"epoch range must look like 10:200, 50: or :100, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="WORKDIR", help="work directories written by train.py")
    p.add_argument("--out", help="file for several runs (default: comparison.FORMAT beside the runs)")
    p.add_argument("--style", default="seaborn-v0_8-whitegrid", help="any matplotlib style")
    p.add_argument("--format", default="png", choices=["png", "pdf", "svg"])
    p.add_argument("--dpi", type=int, default=130)
    p.add_argument("--loss-scale", default="log", choices=["log", "linear"], help="loss y axis")
    p.add_argument("--error-scale", default="linear", choices=["log", "linear"], help="error y axis")
    p.add_argument("--epochs", type=epoch_range, default=None, metavar="FIRST:LAST",
                   help="only this range of epochs")
    p.add_argument("--title", default=None)
    p.add_argument("--watch", type=float, default=0, metavar="SECONDS",
                   help="redraw every SECONDS until Ctrl-C")
    opts = p.parse_args(argv)
    if opts.style not in plt.style.available and opts.style != "default" and not Path(opts.style).is_file():
        p.error(f"unknown --style {opts.style!r}; choose one of: {', '.join(sorted(plt.style.available))}")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        draw(opts)
        while opts.watch > 0:
            time.sleep(opts.watch)
            draw(opts)
    except PlotError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
