"""A work directory's format (results/layout.py): the settings that cannot change a run's
numbers, and how a span of time is written, the same in every line and table."""
from __future__ import annotations

from densenet_trainer.config.run_config import NUMBER_NEUTRAL
from densenet_trainer.results import groups
from densenet_trainer.results.layout import csv_name, duration


def test_the_number_neutral_settings_are_where_how_fast_and_how_long_to_look():
    """Where the data is, on what and how fast: never the numbers; --epochs sets the schedule,
    so runs of different lengths are different configurations; the seed is grouped over only
    in tables across seeds."""
    assert {"data_dir", "download", "device", "channels_last", "kernels", "cuda_graph",
            "eval_batch_size", "save", "resume"} <= NUMBER_NEUTRAL
    assert not {"epochs", "seed", "lr", "depth", "growth_rate", "batch_size", "dataset",
                "train_subset", "val_size", "precision", "augment"} & NUMBER_NEUTRAL
    assert groups.GROUPED_OVER == NUMBER_NEUTRAL | {"seed"}


def test_durations_read_as_people_say_them():
    assert [duration(s) for s in (0.4, 45, 99.4, 720, 5990, 3.4 * 3600)] == [
        "0 s", "45 s", "99 s", "12.0 min", "99.8 min", "3.4 h"]


def test_each_split_has_its_csv():
    assert [csv_name(split) for split in ("train", "test", "val")] == ["train.csv", "test.csv", "val.csv"]
