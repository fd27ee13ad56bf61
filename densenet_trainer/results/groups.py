"""Runs gathered into results: groups of seeds, their mean and spread, beside the paper's numbers.

A group is the finished runs of one configuration on one set of images: their configurations
differ only in the seed and in settings that cannot change the numbers (config.NUMBER_NEUTRAL:
where the files go, which device, kernels, graph or memory layout compute them), and their
images (count and fingerprint of each split, from config.json) are the same. Each run counts
once, however many paths reach it (``distinct``, by run_id). Each unfinished run (still
training, or stopped early) is a row of its own and stays out of the finished runs' means.

A row gets Table 2's number (table2.json) only where model, dataset, augmentation, epochs and
images (the official splits') match the paper's. torch-free; table_formats.py writes the rows.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import IN_MODEL_NAME, NUMBER_NEUTRAL, RunConfig, flag_name
from densenet_trainer.results.layout import broken_seal

TABLE_2 = json.loads(Path(__file__).with_name("table2.json").read_text())
GROUPED_OVER = NUMBER_NEUTRAL | {"seed"}  # runs that differ only in these are one group
DATASET_COLUMNS = {"cifar10": "C10", "cifar100": "C100", "svhn": "SVHN"}
SPLITS, POOL = ("train", "val", "test"), "pool"  # pool: with a validation set, the images it is drawn from
# settings whose whole effect is which images each split holds: where every split's images are
# fingerprinted, the images decide the group and these do not (--train-subset 5000 of 4,660
# images trains on the images of --train-subset 0)
CHOOSE_IMAGES = frozenset({"train_subset", "test_subset", "val_size", "svhn_extra"})
# settings that the data column says (its name, its "+", its image counts), not a legend
SAID_BY_DATA = CHOOSE_IMAGES | {"augment"}


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
    images: dict[str, dict]  # by split: {"images": count, "fingerprint": str or None}; {}: unknown
    run_id: str | None
    code: str  # the code that ran it (commit and +modified, or version), or "unrecorded"
    processes: tuple[int, ...] = ()  # each session's processes, where they changed; (): not recorded
    lrs: tuple[float, ...] = ()  # the learning rate of each epoch trained (train.csv)
    resumed_rescheduled: bool = False  # a resume in config.json changed the schedule (--reschedule)

    @property
    def planned(self) -> int:
        return int(self.config.get("epochs", self.epochs))

    @property
    def finished(self) -> bool:
        return self.epochs >= self.planned

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def counts(self) -> dict[str, int]:
        return {split: self.images[split]["images"] for split in SPLITS if split in self.images}

    @property
    def on_papers_images(self) -> bool:
        """Whether the run trained, validated and tested on the official splits' counts."""
        expected = TABLE_2["images"].get(self.config.get("dataset"), {})
        return bool(self.images) and all(self.counts().get(split, 0) == expected.get(split, 0)
                                         for split in SPLITS)

    @property
    def data(self) -> str:
        """The paper's name for the dataset and augmentation (C10+, C100, SVHN, ...), and the
        image counts where they are not the paper's: C10+ (4,660 train / 846 test)."""
        name = DATASET_COLUMNS.get(self.config.get("dataset"), str(self.config.get("dataset")))
        name += "+" if self.config.get("augment") else ""
        if self.on_papers_images:
            return name
        if not self.images:
            return f"{name} (images not recorded)"
        return f"{name} ({' / '.join(f'{n:,} {split}' for split, n in self.counts().items())})"

    @functools.cached_property
    def rescheduled(self) -> bool:
        """Whether its learning rates are not its configuration's from the start (a resume changed them)."""
        cfg = RunConfig.from_dict(self.config, str(self.folder))  # train.csv keeps 6 digits
        return not all(math.isclose(lr, cfg.learning_rate(epoch), rel_tol=1e-5)
                       for epoch, lr in enumerate(self.lrs))

    def facts(self) -> dict[str, str]:
        """What changes its numbers beside its settings, in words: its processes, rates changed at a resume."""
        changed = "rescheduled at a resume" if self.resumed_rescheduled else "rates unlike its config.json's"
        return {"processes": f"{' then '.join(map(str, self.processes)) or '?'} process(es)",
                "rescheduled": changed if self.rescheduled else ""}

    def key(self) -> tuple:
        """What a group shares: the settings that change the numbers, the images, the
        processes and the learning rate of every epoch. A seed draws its validation set: there
        the sizes chosen and the pool drawn from (config.json's, if any) say the images."""
        images = self.images
        fingerprinted = bool(images) and all(item["fingerprint"] for item in images.values())
        over = GROUPED_OVER | (CHOOSE_IMAGES if fingerprinted else frozenset())
        if "val" in images:
            images = {**images, **{s: {"images": images[s]["images"]} for s in ("train", "val") if s in images}}
            over -= {"val_size", "train_subset"}
        settings = sorted((k, json.dumps(v)) for k, v in self.config.items() if k not in over)
        return (*settings, json.dumps(images, sort_keys=True), self.processes, self.lrs)


