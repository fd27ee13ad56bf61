"""Helpers shared by the bench/ scripts: fresh-process runs, medians, and a table."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def in_fresh_process(script: Path, config: dict, threads: int) -> dict:
    """Run ``script --one CONFIG_JSON`` in a new interpreter and return the JSON it prints last."""
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, str(script), "--one", json.dumps(config)],
                            capture_output=True, text=True, env={**os.environ, **env_threads})
    if result.returncode:
        from densenet_trainer.config.cli import UserError
        last = next((line.strip() for line in reversed(result.stderr.splitlines()) if line.strip()),
                    f"exit status {result.returncode}")
        raise UserError(f"the measuring process for {json.dumps(config)} failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_settings(text: str, like: dict, choices: dict[str, tuple] | None = None) -> dict:
    """The settings a bench script hands a fresh process of its own (``--one``), checked
    against the ones it would hand (``like``: the same names, values of the same types,
    numbers no smaller than 1 where ``like``'s are positive, and for the names in ``choices``
    one of those), so that a hand-written --one is refused in one line instead of failing
    somewhere in the measurement."""
    from densenet_trainer.config.cli import UserError
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        settings = None
    fits = (isinstance(settings, dict) and set(settings) == set(like) and all(
        type(settings[name]) is type(value) for name, value in like.items()) and all(
        settings[name] in allowed for name, allowed in (choices or {}).items()) and all(
        settings[name] >= min(value, 1) for name, value in like.items() if type(value) is int))
    if not fits:
        raise UserError(f"--one is internal: it takes the JSON settings the script hands its own "
                        f"processes, such as {json.dumps(like)}; run the script without it")
    return settings


def add_device_flag(parser) -> None:
    """--device, defaulting to a GPU when there is one; cuda without one is refused in one line."""
    import torch

    def device(text: str) -> str:
        if text not in ("cpu", "cuda"):
            raise argparse.ArgumentTypeError(f"must be cpu or cuda, got {text!r}")
        if text == "cuda" and not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("no CUDA GPU is visible; use --device cpu")
        return text

    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (a GPU when there is one)")


def synthetic_run(cfg, device, steps: int, model=None):
    """train.py's run of ``cfg`` on random images in one process on ``device``, with cuDNN
    choosing its algorithms as train.py has it (build.build_synthetic_run)."""
    import torch

    from densenet_trainer.run.build import build_synthetic_run
    from densenet_trainer.runtime import Runtime
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return build_synthetic_run(cfg, Runtime.alone(device), steps, model)


def spread(values: list[float]) -> str:
    """Median with min-max, the way every figure here is reported."""
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def reset_peak(device) -> int:
    """Start a new peak measurement; returns the memory in use now, in bytes."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident size
        f.write("5")
    return _proc_status("VmRSS")


def peak_since(base: int, device) -> int:
    """Peak memory above ``base`` since ``reset_peak``, in bytes."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return _proc_status("VmHWM") - base


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
