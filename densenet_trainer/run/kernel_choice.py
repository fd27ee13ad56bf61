"""Which DenseNet kernels a run computes with ("fused" or "aten"), and why: --kernels auto on
a GPU times a few steps of each (``time_steps``) and takes the faster, as cudnn.benchmark
chooses convolutions; everywhere the fused kernels are used only once they have passed their
self-test (kernels/kernel_check.py). config.json records the choice and its timings.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from densenet_trainer.engine.runtime import Runtime, broadcast, rng_state, set_rng_state, synchronize
from densenet_trainer.engine.step import COMPUTE_DTYPES
from densenet_trainer.kernels import fused, kernel_check
from densenet_trainer.settings.cli import UserError
from densenet_trainer.settings.config import RunConfig


@dataclass
class KernelChoice:
    """The DenseNet kernels a run computes with, why, and the timings that chose them."""
    kernels: str  # "fused" or "aten"
    why: str
    ms_per_step: dict[str, float] | None = None

    def record(self) -> dict:
        """What config.json says of it."""
        return {"kernels": self.kernels, "why": self.why,
                **({"ms_per_step": self.ms_per_step} if self.ms_per_step else {})}


AUTOTUNE_STEPS = 5  # timed steps per kernel set, after the warm-up and the graph's capture


def choose_kernels(cfg: RunConfig, runtime: Runtime, log: Callable[..., None] = print,
                   saved: dict | None = None,
                   measure: Callable[[str], float] | None = None) -> KernelChoice:
    """The DenseNet kernels the run computes with.

    --kernels auto on a GPU times AUTOTUNE_STEPS steps of each kernel set that can run the
    configuration (``measure``: seconds per step; by default ``time_steps``) and takes the
    fastest, as cudnn.benchmark chooses convolutions; a resumed run keeps the choice it
    ``saved``. Elsewhere --kernels means what RunConfig.kernels_on says. Fused kernels are
    used only once they have passed their self-test on the device (kernel_check), and never
    under SyncBatchNorm, whose statistics they would not synchronise over the processes.
    """
    device = runtime.device
    if cfg.sync_bn and runtime.world_size > 1:
        if cfg.kernels == "fused":
            raise UserError("--kernels fused normalises with each process's own batch statistics, "
                            "not --sync-bn's; use --kernels aten (or auto) with --sync-bn")
        return KernelChoice("aten", "--sync-bn: the fused kernels do not synchronise BatchNorm")
    if cfg.kernels == "auto" and device.type == "cuda":
        if saved and saved.get("device_type") == device.type:
            return KernelChoice(saved["kernels"], "auto, kept from the run's first start")
        problem = _fused_problem(cfg, device, log)
        if problem:
            return KernelChoice("aten", f"auto: {problem}")
        seconds = {kernels: (measure or functools.partial(time_steps, cfg, runtime))(kernels)
                   for kernels in ("aten", "fused")}
        fastest = min(seconds, key=seconds.get)
        if runtime.world_size > 1:  # every process computes alike: rank 0's timings decide
            fastest = broadcast(fastest, runtime)
        ms = {kernels: round(1e3 * s, 3) for kernels, s in seconds.items()}
        runtime.log(f"--kernels auto: {fastest} ({', '.join(f'{k} {v:.2f} ms' for k, v in ms.items())} "
                    f"per step{', on rank 0' if runtime.world_size > 1 else ''})")
        return KernelChoice(fastest, f"auto: the faster over {AUTOTUNE_STEPS} timed steps each", ms)
    kernels = cfg.kernels_on(device.type)
    why = f"--kernels {cfg.kernels} on {device.type}"
    if kernels == "fused":
        problem = _fused_problem(cfg, device, log)
        if problem:
            return KernelChoice("aten", f"{why}, but {problem}")
    return KernelChoice(kernels, why)


def _fused_problem(cfg: RunConfig, device: torch.device, log: Callable[..., None]) -> str | None:
    """Why the fused kernels cannot compute this run on ``device`` (None: they can); a
    failed self-test is also said at once, as a warning."""
    kernels = fused.backend(device.type)
    if kernels is None:
        return "the fused kernels are unavailable here"
    dtype = COMPUTE_DTYPES[cfg.precision] or torch.float32
    if dtype not in kernels.DTYPES:
        return f"the fused kernels do not compute in {cfg.precision}"
    failure = kernel_check.failure(device.type)
    if failure:
        log(f"warning: the fused kernels failed their self-test on {device.type} ({failure}); "
            f"the run computes with ATen's kernels instead: the same results, slower")
        return f"the fused kernels failed their self-test ({failure})"
    return None


def time_steps(cfg: RunConfig, runtime: Runtime, kernels: str) -> float:
    """Seconds per step of ``cfg``'s training computing with ``kernels``, stepped as the run
    will be (its graph included) on random images, by one process alone. The global random
    generators are left as they were: the run seeds them after this."""
    from densenet_trainer.run.build import build_synthetic_run  # build chooses the kernels first

    alone = Runtime(runtime.device, capture=runtime.capture)
    state = rng_state()
    try:
        run = build_synthetic_run(dataclasses.replace(cfg, kernels=kernels), alone,
                                  AUTOTUNE_STEPS, log=lambda *args, **kwargs: None)
        synchronize(runtime.device)
        start = time.perf_counter()
        for _ in range(AUTOTUNE_STEPS):
            run.run_step()
        synchronize(runtime.device)
        return (time.perf_counter() - start) / AUTOTUNE_STEPS
    finally:
        set_rng_state(state)
