"""Helpers shared by the bench/ scripts: fresh-process runs, medians, and a table."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def in_fresh_process(script: Path, config: dict, threads: int) -> dict:
    """Run ``script --one CONFIG_JSON`` in a new interpreter and return the JSON it prints last."""
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    import os
    result = subprocess.run([sys.executable, str(script), "--one", json.dumps(config)],
                            capture_output=True, text=True, env={**os.environ, **env_threads})
    if result.returncode:
        raise RuntimeError(f"{config} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    """Median with min-max, the way every figure here is reported."""
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
