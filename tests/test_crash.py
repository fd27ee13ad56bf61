"""Kill training at random moments, resume, and get the run an uninterrupted one gives."""
from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, run_cli

# CI runs a few trials; `KILL_TRIALS=20 pytest tests/test_crash.py -s` runs the full soak.
TRIALS = int(os.environ.get("KILL_TRIALS", "2"))
KILLS_PER_TRIAL = 3


def flags(data_dir: Path) -> list[str]:
    # Dropout makes the torch RNG matter; 5 steps per epoch make saves a large share of the time.
    return [*TINY, "--epochs", "5", "--dropout", "0.1", "--data-dir", str(data_dir)]


def epochs_and_metrics(work: Path) -> tuple[list, list]:
    with open(work / "train.csv") as f:
        train = [(r["epoch"], r["lr"], r["loss"], r["error"]) for r in csv.DictReader(f)]
    with open(work / "test.csv") as f:
        test = [(r["epoch"], r["loss"], r["error"]) for r in csv.DictReader(f)]
    return train, test


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cifar_dir) -> tuple[Path, float]:
    """An uninterrupted run, and how long it took from start to exit."""
    work = tmp_path_factory.mktemp("reference") / "run"
    start = time.monotonic()
    result = run_cli("train.py", "--save", work, *flags(cifar_dir))
    assert result.returncode == 0, result.stderr
    return work, time.monotonic() - start


def test_sigkill_at_random_moments(tmp_path, cifar_dir, reference):
    reference_dir, duration = reference
    rng = random.Random(20170707)
    kills = 0
    for trial in range(TRIALS):
        work = tmp_path / f"trial{trial}"
        start = [sys.executable, str(ROOT / "train.py"), "--save", str(work), *flags(cifar_dir)]
        resume = [sys.executable, str(ROOT / "train.py"), "--resume", "--save", str(work),
                  "--data-dir", str(cifar_dir)]
        for _ in range(KILLS_PER_TRIAL):
            # as a user would: resume once the run has written its config, else start again
            command = resume if (work / "config.json").exists() else start
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
            try:  # anywhere in the run: start-up, steps, evaluation, CSV appends, checkpoints
                process.wait(timeout=rng.uniform(0.2, 1.0) * duration)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                kills += 1
            else:
                assert process.returncode == 0, process.stderr.read()
                break
            finally:
                process.stderr.close()
        command = resume if (work / "config.json").exists() else start
        final = subprocess.run(command, capture_output=True, text=True)
        assert final.returncode == 0, final.stderr
        assert epochs_and_metrics(work) == epochs_and_metrics(reference_dir), f"trial {trial}"
    print(f"\n{TRIALS} of {TRIALS} trials resumed exactly after {kills} SIGKILLs")
    assert kills >= TRIALS  # the delays are drawn so that most attempts are killed


def interrupt(command: list[str], after: str, signum: int) -> str:
    """Run ``command``, send ``signum`` once a stdout line starts with ``after``; return stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith(after):
            process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr
    return stderr


def test_sigint_then_sigterm_save_and_resume_exactly(tmp_path, cifar_dir, reference):
    work = tmp_path / "run"
    train_py = [sys.executable, str(ROOT / "train.py")]
    stopped = interrupt([*train_py, "--save", str(work), *flags(cifar_dir)], "epoch 2/5", signal.SIGINT)
    assert "stopped by SIGINT in epoch" in stopped, stopped
    assert f"Resume with: {ROOT / 'train.py'} --resume --save {work}" in stopped
    resume = [*train_py, "--resume", "--save", str(work), "--data-dir", str(cifar_dir)]
    # the first epoch the resumed run finishes: where the first stop landed decides which
    stopped = interrupt(resume, "epoch ", signal.SIGTERM)
    assert "stopped by SIGTERM in epoch" in stopped, stopped
    resumed = subprocess.run(resume, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert epochs_and_metrics(work) == epochs_and_metrics(reference[0])


def test_stop_in_the_middle_of_an_epoch_resumes_exactly(tmp_path, cifar_dir, reference, monkeypatch):
    """A stop request after the 7th step (epoch 2, step 2 of 5) saves a mid-epoch checkpoint."""
    import train
    calls = []

    def requested(self, runtime):
        calls.append(1)
        self.agreed = signal.SIGINT if len(calls) == 7 else 0
        return self.agreed

    monkeypatch.setattr(train.StopFlag, "requested", requested)
    work = tmp_path / "run"
    status = train.main(["--save", str(work), *flags(cifar_dir)])
    assert status == 128 + signal.SIGINT
    assert len(epochs_and_metrics(work)[0]) == 1
    state = train.load_checkpoint(work / "checkpoint.pt")
    assert (state["epoch"], state["progress"]["step"]) == (1, 2)
    monkeypatch.undo()
    assert train.main(["--resume", "--save", str(work), "--data-dir", str(cifar_dir)]) == 0
    assert epochs_and_metrics(work) == epochs_and_metrics(reference[0])
