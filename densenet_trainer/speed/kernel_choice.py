"""Which DenseNet kernels a run computes with ("fused", "fused-gemm" or "aten"), and why: --kernels
auto on a GPU times a few steps of each (``time_steps``) and takes the fastest, as cudnn.benchmark
chooses convolutions; a candidate that fails (an exception, a graph that would not capture or
replayed wrong) loses, saying why; everywhere the fused kernels are used only once they have
passed their self-test (speed/kernel_check.py), and then the run's own model on its own first
batches (``confirm_on_model``). config.json records the choice, its timings, the candidates'
problems and what the choice cost.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from densenet_trainer.config.cli import UserError, first_line
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.loop.training import COMPUTE_DTYPES
from densenet_trainer.random_state import rng_state, set_rng_state
from densenet_trainer.runtime import Runtime, all_sum, broadcast, synchronize
from densenet_trainer.speed import cuda_graph, fused, fused_densenet, fused_gemm, kernel_check

FUSED = ("fused", "fused-gemm")  # the kernel sets that fused_densenet's modules compute


@dataclass
class KernelChoice:
    """The DenseNet kernels a run computes with, why, and the timings that chose them."""
    kernels: str  # one of run_config.KERNELS
    why: str
    ms_per_step: dict[str, float] | None = None
    problems: dict[str, str] | None = None  # the candidates that could not run, and why
    seconds: float | None = None  # what timing the candidates cost, start-up included

    def record(self) -> dict:
        """What config.json says of it."""
        return {"kernels": self.kernels, "why": self.why,
                **({"ms_per_step": self.ms_per_step} if self.ms_per_step else {}),
                **({"problems": self.problems} if self.problems else {}),
                **({"seconds": self.seconds} if self.seconds is not None else {})}


AUTOTUNE_WARMUP = 3  # untimed steps first, in every mode: cuDNN's benchmarking, Triton's compiles
AUTOTUNE_STEPS = 5  # timed steps a repeat
AUTOTUNE_REPEATS = 3  # the fastest repeat stands: the others met more of the machine's noise


class CandidateFailed(Exception):
    """A kernel set's steps ran, but not as the run would run them (its graph fell back)."""


