"""The process's random number generators (Python's, numpy's, torch's on the CPU and on each
GPU): seeded at a run's start, their state saved in every checkpoint and put back on resume,
so that a resumed run draws what an uninterrupted one would."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def rng_state_problem(state) -> str | None:
    """Why ``state`` is not what rng_state returns (None: it is), found by setting each part
    on a generator of its own, so that the process's own generators stay as they are."""
    try:
        random.Random().setstate(state["python"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.RandomState().set_state((kind, keys.numpy().astype(np.uint32), position,
                                           has_gauss, gauss))
        torch.Generator().set_state(state["torch"])
        if not isinstance(state["cuda"], list) or not all(isinstance(t, torch.Tensor) for t in state["cuda"]):
            return "its CUDA generator states are not a list of tensors"
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as error:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return None
