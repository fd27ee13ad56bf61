"""The training step as one CUDA graph, and the checks that let a graph be trusted.

On a GPU the whole step (loop.TrainStep, about 1,700 kernels for DenseNet-BC-100) is
captured once and replayed: one launch instead of the CPU launching each kernel. What
cannot be captured is known from the configuration and never tried (``uncapturable``); a
capture that fails anyway leaves the run eager. The first replay is compared with an eager
step from the same state (``replay_mismatch``), so a graph that captured but replays the
wrong thing is dropped before it trains; loop.check_epoch then checks every epoch.
Evaluation's batches are replays of a graph too (``GraphedEvaluation``), checked alike.
The CPU runs both eagerly; tests give ``GraphedStep`` and ``GraphedEvaluation`` stand-in
captures.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from torch import Tensor

from densenet_trainer.config.cli import first_line
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.data import loader
from densenet_trainer.loop.evaluation import EagerEvaluation, EvaluationSums
from densenet_trainer.loop.training import TrainStep
from densenet_trainer.random_state import rng_state, set_rng_state
from densenet_trainer.runtime import Runtime, capture_cuda_graph


class GraphedStep:
    """``step`` as one CUDA graph: run eagerly for WARMUP calls, then captured, checked and
    replayed.

    The warm-up calls are real training steps, run on a side stream as PyTorch's CUDA-graph
    notes ask (cuDNN's benchmarking, the optimiser's state and the allocator settle there), so
    the model, BatchNorm buffers and optimiser are exactly what the eager steps leave. Capture
    records without running anything; that call's step then runs eagerly. The next call checks
    the graph before trusting it: from one state it replays the graph, then restores that state
    and runs the step eagerly; the two must agree (``replay_mismatch``), and the run goes on
    from the eager result. If capture fails (an operation that cannot be captured, a driver or
    memory limit) or the replay disagrees, training goes on eagerly, after ``notice`` says why.
    ``status`` says which, for config.json.
    """

    WARMUP = 3
    CALLS_BEFORE_REPLAYS = WARMUP + 2  # warm-up, capture (and an eager step), the checked replay

    def __init__(self, step: TrainStep, notice: Callable[[str], None],
                 capture: Callable = capture_cuda_graph) -> None:
        self.step, self.notice, self.capture = step, notice, capture
        self.cuda = step.batches.device.type == "cuda"
        self.replay: Callable[[], None] | None = None
        self.eager, self.warmed, self.checked = False, 0, False
        self.side: torch.cuda.Stream | None = None  # one for every warm-up step: one cache
        self.status = "graphed (not captured yet)"
        self.capture_seconds = 0.0

    def __call__(self) -> None:
        if self.checked:
            self.replay()
        elif self.eager:
            self.step()
        elif self.warmed < self.WARMUP:
            self.warmed += 1
            self._on_side_stream()
        elif self.replay is None:
            began = time.perf_counter()
            try:
                self.replay = self.capture(self.step)
            except Exception as error:  # any failure: CUDA, an uncapturable op, memory
                self._fall_back(error)
            self.capture_seconds = time.perf_counter() - began
            self.step()
        else:
            self._checked_replay()

    def _on_side_stream(self) -> None:
        if self.cuda and self.side is None:
            self.side = torch.cuda.Stream()
        on_side_stream(self.side, self.step)

    def _checked_replay(self) -> None:
        """One replay and one eager step from the same state; the eager one's result stays."""
        state = self.step.state()
        tensors = [t for kind in state.values() for t in kind]
        before = [t.detach().clone() for t in tensors]
        rng = rng_state()
        self.replay()
        replayed = [t.detach().clone() for t in tensors]
        parameters = [p for group in self.step.optimizer.param_groups for p in group["params"]]
        graph_grads = [p.grad for p in parameters]  # where every replay leaves the gradients
        with torch.no_grad():
            for tensor, value in zip(tensors, before):
                tensor.copy_(value)
        set_rng_state(rng)
        self.step()
        mismatch = replay_mismatch(state, before, replayed)
        if not mismatch:  # p.grad is the graph's again, holding this (eager) step's gradients
            with torch.no_grad():
                for parameter, graph_grad in zip(parameters, graph_grads):
                    if graph_grad is not None and parameter.grad is not None:
                        graph_grad.copy_(parameter.grad)
                    parameter.grad = graph_grad
        if mismatch:
            self.replay, self.eager = None, True
            self.status = f"eager: the graph's first replay disagreed with an eager step ({mismatch})"
            self.notice(f"notice: the CUDA graph's first replay disagreed with an eager step from "
                        f"the same state ({mismatch}); training goes on eagerly from the eager "
                        f"step's result, slower")
        else:
            self.checked = True
            self.status = (f"graphed (captured in {self.capture_seconds:.2f} s; its first replay "
                           f"matched an eager step)")

    def _fall_back(self, error: Exception) -> None:
        """Undo what the failed capture left on the Python side; nothing ran on the device."""
        self.eager, self.replay = True, None
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients allocated by the capture
        if self.step.scaler is not None:
            self.step.scaler._per_optimizer_states.clear()  # its per-step bookkeeping
        if self.cuda:
            torch.cuda.synchronize()
        reason = first_line(error)
        self.status = f"eager: the capture failed ({reason})"
        self.notice(f"notice: the training step could not be captured as a CUDA graph "
                    f"({reason}); training goes on eagerly, with the same kernels, slower")


