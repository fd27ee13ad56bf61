"""Kill training at random moments, resume, and get the run an uninterrupted one gives."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import train
from densenet_trainer.run.checkpoint import Checkpoint
from helpers import ROOT, TINY, interrupt, metrics, on_forward, write_cifar10

# CI runs a few trials; `KILL_TRIALS=20 KILLS_PER_TRIAL=3 pytest tests/behaviour/test_crash.py -s` is the soak.
TRIALS = int(os.environ.get("KILL_TRIALS", "2"))
KILLS_PER_TRIAL = int(os.environ.get("KILLS_PER_TRIAL", "2"))


# Dropout makes the torch RNG matter; 5 steps per epoch make saves a large share of the time.
RUN = ["--epochs", "5", "--dropout", "0.1"]


def killable_run(data_dir: Path) -> list[str]:
    return [*TINY, *RUN, "--data-dir", str(data_dir)]


@pytest.fixture(scope="module")
def reference(finished) -> Path:
    """The same run, uninterrupted."""
    return finished(*RUN)


def kill_moments(rng: random.Random, first: bool) -> tuple[str, int]:
    """An event to kill at: what the run shows of itself, never a timer.

    ``first``: the first attempt of a fresh run, which must not finish before its kill, so
    its events leave two or more epochs to train. Later attempts (resumes) may finish first.
    """
    return rng.choice(["config", "rows", "checkpoint", "line"]), rng.randint(1, 3 if first else 5)


def reached(kind: str, count: int, work: Path, lines: list[str], started_inode: int | None) -> bool:
    if kind == "config":  # written at the start of training (at once when resuming)
        return (work / "config.json").exists()
    if kind == "rows":  # appended at the end of an epoch, before its checkpoint
        try:
            return len((work / "train.csv").read_text().splitlines()) > count
        except FileNotFoundError:
            return False
    if kind == "checkpoint":  # a new checkpoint replaced the one there was at the start
        try:
            return (work / "checkpoint.pt").stat().st_ino != started_inode
        except FileNotFoundError:
            return False
    return any(line.startswith(f"epoch {count}/") for line in lines)  # printed after the save


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path, cifar_dir, reference):
    """Each attempt is killed the moment the run shows a random event (config written, a row
    appended, a checkpoint replaced, an epoch printed), plus up to 50 ms: start-up, steps,
    evaluation, CSV appends and checkpoints all get hit; then the run is resumed to the end."""
    rng = random.Random(20170707)
    kills = 0
    for trial in range(TRIALS):
        work = tmp_path / f"trial{trial}"
        start = [sys.executable, str(ROOT / "train.py"), "--save", str(work), *killable_run(cifar_dir)]
        resume = [sys.executable, str(ROOT / "train.py"), "--resume", "--save", str(work),
                  "--data-dir", str(cifar_dir)]
        for attempt in range(KILLS_PER_TRIAL):
            # as a user would: resume once the run has written its config, else start again
            fresh = not (work / "config.json").exists()
            kind, count = kill_moments(rng, first=attempt == 0)
            checkpoint = work / "checkpoint.pt"
            started_inode = checkpoint.stat().st_ino if checkpoint.exists() else None
            process = subprocess.Popen(start if fresh else resume, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            lines: list[str] = []
            reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
            reader.start()
            while process.poll() is None and not reached(kind, count, work, lines, started_inode):
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
            killed = process.poll() is None
            if killed:
                process.kill()
                kills += 1
            assert killed or attempt, f"trial {trial}: the run ended before the event {kind} {count}"
            process.wait()
            reader.join()
            stderr = process.stderr.read()
            process.stderr.close()
            if process.returncode == 0:
                break
            assert process.returncode == -signal.SIGKILL, stderr
        command = resume if (work / "config.json").exists() else start
        assert train.main(command[2:]) == 0  # the last resume in this process: the same code
        assert metrics(work) == metrics(reference), f"trial {trial}"
        assert not list(work.glob(".*")), "a temporary or lock file was left behind"
    print(f"\n{TRIALS} of {TRIALS} trials resumed exactly after {kills} SIGKILLs")


@pytest.mark.slow
def test_sigint_then_sigterm_save_and_resume_exactly(tmp_path, cifar_dir, reference):
    work = tmp_path / "run"
    train_py = [sys.executable, str(ROOT / "train.py")]
    stopped = interrupt([*train_py, "--save", str(work), *killable_run(cifar_dir)], "epoch 2/5", signal.SIGINT)
    assert "stopped by SIGINT in epoch" in stopped, stopped
    assert f"Resume with: {ROOT / 'train.py'} --resume --save {work}" in stopped
    resume = [*train_py, "--resume", "--save", str(work), "--data-dir", str(cifar_dir)]
    # the first epoch the resumed run finishes: where the first stop landed decides which
    stopped = interrupt(resume, "epoch ", signal.SIGTERM)
    assert "stopped by SIGTERM in epoch" in stopped, stopped
    assert train.main(resume[2:]) == 0
    assert metrics(work) == metrics(reference)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
def test_stop_in_the_middle_of_an_epoch_resumes_exactly(tmp_path, cifar_dir, reference, capsys, signum):
    """A stop signal (Ctrl-C, kill, a closed terminal, SLURM's warning before its time limit)
    that arrives during the 7th step (epoch 2, step 2 of 5) saves a mid-epoch checkpoint at the
    end of that step and says how to resume; the resumed run is the uninterrupted one."""

    def interrupt_in_step_7(count, model, output):
        if count == 7:
            signal.raise_signal(signum)

    work = tmp_path / "run"
    with on_forward(interrupt_in_step_7, training=True):
        status = train.main(["--save", str(work), *killable_run(cifar_dir)])
    assert status == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} in epoch 2 after step 2; saved. Resume with:" \
        in capsys.readouterr().err
    assert len(metrics(work)[0]) == 1
    state = Checkpoint.load(work / "checkpoint.pt").state
    assert (state["epoch"], state["progress"]["step"]) == (1, 2)
    assert train.main(["--resume", "--save", str(work), "--data-dir", str(cifar_dir)]) == 0
    assert metrics(work) == metrics(reference)


def test_a_signal_as_the_last_epoch_ends_leaves_a_finished_run(tmp_path, cifar_dir, capsys):
    """A stop signal during the last epoch's evaluation: the run is whole and saved, so it
    ends as a finished run (exit 0, its "done" line) and says the signal came, rather than
    asking to resume a run with nothing left to train."""
    def stop_in_the_last_evaluation(count, model, output):
        signal.raise_signal(signal.SIGTERM)

    work = tmp_path / "run"
    flags = ["--save", str(work), "--data-dir", str(cifar_dir), *TINY, "--epochs", "1"]
    with on_forward(stop_in_the_last_evaluation, training=False):
        status = train.main(flags)
    out = capsys.readouterr().out
    assert status == 0 and "(SIGTERM arrived as the last epoch ended: the run is finished and saved)" in out
    assert "done: final test error" in out and len(metrics(work)[0]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_start_up_says_so_and_leaves_nothing(tmp_path, signum):
    """train.py stopped while it builds its run (a $CC that waits on a FIFO stands for a slow
    compiler of the fused kernels: the signal comes once it is waiting, never on a timer): one
    line, exit 128 + N, and no work directory."""
    fifo, started = tmp_path / "compiler-waits", tmp_path / "compiler-started"
    os.mkfifo(fifo)
    compiler = tmp_path / "slow-cc"
    compiler.write_text(f'#!/bin/sh\n: > "{started}"\nexec cat "{fifo}" > /dev/null\n')
    compiler.chmod(0o755)
    work = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data-dir",
                                str(write_cifar10(tmp_path / "data")), "--save", str(work), *TINY],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "CC": str(compiler)})
    try:
        deadline = time.monotonic() + 120
        while not started.exists():  # the compiler runs: train.py waits for it
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        os.close(os.open(fifo, os.O_RDWR))  # lets the waiting compiler end
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == (f"interrupted by {signal.Signals(signum).name} before "
                                            f"training started; nothing was saved")
    assert not work.exists()


@pytest.mark.slow
def test_a_closed_output_never_stops_the_run(tmp_path, cifar_dir, reference):
    """`./train.py ... | head -4`: the reader goes away after the first lines; the run goes on
    to its end, exit 0, and its CSVs are the uninterrupted run's."""
    work = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--save", str(work),
                                *killable_run(cifar_dir)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(4):
            process.stdout.readline()
        process.stdout.close()  # as head does after its 4 lines
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert metrics(work) == metrics(reference)