def read_result(folder: Path, logs: dict[str, pd.DataFrame], record: dict) -> Result:
    """A Result from a run's parsed CSVs (``logs``) and config.json (``record``); ValueError
    if they do not describe a trained run."""
    config = record.get("config")
    if not isinstance(config, dict):
        raise ValueError("its config.json holds no configuration" if record else "it has no readable config.json")
    if broken_seal(record):
        raise ValueError("its config.json's settings or run_id were changed after train.py wrote them "
                         "(its seal no longer matches): put them back, or train a run with the settings you want")
    try:  # checked as a resume checks it; settings added since its version take their defaults
        config = RunConfig.from_dict(config, "its config.json").to_dict()
    except UserError as error:
        raise ValueError(str(error).split("; ")[0]) from None
    if "test" not in logs or not len(logs["test"]) or not len(logs.get("train", [])):
        raise ValueError("no epoch is logged yet")
    test, train = logs["test"], logs["train"]
    train = train[train["epoch"] <= test["epoch"].iloc[-1]]  # an epoch being written counts once whole
    best_val = None
    if config["val_size"] and "val" in logs and len(logs["val"]):  # never a stale val.csv
        epoch = logs["val"].loc[logs["val"]["error"].idxmin(), "epoch"]
        matching = test[test["epoch"] == epoch]
        best_val = float(matching["error"].iloc[0]) if len(matching) else None
    top5 = float(test["top5_error"].iloc[-1]) if "top5_error" in test else None
    seconds = float(train["seconds"].sum()) if "seconds" in train else math.nan
    parameters, run_id = record.get("parameters"), record.get("run_id")
    resumes = record.get("resumes") if isinstance(record.get("resumes"), list) else []
    return Result(folder, config, parameters if isinstance(parameters, int) else None,
                  str(record.get("model", folder.name)), int(train["epoch"].iloc[-1]),
                  float(test["error"].iloc[-1]), best_val, top5, seconds, recorded_images(record),
                  run_id if isinstance(run_id, str) and run_id else None, code_label(record),
                  recorded_processes([record, *resumes]), tuple(float(lr) for lr in train["lr"]) if "lr" in train else (),
                  any(isinstance(r, dict) and "schedule" in (r.get("changes") or {}) for r in resumes))


def recorded_processes(sessions: list) -> tuple[int, ...]:
    """The processes of each session (config.json, then each resume's entry) where the count
    changed: (2,), (2, 1), or () where none is recorded."""
    counts = [session["environment"].get("world_size") for session in sessions if isinstance(session, dict)
              and isinstance(session.get("environment"), dict)]
    counts = [count for count in counts if isinstance(count, int) and not isinstance(count, bool)]
    return tuple(count for index, count in enumerate(counts) if index == 0 or count != counts[index - 1])


def recorded_images(record: dict) -> dict[str, dict]:
    """config.json's images by split (``data``: count and fingerprint; a run from before
    fingerprints: ``train_images`` and the like); ValueError where they are not numbers."""
    data = record.get("data")
    if data is None:
        data = {split: {"images": record.get(f"{split}_images"), "fingerprint": None}
                for split in SPLITS if record.get(f"{split}_images")}
    if not isinstance(data, dict) or not all(
            split in (*SPLITS, POOL) and isinstance(item, dict) and isinstance(item.get("images"), int)
            and not isinstance(item["images"], bool) and item["images"] >= 0
            and isinstance(item.get("fingerprint"), (str, type(None)))
            for split, item in data.items()):
        raise ValueError("its config.json records its images wrongly (data); it is damaged")
    return {split: {"images": item["images"], "fingerprint": item.get("fingerprint")}
            for split, item in data.items()}