def on_side_stream(side: torch.cuda.Stream | None, work: Callable[[], object]) -> None:
    """``work()`` on the stream ``side`` (None: where it is, on the CPU), after and before
    the current stream's work: PyTorch's CUDA-graph notes warm up there before a capture."""
    if side is None:
        work()
        return
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        work()
    torch.cuda.current_stream().wait_stream(side)


class GraphedEvaluation:
    """An evaluation's batches as replays of one CUDA graph, which evaluates batch ``index``
    (a device tensor: data.EvalBatches.batch) into ``sums`` and moves ``index`` on.

    The first evaluation runs batch 0 eagerly on a side stream (cuDNN's benchmarking and the
    allocator settle there), captures the next batch's work, then checks the graph: it
    replays batch 0, whose logits must match the eager ones within REPLAY_RTOL (a graph that
    replays another batch, or computes something else, does not), and the sums are put back
    so that batch 0 counts once; every evaluation then checks that each image counted once
    (evaluation.read_evaluation). A capture that fails or a replay that disagrees leaves
    evaluation eager, after ``notice`` says why; ``status`` says which. The graph keeps one
    batch's activations in a memory pool for the run, which every split's graph shares
    (``evaluation_runner``): they never replay at once, and keep nothing there between replays.
    """

    def __init__(self, sums: EvaluationSums, batches: loader.EvalBatches, notice: Callable[[str], None],
                 capture: Callable = capture_cuda_graph) -> None:
        self.sums, self.batches, self.notice, self.capture = sums, batches, notice, capture
        self.cuda = batches.numbers.device.type == "cuda"
        self.index = torch.zeros(1, dtype=torch.int64, device=batches.numbers.device)
        self.replay: Callable[[], None] | None = None
        self.logits: Tensor | None = None  # the last batch's, the graph's own after capture
        self.eager = False
        self.status = "graphed (not captured yet)"

    def _batch(self) -> None:
        self.logits = self.sums.add(*self.batches.batch(self.index))
        self.index += 1

    def __call__(self) -> None:
        self.sums.zero()
        self.index.zero_()
        done = 0
        if self.replay is None and not self.eager:
            self._capture_checked()
            done = 1
        each = self._batch if self.eager else self.replay
        for _ in range(done, self.batches.steps):
            each()

    def _capture_checked(self) -> None:
        """Batch 0 eagerly, the capture, and the check of its first replay: batch 0 counted once."""
        on_side_stream(torch.cuda.Stream() if self.cuda else None, self._batch)
        eager = self.logits.clone()
        began = time.perf_counter()
        try:
            self.replay = self.capture(self._batch)
        except Exception as error:  # any failure: CUDA, an uncapturable op, memory
            if self.cuda:
                torch.cuda.synchronize()
            reason = first_line(error)
            return self._fall_back(f"the capture failed ({reason})")
        seconds = time.perf_counter() - began
        counted = [total.clone() for total in self.sums.tensors]
        self.index.zero_()
        self.replay()
        for total, value in zip(self.sums.tensors, counted):
            total.copy_(value)
        difference = torch.linalg.vector_norm(self.logits.double() - eager.double())
        allowed = REPLAY_RTOL * torch.linalg.vector_norm(eager.double()) + 1e-6
        if not difference <= allowed:  # NaN included
            self.index.fill_(1)
            return self._fall_back(f"its first replay's logits differ from an eager batch's by "
                                   f"{difference.item():.3g}")
        self.status = f"graphed (captured in {seconds:.2f} s; its first replay matched an eager batch)"

    def _fall_back(self, why: str) -> None:
        self.replay, self.eager = None, True
        self.status = f"eager: {why}"
        self.notice(f"notice: evaluation runs eagerly, not as a CUDA graph: {why}; the same "
                    f"results, slower")


# A replay may differ from the eager step by the order of floating-point sums (atomics in
# cuDNN's backward, split reductions): far below this fraction of what the step changed. A
# graph that replays another batch, skips the update or runs a stale kernel moves a state by
# the size of the change itself.
REPLAY_RTOL = 1e-3


