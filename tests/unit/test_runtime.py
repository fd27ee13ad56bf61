"""The process around a run (runtime.py): what it records of the code that trains it."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import densenet_trainer
from densenet_trainer import runtime
from densenet_trainer.runtime import STOP_SIGNALS, StopFlag, code_version, launcher_jobs


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_the_code_is_its_commit_and_whether_the_checkout_was_modified(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "model.py").write_text("depth = 100\n")
    git(tmp_path, "add", "model.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    commit = git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked: not a change of the code")
    assert code_version(tmp_path) == {"version": densenet_trainer.__version__, "commit": commit,
                                      "modified": False}
    (tmp_path / "model.py").write_text("depth = 40\n")
    assert code_version(tmp_path)["modified"] is True
    if os.geteuid() == 0:  # a checkout of another owner: git's "dubious ownership" is no reason
        subprocess.run(["chown", "-R", "nobody", str(tmp_path)], check=True)
        assert code_version(tmp_path)["commit"] == commit
    monkeypatch.setenv("PATH", "")  # no git to ask: the version, and why there is no commit
    assert code_version(tmp_path) == {"version": densenet_trainer.__version__,
                                      "commit_unknown": code_version(tmp_path)["commit_unknown"]}
    assert "git" in code_version(tmp_path)["commit_unknown"]


def test_outside_a_checkout_the_version_alone(tmp_path):
    assert code_version(tmp_path) == {"version": densenet_trainer.__version__}


def test_signals_within_two_seconds_of_the_first_are_one_request(monkeypatch):
    """A scheduler's SIGTERM reaches torchrun and its workers together, and torchrun passes
    its own on: a worker's second signal within StopFlag.REPEAT_S is the same request; one
    after it quits at once."""
    kills, clock = [], [100.0]
    monkeypatch.setattr(os, "kill", lambda pid, signum: kills.append(signum))
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        flag = StopFlag()
        flag._request(signal.SIGTERM, None)
        flag._request(signal.SIGTERM, None)
        clock[0] += StopFlag.REPEAT_S - 0.1
        flag._request(signal.SIGINT, None)
        assert (flag.signum, kills) == (signal.SIGTERM, [])
        clock[0] += 0.1
        flag._request(signal.SIGINT, None)
        assert kills == [signal.SIGINT]
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_a_group_of_processes_is_one_job_with_its_highest_restart_and_every_agent():
    """On several nodes each torchrun agent counts its own restarts: the group's is the
    highest, and every agent is kept (a restart is known by any of them)."""
    node_a = {"torchrun": {"id": "job", "restart": 1, "agents": ["a:10:5"]}, "slurm": {"id": "7", "restart": 0}}
    node_b = {"torchrun": {"id": "job", "restart": 0, "agents": ["b:20:6"]}, "slurm": {"id": "7", "restart": 0}}
    assert launcher_jobs([node_b, node_a]) == {
        "torchrun": {"id": "job", "restart": 1, "agents": ["a:10:5", "b:20:6"]},
        "slurm": {"id": "7", "restart": 0}}
    assert launcher_jobs([{}]) == {}
