"""The resume rules (workdir.py): which schedules a resume may change, and the configuration a
resume continues with."""
from __future__ import annotations

from pathlib import Path

import pytest

from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.run import workdir
from helpers import config_of


@pytest.mark.parametrize("planned,epochs,done,partial,reschedule,outcome", [
    (300, 300, 120, False, False, ""),  # nothing changes
    (300, 400, 100, False, False, ""),  # epochs 1-100 had 0.1 under both: exact
    (300, 400, 300, False, False, "epoch 301 trains at lr 0.001"),  # longer at the last rate
    (300, 400, 160, False, False, "refused: would raise the learning rate"),  # 0.01 -> 0.1
    (300, 400, 160, False, True, "epoch 161 trains at lr 0.1"),  # accepted
    (3, 8, 3, False, False, "refused: would raise the learning rate"),  # the example
    (300, 200, 100, False, False, ""),  # shorter, epochs 1-100 at 0.1 under both: exact
    (300, 200, 120, False, False, "epoch 121 trains at lr 0.01"),  # shorter: an earlier drop
    (3, 2, 3, False, False, "refused: cannot be shortened to 2"),
    (300, 150, 149, True, False, "refused: cannot be shortened to 150"),  # 150th in progress
    (300, 150, 149, False, False, "epoch 150 trains at lr 0.001"),
])
def test_resume_schedule_rules(planned, epochs, done, partial, reschedule, outcome):
    saved, cfg = RunConfig(epochs=planned), RunConfig(epochs=epochs)
    if outcome.startswith("refused: "):
        with pytest.raises(UserError, match=outcome.removeprefix("refused: ")):
            workdir.check_schedule(saved, cfg, done, partial, reschedule, Path("work/x"))
    else:
        note = workdir.check_schedule(saved, cfg, done, partial, reschedule, Path("work/x"))
        assert outcome in note and (note == "") == (outcome == "")


def test_cosine_resume_with_more_epochs_needs_reschedule():
    saved, cfg = RunConfig(schedule="cosine", epochs=10), RunConfig(schedule="cosine", epochs=20)
    with pytest.raises(UserError, match="would raise the learning rate"):
        workdir.check_schedule(saved, cfg, 10, False, False, Path("w"))
    assert workdir.check_schedule(saved, cfg, 1, False, False, Path("w")) == ""  # epoch 1: lr alike


def test_resumed_config_keeps_the_run_and_takes_what_may_change():
    saved = RunConfig(depth=10, epochs=5, save="old/place", data_dir="data")
    given = config_of("--resume", "--save", "new/place", "--epochs", "7", "--data-dir", "elsewhere",
                  "--lr", "0.1")
    cfg, changes = workdir.resumed_config(saved, *given, Path("new/place"))
    assert changes == {"save": "new/place", "epochs": 7, "data_dir": "elsewhere", "resume": True}
    assert cfg.to_dict() == {**saved.to_dict(), **changes} and cfg.depth == 10  # not the default 100
    with pytest.raises(UserError, match=r"--seed 3 \(the run has 0\) would change the run "
                                        r"in new/place; drop these flags"):
        workdir.resumed_config(saved, *config_of("--resume", "--save", "new/place", "--seed", "3"),
                               Path("new/place"))