def choose_kernels(cfg: RunConfig, runtime: Runtime, log: Callable[..., None] = print,
                   saved: dict | None = None,
                   measure: Callable[[str], float] | None = None) -> KernelChoice:
    """The DenseNet kernels the run computes with.

    --kernels auto on a GPU times AUTOTUNE_STEPS steps of each kernel set that can run the
    configuration (``measure``: seconds per step, as ``time_steps`` gives them) and takes the
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
        started = time.perf_counter()
        seconds, problems = {}, {}
        for kernels in ("aten", "fused") + (() if _gemm_problem(cfg, device, log) else ("fused-gemm",)):
            try:
                seconds[kernels] = measure(kernels)
            except Exception as error:  # Triton, out of memory, a graph that fell back: it loses
                problems[kernels] = first_line(error)
            finally:  # each candidate's memory back before the next and before the run
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        fastest = min(seconds, key=seconds.get) if seconds else "aten"  # the run meets aten's failure itself
        if runtime.world_size > 1:  # every process computes alike: rank 0's timings decide
            fastest = broadcast(fastest, runtime)
        ms = {kernels: round(1e3 * s, 3) for kernels, s in seconds.items()}
        spent = round(time.perf_counter() - started, 3)
        runtime.log(f"--kernels auto: {fastest} ("
                    + ", ".join([f"{k} {v:.2f} ms" for k, v in ms.items()] +
                                [f"{k} failed: {why}" for k, why in problems.items()])
                    + f" per step{', on rank 0' if runtime.world_size > 1 else ''}); choosing took "
                      f"{spent:.1f} s")
        why = (f"auto: the fastest of the best of {AUTOTUNE_REPEATS} repeats of {AUTOTUNE_STEPS} "
               f"timed steps each, after {AUTOTUNE_WARMUP} untimed")
        return KernelChoice(fastest, why, ms or None, problems or None, spent)
    kernels = cfg.kernels_on(device.type)
    why = f"--kernels {cfg.kernels} on {device.type}"
    if kernels in FUSED:
        problem = _fused_problem(cfg, device, log)
        if problem:
            return KernelChoice("aten", f"{why}, but {problem}")
    if kernels == "fused-gemm":
        problem = _gemm_problem(cfg, device, log)
        if problem:
            log(f"notice: --kernels fused-gemm computes as --kernels fused here: {problem}")
            return KernelChoice("fused", f"{why}, but {problem}")
    return KernelChoice(kernels, why)


def _gemm_problem(cfg: RunConfig, device: torch.device, log: Callable[..., None]) -> str | None:
    """Why fused-gemm would compute this run as fused does (None: it would not); a failed
    self-test is also said at once, as a warning."""
    if not cfg.bottleneck:
        return "the GEMMs are DenseNet-BC's 1x1 convolutions, and this DenseNet has none"
    return fused_gemm.unavailable(device.type) or _said(
        kernel_check.gemm_failure(device.type), "GEMM", device, log, "the run's 1x1 convolutions are cuDNN's instead")


def _said(failure: str | None, kernels: str, device: torch.device, log: Callable[..., None],
          instead: str) -> str | None:
    """A failed self-test of the ``kernels`` kernels, said at once as a warning, and returned
    as the problem a choice records (None where ``failure`` is None)."""
    if failure is None:
        return None
    log(f"warning: the {kernels} kernels failed their self-test on {device.type} ({failure}); {instead}")
    return f"the {kernels} kernels failed their self-test ({failure})"


def _fused_problem(cfg: RunConfig, device: torch.device, log: Callable[..., None]) -> str | None:
    """Why the fused kernels cannot compute this run on ``device`` (None: they can); a
    failed self-test is also said at once, as a warning."""
    kernels = fused.backend(device.type)
    if kernels is None:
        return "the fused kernels are unavailable here"
    dtype = COMPUTE_DTYPES[cfg.precision] or torch.float32
    if dtype not in kernels.DTYPES:
        return f"the fused kernels do not compute in {cfg.precision}"
    return _said(kernel_check.failure(device.type), "fused", device, log,
                 "the run computes with ATen's kernels instead: the same function, slower")


def confirm_on_model(choice: KernelChoice, model: torch.nn.Module, images: torch.Tensor,
                     labels: torch.Tensor, eval_images: torch.Tensor, precision: str,
                     runtime: Runtime, log: Callable[..., None] = print) -> KernelChoice:
    """``choice``, once the fused ``model`` has computed the run's first batches as ATen's
    does (kernel_check.model_failure); otherwise the model is put back on ATen's operations,
    with one warning naming the worst tensor, and the choice says why. Every process's
    model must pass: they compute alike."""
    if choice.kernels not in FUSED or not fused_densenet.is_fused(model):
        return choice
    problem = kernel_check.model_failure(model, images, labels, eval_images, precision)
    failed = all_sum([float(problem is not None)], runtime)[0]
    if not failed:
        return choice
    problem = problem or "another process's model failed it"
    fallback = "fused" if choice.kernels == "fused-gemm" else "aten"  # the next best, checked in turn
    log(f"warning: the {choice.kernels} kernels computed this run's model otherwise than ATen's "
        f"({problem}); the run computes with the {fallback} kernels instead: the same function, slower")
    fused_densenet.fuse(model) if fallback == "fused" else fused_densenet.unfuse(model)
    return confirm_on_model(dataclasses.replace(choice, kernels=fallback, why=f"{choice.why}, but the run's own "
                                                f"self-test failed: {problem}"), model, images, labels,
                            eval_images, precision, runtime, log)


def time_steps(build_synthetic_run: Callable, cfg: RunConfig, runtime: Runtime,
               kernels: str) -> float:
    """Seconds per step of ``cfg``'s training computing with ``kernels``, stepped as the run
    will be (its graph captured and checked) on random images that ``build_synthetic_run``
    gives it (build.py's, which calls choose_kernels before it builds), by one process alone: after
    AUTOTUNE_WARMUP untimed steps, the fastest of AUTOTUNE_REPEATS repeats of AUTOTUNE_STEPS
    (CUDA events on a GPU). CandidateFailed where the graph the run would use fell back. The
    global random generators are left as they were: the run seeds them after this."""
    alone = Runtime(runtime.device, capture=runtime.capture)
    state = rng_state()
    try:
        run = build_synthetic_run(dataclasses.replace(cfg, kernels=kernels), alone,
                                  AUTOTUNE_WARMUP + AUTOTUNE_REPEATS * AUTOTUNE_STEPS,
                                  log=lambda *args, **kwargs: None)
        if isinstance(run.run_step, cuda_graph.GraphedStep) and not run.run_step.checked:
            raise CandidateFailed(run.run_step.status)
        for _ in range(AUTOTUNE_WARMUP):
            run.run_step()
        return min(seconds_per_step(run.run_step, runtime.device) for _ in range(AUTOTUNE_REPEATS))
    finally:
        set_rng_state(state)


def seconds_per_step(run_step: Callable[[], None], device: torch.device) -> float:
    """The time of AUTOTUNE_STEPS calls of ``run_step``, a step's share: between CUDA events
    on a GPU (the device's time, no host sync inside), by the clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(AUTOTUNE_STEPS):
            run_step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / AUTOTUNE_STEPS
    synchronize(device)
    began = time.perf_counter()
    for _ in range(AUTOTUNE_STEPS):
        run_step()
    return (time.perf_counter() - began) / AUTOTUNE_STEPS
