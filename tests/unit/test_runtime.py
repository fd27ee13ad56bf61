"""The process around a run (runtime.py): what it records of the code that trains it."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import densenet_trainer
from densenet_trainer.engine.runtime import code_version


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