def code_label(record: dict) -> str:
    """The code a run was trained with, as config.json's ``code`` says it: the commit (and
    +modified where the checkout had changes), or the version outside a checkout; "unrecorded"
    before versions recorded it (a row mixing it with others says so)."""
    code = record.get("code")
    if not isinstance(code, dict):
        return "unrecorded"
    if isinstance(code.get("commit"), str):
        return code["commit"] + ("+modified" if code.get("modified") else "")
    return str(code.get("version", ""))


def distinct(runs: list[tuple[str | None, Path]]) -> tuple[list[int], list[str]]:
    """Each run once, of ``runs`` as (run_id, folder): the indices of those kept, and a note
    for each left out (a folder named twice; a copy of a run: the same run_id)."""
    seen: dict[str, Path] = {}
    kept, notes = [], []
    for index, (run_id, folder) in enumerate(runs):
        identity = run_id or str(folder.resolve())
        if identity in seen:
            notes.append(f"note: {folder} was named twice: counted once"
                         if folder.resolve() == seen[identity].resolve() else
                         f"note: {folder} is the run of {seen[identity]} (the same run_id): counted once")
            continue
        seen[identity] = folder
        kept.append(index)
    return kept, notes


# settings a run may choose and still be the paper's experiment: the row's model, dataset and
# augmentation (matched to the row), the seed, the epochs and the images (checked apart), and
# how the arithmetic runs (precision, SyncBatchNorm)
PAPER_CHOOSES = IN_MODEL_NAME | CHOOSE_IMAGES | {"augment", "seed", "epochs", "precision", "sync_bn"}


def follows_papers_recipe(config: dict) -> bool:
    """Whether every other setting that changes the numbers is the paper's for this dataset
    and augmentation (SGD, Nesterov momentum 0.9, lr 0.1 divided by 10 at 50% and 75%,
    weight decay 1e-4, batch 64, dropout 0 with augmentation and 0.2 without)."""
    paper = RunConfig(dataset=config["dataset"], augment=config["augment"]).to_dict()
    return all(config.get(name) == value for name, value in paper.items()
               if name not in NUMBER_NEUTRAL | PAPER_CHOOSES)


def paper_error(result: Result) -> float | None:
    """Table 2's test error for this run's configuration, or None where the paper has none:
    another model, augmentation, recipe (follows_papers_recipe) or epoch count, a changed
    schedule, other images than the official splits."""
    config = result.config
    dataset = config.get("dataset")
    if (int(config.get("epochs", 0)) != TABLE_2["epochs"].get(dataset) or not result.on_papers_images
            or not follows_papers_recipe(config) or result.rescheduled):
        return None
    column = DATASET_COLUMNS.get(dataset, "") + ("+" if config.get("augment") else "")
    for row in TABLE_2["rows"]:
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

    def repeated_seeds(self) -> list[int]:
        seeds = [r.seed for r in self.results]
        return sorted({seed for seed in seeds if seeds.count(seed) > 1})

    def statistics(self, values: list[float | None]) -> dict[str, float | int | None]:
        """mean, sample std (None for one run), min, max and n of the finite ``values``: of
        every run's, or none where a run lacks one (never some runs' beside the n of all)."""
        known = [v for v in values if v is not None and math.isfinite(v)]
        known = known if len(known) == len(values) else []
        return {"mean": statistics.mean(known) if known else None,
                "std": statistics.stdev(known) if len(known) > 1 else None,
                "min": min(known, default=None), "max": max(known, default=None), "n": len(known)}

    def numbers(self, apart: str = "") -> dict:
        """The row as numbers, one per CSV column (None: unknown or not applicable); ``apart``:
        what sets it apart from the other rows (settings_apart)."""
        first = self.first
        test = self.statistics([r.test_error for r in self.results])
        best_val = self.statistics([r.best_val_test_error for r in self.results])
        paper = paper_error(first) if first.finished else None
        chosen = best_val if first.config["dataset"] in TABLE_2["chosen_by_validation"] else test
        counts = first.counts()
        return {
            "model": first.model, "parameters": first.parameters, "data": first.data,
            "settings": apart or None, "dataset": first.config["dataset"], "augment": first.config["augment"],
            **{f"{split}_images": counts.get(split) for split in SPLITS},
            "epochs": first.epochs, "planned_epochs": first.planned, "finished": first.finished,
            "n": len(self.results), "seeds": " ".join(str(r.seed) for r in self.results),
            **{f"test_error_{k}": v for k, v in test.items() if k != "n"},
            **{f"best_val_test_error_{k}": best_val[k] for k in ("mean", "std")},
            **{f"top5_error_{k}": v for k, v in self.statistics(
                [r.top5_error for r in self.results]).items() if k in ("mean", "std")},
            "training_seconds": self.statistics([r.seconds for r in self.results])["mean"],
            "paper_error": paper,
            "difference": chosen["mean"] - paper if paper is not None and chosen["mean"] is not None else None,
            "code": " ".join(sorted({r.code for r in self.results if r.code})),
        }

    def label(self, apart: str, shared: tuple[str, ...] = ()) -> str:
        """A legend entry: the model and the data (those not ``shared`` by every row), what
        sets the row ``apart``, and n."""
        first = self.first
        unfinished = "" if first.finished else f", {first.epochs}/{first.planned} epochs"
        words = " ".join(word for word in (first.model, first.data, apart) if word and word not in shared)
        size = f"n={len(self.results)}{unfinished}"
        return f"{words} ({size})" if words else size


