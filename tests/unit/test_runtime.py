"""The process around a run (runtime.py, provenance.py): what it records of the code that
trains it and of a GPU it could not use."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import densenet_trainer
import train
from densenet_trainer import runtime
from densenet_trainer.provenance import code_version
from densenet_trainer.runtime import STOP_SIGNALS, StopFlag, launcher_jobs
from helpers import TINY, run_main, start_run


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


@pytest.fixture
def unusable_h100(monkeypatch):
    """A machine whose driver lists an H100 that torch cannot use (a driver older than its CUDA)."""
    monkeypatch.setattr(runtime, "gpus_listed", lambda: "GPU 0: NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def too_old() -> None:
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12040). "
                           "Please update your GPU driver by downloading it")
    monkeypatch.setattr(torch.cuda, "init", too_old)


def test_device_auto_says_why_a_gpu_goes_unused_and_config_json_records_it(unusable_h100, capsys,
                                                                           tmp_path, cifar_dir):
    out = start_run(capsys, tmp_path / "run", cifar_dir, "--epochs", "1", "--device", "auto")
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warning == [
        f"warning: this machine has a GPU (GPU 0: NVIDIA H100 80GB HBM3) that torch {torch.__version__} "
        f"cannot use: The NVIDIA driver on your system is too old (found version 12040); training on "
        f"the CPU instead, perhaps a hundred times slower. Install "
        + (f"an NVIDIA driver for CUDA {torch.version.cuda} or newer" if torch.version.cuda
           else "torch's CUDA build (README: Set up)") + ", or pass --device cpu to mean it"]
    environment = json.loads((tmp_path / "run" / "config.json").read_text())["environment"]
    assert environment["device"] == "cpu" and "found version 12040" in environment["unused_gpu"]


def test_device_cpu_means_it_and_device_cuda_is_refused_with_the_reason(unusable_h100, capsys,
                                                                        tmp_path, cifar_dir):
    out = start_run(capsys, tmp_path / "run", cifar_dir, "--epochs", "1", "--device", "cpu")
    assert "warning:" not in out
    assert "unused_gpu" not in json.loads((tmp_path / "run" / "config.json").read_text())["environment"]
    status, _, err = run_main(capsys, train.main, "--data-dir", cifar_dir, "--save", tmp_path / "other",
                              *TINY, "--device", "cuda")
    assert status == 2 and err.startswith("error: --device cuda: this machine has a GPU (GPU 0: NVIDIA H100")
    assert err.rstrip().endswith("; use --device cpu")


def test_reading_the_code_version_leaves_the_checkouts_index_as_it_was(tmp_path):
    """git status refreshes a stale index and rewrites it (a user's git sees a file they did
    not touch change); the run's look at its checkout writes nothing there."""
    git(tmp_path, "init", "-q")
    (tmp_path / "model.py").write_text("depth = 100\n")
    git(tmp_path, "add", "model.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    index = tmp_path / ".git" / "index"
    os.utime(tmp_path / "model.py", (1, 1))  # the same content, a stat the index no longer holds
    before = index.read_bytes(), index.stat().st_mtime_ns
    assert code_version(tmp_path)["modified"] is False
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before


def test_a_collective_failing_for_a_lost_peer_is_said_in_one_line(monkeypatch):
    """gloo's error on the survivors of a killed worker (measured on two torchrun agents):
    one line under torchrun; any other error, or outside torchrun, is not taken for it."""
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection "
                        "closed by peer [127.0.0.1]:5509. This is typically caused by a remote worker crashing.")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert runtime.lost_peer(gloo) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert runtime.lost_peer(gloo) == ("another process of this torchrun job is gone (Connection closed by peer "
                                       "[127.0.0.1]:5509. This is typically caused by a remote worker crashing.)")
    assert runtime.lost_peer(RuntimeError("CUDA out of memory")) is None
