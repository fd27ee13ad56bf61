"""What a run ran on and which code trained it, for config.json: so that a result can be
traced to its machine and its commit."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

import densenet_trainer
from densenet_trainer.runtime import Runtime


def environment(runtime: Runtime) -> dict:
    """What the run ran on, for config.json."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "host": platform.node(), "device": str(runtime.device),
            "world_size": runtime.world_size, "threads": torch.get_num_threads()}
    if runtime.device.type == "cuda":
        properties = torch.cuda.get_device_properties(runtime.device)
        info.update({"gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    if runtime.unused_gpu:
        info["unused_gpu"] = runtime.unused_gpu
        try:
            info["triton"] = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            info["triton"] = None
    return info


PROJECT_ROOT = Path(densenet_trainer.__file__).resolve().parent.parent


def code_version(root: Path = PROJECT_ROOT) -> dict:
    """Which code trains the run, for config.json: the project's version and, run from a git
    checkout at ``root``, its commit and whether tracked files had changes (``modified``), so
    that a result can be traced to the code that produced it."""
    info = {"version": densenet_trainer.__version__}
    if not (root / ".git").exists():
        return info

    # a checkout of another owner (a shared cluster, a container's mount) too; git status
    # without refreshing the checkout's index, which it would otherwise rewrite
    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-c", "safe.directory=*", "-C", str(root), *args],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    try:
        info.update(commit=git("rev-parse", "HEAD"),
                    modified=bool(git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.SubprocessError) as error:  # no git, or not a repository after all
        stderr = getattr(error, "stderr", None) or str(error)
        info["commit_unknown"] = stderr.strip().splitlines()[0] if stderr.strip() else type(error).__name__
    return info
