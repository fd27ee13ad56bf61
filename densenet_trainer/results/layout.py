"""A work directory's format, kept once for every reader and writer (train.py, plot.py,
results, the tools): its file names, its CSV columns and their ranges, and how a span of time
is written. torch-free."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONFIG_FILE = "config.json"  # the configuration, what was built, and an entry per resume
LAST_CHECKPOINT = "checkpoint.pt"  # after every epoch, or at a stop within one
BEST_CHECKPOINT = "best.pt"  # with --val-size: the epoch of lowest validation error
LOCK_FILE = ".lock"  # only while a process works in the folder
# every file a run writes in its folder, the lock and the evaluation files aside: a folder
# holding any of them holds a run, which a new run never writes over
RUN_FILES = (CONFIG_FILE, "train.csv", "test.csv", LAST_CHECKPOINT, "val.csv", BEST_CHECKPOINT)
# what train.py --evaluate writes beside a checkpoint: "<its name>-<kind><selection>.csv"
EVALUATION_KINDS = ("classes", "confusion")
EVALUATION_FILES = tuple(f"{Path(checkpoint).stem}-{kind}*.csv" for checkpoint in (LAST_CHECKPOINT, BEST_CHECKPOINT)
                         for kind in EVALUATION_KINDS)  # glob patterns: a folder holding one holds a run

TRAIN_COLUMNS = ["epoch", "lr", "loss", "error", "seconds", "images_per_s"]
EVAL_COLUMNS = ["epoch", "loss", "error", "seconds"]
TOP5_COLUMNS = ["top5_error"]  # added for datasets with many classes (RunConfig.top5)
# What a logged number can be: errors are percentages; losses, rates, times and speeds are
# never negative (a resume keeps the columns it finds, a reader refuses anything else).
COLUMN_RANGES = {"error": (0.0, 100.0), "top5_error": (0.0, 100.0), "loss": (0.0, None),
                 "raw_loss": (0.0, None), "lr": (0.0, None), "seconds": (0.0, None),
                 "images_per_s": (0.0, None)}


def seal(content: dict) -> dict:
    """``content`` (config.json's) with its seal, a hash of the run's identity and settings as
    train.py writes them: a hand edit of either breaks it, and a reader names the run as edited
    instead of describing it (``broken_seal``)."""
    content["seal"] = _seal_of(content)
    return content


def broken_seal(content: dict) -> bool:
    """Whether config.json's run_id or settings changed since train.py wrote them (a run from
    before seals has none: taken as it is)."""
    return "seal" in content and content["seal"] != _seal_of(content)


def _seal_of(content: dict) -> str:
    identity = json.dumps([content.get("run_id"), content.get("config")], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def csv_name(split: str) -> str:
    """The CSV file of ``split`` ("train", "test" or "val")."""
    return f"{split}.csv"


def duration(seconds: float) -> str:
    """A span of time as people say it: 45 s, 12.5 min, 3.4 h."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"