def replay_mismatch(state: dict[str, list[Tensor]], before: list[Tensor],
                    replayed: list[Tensor]) -> str | None:
    """Where a replay (``replayed``) differs from the eager step now held in ``state``, both
    from ``before``: counters exactly, floating-point state within REPLAY_RTOL of the change
    the eager step made (plus a float32 rounding of its size). None if they agree."""
    position = 0
    for kind, tensors in state.items():
        count = len(tensors)
        eager = [t.detach().double().flatten() for t in tensors]
        start = [t.double().flatten() for t in before[position:position + count]]
        replay = [t.double().flatten() for t in replayed[position:position + count]]
        position += count
        if not eager:
            continue
        eager, start, replay = torch.cat(eager), torch.cat(start), torch.cat(replay)
        if kind == "counters":
            if not torch.equal(eager, replay):
                return "the counters differ"
            continue
        difference = torch.linalg.vector_norm(replay - eager)
        changed = torch.linalg.vector_norm(eager - start)
        allowed = REPLAY_RTOL * changed + 1e-6 * torch.linalg.vector_norm(eager)
        if not difference <= allowed:  # NaN included
            return f"{kind} off by {difference.item():.3g}, the eager step changed them by {changed.item():.3g}"
    return None


def uncapturable(cfg: RunConfig, kernels: str) -> str | None:
    """Why the step this configuration runs cannot be captured as a CUDA graph (None: it can),
    known before trying: a capture that fails can leave PyTorch's allocator unusable on older
    torch and keeps its memory pool until the process exits."""
    if cfg.precision == "fp16" and cfg.opt == "rmsprop":
        return ("fp16's gradient scaler reads its overflow flag on the host for RMSprop, "
                "which has no fused implementation")
    if cfg.memory_efficient and cfg.dropout > 0 and kernels == "aten":
        return ("--memory-efficient with dropout on the ATen path: checkpointing saves the "
                "CUDA random-number state, which a capture cannot read")
    return None


def _no_capture(cfg: RunConfig, runtime: Runtime) -> str | None:
    """Why this process captures no graph at all (None: it can)."""
    if not cfg.cuda_graph:
        return "--no-cuda-graph"
    if runtime.capture is None:
        if runtime.world_size > 1:
            return "several processes: DistributedDataParallel's all-reduce is not captured"
        return f"CUDA graphs are for GPUs; this runs on {runtime.device.type}"
    return None


def eager_reason(cfg: RunConfig, runtime: Runtime, kernels: str) -> str | None:
    """Why the steps of this run run eagerly rather than as one CUDA graph (None: graphed).
    ``kernels`` are the DenseNet kernels the model runs ("fused" or "aten")."""
    return _no_capture(cfg, runtime) or uncapturable(cfg, kernels)


def evaluation_eager_reason(cfg: RunConfig, runtime: Runtime) -> str | None:
    """Why this run evaluates eagerly rather than by a graph's replays (None: graphed)."""
    compiled = "torch.compile compiles the model again for evaluation, which a capture cannot hold"
    return _no_capture(cfg, runtime) or (compiled if cfg.kernels == "compile" else None)


def evaluation_runner(sums: EvaluationSums, batches: loader.EvalBatches, cfg: RunConfig,
                      runtime: Runtime, notice: Callable[[str], None]) -> EagerEvaluation | GraphedEvaluation:
    """What evaluates a split's batches: the replays of a graph where the process can capture
    and the configuration allows, else the batches one by one."""
    reason = evaluation_eager_reason(cfg, runtime)
    if reason is not None:
        return EagerEvaluation(sums, batches, reason)
    capture = runtime.capture
    if capture is capture_cuda_graph:  # the real one: the splits' graphs share one memory pool
        capture = functools.partial(capture_cuda_graph, pool=_evaluation_pool())
    return GraphedEvaluation(sums, batches, notice, capture)


@functools.cache
def _evaluation_pool() -> tuple:
    """The CUDA-graph memory pool of this process's evaluation graphs (not the step's: the
    step's graph keeps its gradients there between replays)."""
    return torch.cuda.graph_pool_handle()


def step_runner(step: TrainStep, cfg: RunConfig, kernels: str, runtime: Runtime,
                notice: Callable[[str], None]) -> Callable[[], None]:
    """What runs each step: its graph where --cuda-graph asks for one, the process can capture
    (``runtime.capture``: one process on a GPU) and the step is capturable, else ``step``
    itself, after a notice where a GPU run asked for a graph it does not get."""
    reason = eager_reason(cfg, runtime, kernels)
    if reason is None:
        return GraphedStep(step, notice, runtime.capture)
    if cfg.cuda_graph and (runtime.capture is not None or runtime.device.type == "cuda"):
        notice(f"notice: the training step runs eagerly, not as a CUDA graph: {reason}")
    return step