def rows(results: list[Result]) -> list[Row]:
    """Finished runs grouped by configuration and images (seeds together), then each unfinished run."""
    groups: dict[tuple, list[Result]] = {}
    for result in results:
        if result.finished:
            groups.setdefault(result.key(), []).append(result)
    unfinished = [Row([r]) for r in results if not r.finished]
    return [Row(sorted(group, key=lambda r: r.seed)) for group in groups.values()] + unfinished


def setting_text(name: str, value) -> str:
    """A setting as a reader would write its flag: lr 0.05, no-augment, seed 3."""
    if isinstance(value, bool):
        return ("" if value else "no-") + flag_name(name)
    return f"{flag_name(name)} {value}"


def settings_apart(table_rows: list[Row], shown: frozenset[str]) -> list[str]:
    """Per row, what tells it from the other rows beyond the ``shown`` settings (those its
    model, data or epochs already say): each setting on which the rows differ (lr 0.05) and
    each fact (Result.facts: 2 process(es)); then, among rows that would still read alike,
    what differs between them alone: the shown settings (train-subset 5000), the images
    (train images 1a2b3c4d: the fingerprint's first characters in config.json), the
    folder. '' for a row where nothing needs saying."""
    words: list[list[str]] = [[] for _ in table_rows]

    def add_differing(indices: list[int], described) -> None:
        """To the rows of ``indices``, the words of ``described(result)`` (by name) that
        differ between them."""
        values = [described(table_rows[index].first) for index in indices]
        names = [name for name in values[0] if len({value.get(name) for value in values}) > 1]
        for index, value in zip(indices, values):
            words[index] += [value[name] for name in names if value.get(name)]

    def alike() -> list[list[int]]:
        said: dict[tuple, list[int]] = {}
        for index, (row, row_words) in enumerate(zip(table_rows, words)):
            first = row.first
            said.setdefault((first.model, first.data, first.epochs, first.planned, *row_words), []).append(index)
        return [indices for indices in said.values() if len(indices) > 1]

    add_differing(list(range(len(table_rows))), lambda result: {
        **{name: setting_text(name, value) for name, value in result.config.items()
           if name not in GROUPED_OVER | shown}, **result.facts()})
    for described in (
            lambda result: {name: setting_text(name, value) for name, value in result.config.items()
                            if name in shown - IN_MODEL_NAME},
            lambda result: {split: f"{split} images {item['fingerprint'][:8]}"
                            for split, item in result.images.items() if item.get("fingerprint")},
            lambda result: {"folder": result.folder.name}):
        for indices in alike():
            add_differing(indices, described)
    return [" ".join(row_words) for row_words in words]


def labels(table_rows: list[Row], leave_out_shared: bool = False) -> tuple[str, list[str]]:
    """A label per row that tells it from the others (settings_apart), with n; with
    ``leave_out_shared``, the model and the data where every row has the same, which come
    first, for a title (a legend then says only what differs)."""
    apart = settings_apart(table_rows, IN_MODEL_NAME | SAID_BY_DATA)
    shared = tuple(text for text in (table_rows[0].first.model, table_rows[0].first.data)
                   if leave_out_shared and all(text in (row.first.model, row.first.data) for row in table_rows))
    return " ".join(shared), [row.label(text, shared) for row, text in zip(table_rows, apart)]
