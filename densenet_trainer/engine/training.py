"""The loop over an epoch's steps, its checks, and evaluation.

``train_epoch`` runs the step (step.TrainStep, or its CUDA graph) over an epoch, reading the
step's device-side sums only every CHECK_EVERY steps, between steps; ``check_epoch`` checks at
the epoch's end that every step ran once, graph or not; ``read_evaluation`` runs a model over a
split (its batches eagerly, or cuda_graph's replays) and checks every image counted once.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_trainer.engine import data
from densenet_trainer.engine.runtime import Runtime, StopFlag, all_sum
from densenet_trainer.engine.step import UNWRITTEN, Precision, TrainStep, top5_hits
from densenet_trainer.records.layout import duration
from densenet_trainer.settings.config import TOP5_FROM

# Steps between progress updates and non-finite-loss checks. On a GPU each check waits for
# the queued work, so it is rare; on the CPU every step is synchronous anyway.
CHECK_EVERY = {"cuda": 50, "cpu": 1}


class Diverged(Exception):
    """A loss or a weight became NaN or infinite: the run stops before saving (exit status 1)."""


class StepCheckFailed(Exception):
    """The epoch's bookkeeping disagrees with the steps it trained (a step that was skipped,
    replayed twice or left no loss): the run stops before saving (exit status 1)."""



# ---------------------------------------------------------------- an epoch

@dataclass
class EpochProgress:
    """Sums of the epoch so far, over all processes; saved in a mid-epoch checkpoint."""
    step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    correct5: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen

    @property
    def error(self) -> float:
        return 100 * (1 - self.correct / self.seen)

    @property
    def top5_error(self) -> float:
        return 100 * (1 - self.correct5 / self.seen)

    @property
    def images_per_s(self) -> float:
        return self.seen / self.seconds


def time_left(epoch: int, epochs: int, steps: int, start_step: int, done: int,
              elapsed: float) -> tuple[float, float | None]:
    """Seconds until the epoch ends and until the run's training does (None in its last
    epoch), at the pace of this epoch's steps so far."""
    per_step = elapsed / max(done - start_step, 1)
    epoch_left = (steps - done) * per_step
    return epoch_left, (epoch_left + (epochs - epoch) * steps * per_step if epoch < epochs else None)


class ProgressBar:
    """On a terminal: tqdm's bar for the epoch, updated at every check, with when the whole
    run ends beside tqdm's own time left in the epoch."""

    def __init__(self, epoch: int, epochs: int, steps: int, start_step: int) -> None:
        from tqdm import tqdm
        self.epoch, self.epochs, self.steps, self.start_step = epoch, epochs, steps, start_step
        self.bar = tqdm(total=steps, initial=start_step, leave=False, unit="step",
                        desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True)

    def due(self, done: int) -> bool:
        return True

    def show(self, done: int, loss: float, error: float, images_per_s: float, elapsed: float) -> None:
        self.bar.update(done - self.bar.n)
        _, run_left = time_left(self.epoch, self.epochs, self.steps, self.start_step, done, elapsed)
        self.bar.set_postfix(loss=f"{loss:.3f}", err=f"{error:.1f}%", img_s=f"{images_per_s:.0f}",
                             **({"run_ends_in": duration(run_left)} if run_left is not None else {}))

    def close(self) -> None:
        self.bar.close()


class ProgressLines:
    """Without a terminal (nohup, a batch scheduler's log): a plain line every ``every``
    seconds and at 25, 50 and 75% of the epoch, indented so that it never reads as an
    epoch's result."""

    EVERY = 30  # seconds

    def __init__(self, epoch: int, epochs: int, steps: int, start_step: int,
                 every: float = EVERY) -> None:
        self.epoch, self.epochs, self.steps, self.start_step = epoch, epochs, steps, start_step
        self.every = every
        self.marks = [math.ceil(steps * q / 4) for q in (1, 2, 3)]
        self.marks = [m for m in self.marks if start_step < m < steps]
        self.last = time.perf_counter()

    def due(self, done: int) -> bool:
        if done == self.steps:  # the epoch's own line follows
            return False
        quarter = bool(self.marks) and done >= self.marks[0]
        return quarter or time.perf_counter() - self.last >= self.every

    def show(self, done: int, loss: float, error: float, images_per_s: float, elapsed: float) -> None:
        while self.marks and done >= self.marks[0]:
            self.marks.pop(0)
        self.last = time.perf_counter()
        eta, run = time_left(self.epoch, self.epochs, self.steps, self.start_step, done, elapsed)
        print(f"  epoch {self.epoch}: step {done}/{self.steps} ({100 * done // self.steps}%)  "
              f"loss {loss:.4f}  error {error:.2f}%  {images_per_s:,.0f} img/s  "
              f"epoch ends in {duration(eta)}"
              + (f", the run in about {duration(run)}" if run is not None else ""), flush=True)

    def close(self) -> None:
        pass


def train_epoch(step: TrainStep, run_step: Callable[[], None], runtime: Runtime, epoch: int,
                progress: EpochProgress, stop: StopFlag,
                display: ProgressBar | ProgressLines | None) -> EpochProgress:
    """Train 1-based ``epoch`` from ``progress.step``, or until ``stop`` is requested; returns
    the sums (global over processes).

    ``run_step`` is ``step`` itself or its CUDA graph. Losses and the correct count stay on
    the device and are read every CHECK_EVERY steps, between steps: the step never waits.
    A non-finite loss raises Diverged, naming the step; bookkeeping that disagrees with the
    steps trained raises StepCheckFailed (``check_epoch``).
    """
    step.model.train()
    start = time.perf_counter()
    step.start_epoch(progress.step)
    steps, share = step.batches.steps, step.batches.share
    check_every = CHECK_EVERY.get(runtime.device.type, 50)
    done = progress.step
    while done < steps:
        run_step()
        done += 1
        at_check = done % check_every == 0 or done == steps
        if at_check:
            first = max(progress.step, done - check_every)
            finite = torch.isfinite(step.losses[first:done])
            if not finite.all():
                step_number = first + int((~finite).nonzero()[0]) + 1
                raise Diverged(f"the training loss is not finite at epoch {epoch}, step {step_number}")
            if display is not None and display.due(done):
                seen = (done - progress.step) * share
                elapsed = time.perf_counter() - start
                display.show(done, step.losses[progress.step:done].mean().item(),
                             100 * (1 - step.correct.item() / seen),
                             seen * runtime.world_size / elapsed, elapsed)
        if done < steps and (at_check or runtime.world_size == 1) and stop.requested(runtime):
            break
    check_epoch(step, progress.step, done, epoch)
    loss_sum, correct_sum, correct5_sum, seen_sum = all_sum(
        [step.losses[progress.step:done].double().sum().item() * share, step.correct.item(),
         step.correct5.item(), (done - progress.step) * share], runtime)
    return EpochProgress(done, progress.loss_sum + loss_sum, progress.correct + correct_sum,
                         progress.correct5 + correct5_sum, progress.seen + seen_sum,
                         progress.seconds + time.perf_counter() - start)


def check_epoch(step: TrainStep, first: int, done: int, epoch: int) -> None:
    """Steps ``first`` to ``done`` of ``epoch`` ran once each: the batch counter stands at
    ``done``, each of them wrote its loss, and every BatchNorm counted each of them once.

    Read where the epoch waits for the device anyway; a graph that replays a stale or partial
    step, or a step that never ran, stops the run here, before any row or checkpoint.
    """
    expected = (done - first) * len(step.norms)
    counter, unwritten, counted = torch.stack([
        step.batch_index[0], (step.losses[first:done] == UNWRITTEN).sum(),
        step.norm_batches() - step.norm_batches_at_start]).tolist()
    problems = []
    if counter != done:
        problems.append(f"the batch counter is at {counter}, not {done}")
    if unwritten:
        problems.append(f"{unwritten} of its {done - first} steps wrote no loss")
    if counted != expected:
        problems.append(f"the BatchNorm layers counted {counted} batches, not {expected} "
                        f"({len(step.norms)} layers x {done - first} steps)")
    if problems:
        raise StepCheckFailed(f"epoch {epoch} did not train the steps it ran: "
                              + "; ".join(problems))


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity.

    One host synchronisation for all of them, so it is cheap enough for every save.
    """
    names = [name for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def ensure_finite(model: nn.Module, where: str) -> None:
    """Stop before logging, saving or evaluating a model whose weights (or BatchNorm
    statistics) became NaN or infinite."""
    bad = non_finite(model.state_dict())
    if bad:
        raise Diverged(f"the weights are not finite {where} ({', '.join(bad[:3])})")


# ---------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    """A model's results on one split: mean loss, error and top-5 error in percent (top-5
    for more than TOP5_FROM classes, else None), the confusion matrix (true x predicted)."""
    loss: float
    error: float
    top5_error: float | None
    confusion: Tensor
    seconds: float

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    def row(self) -> dict:
        """The split's CSV row, without the epoch."""
        return {"loss": self.loss, "error": self.error, "top5_error": self.top5_error,
                "seconds": self.seconds}


class EvaluationSums:
    """A model's sums over evaluation batches, as device tensors: the confusion counts (flat),
    the summed loss and the top-5 hits. ``add`` adds one batch's without the host reading
    anything (a test runs it on the meta device, where any read would fail), so that a CUDA
    graph can capture it (cuda_graph.GraphedEvaluation)."""

    def __init__(self, model: nn.Module, precision: str, num_classes: int, device: torch.device,
                 tta: bool = False) -> None:
        self.model, self.precision, self.num_classes, self.tta = model, Precision(model, precision), num_classes, tta
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.hits5 = torch.zeros((), dtype=torch.float64, device=device)
        self.tensors = [self.confusion, self.loss_sum, self.hits5]

    def zero(self) -> None:
        for total in self.tensors:
            total.zero_()

    def _forward(self, images: Tensor) -> Tensor:
        with self.precision.computing():
            return self.model(self.precision.inputs(images)).float()

    def add(self, images: Tensor, labels: Tensor, valid: Tensor) -> Tensor:
        """Add a batch (rows where ``valid``); returns its logits."""
        logits = self._forward(images)
        if self.tta:
            logits = ((logits.softmax(1) + self._forward(images.flip(3)).softmax(1)) / 2).log()
        losses = F.cross_entropy(logits, labels, reduction="none")
        self.loss_sum += torch.where(valid, losses, 0).sum()
        # index_add_, not bincount: on CUDA, bincount reads its input's maximum on the host
        self.confusion.index_add_(0, labels * self.num_classes + logits.argmax(1), valid.double())
        if self.num_classes > TOP5_FROM:
            self.hits5 += (top5_hits(logits, labels) & valid).sum()
        return logits


class EvaluationRunner(Protocol):
    """What evaluates every batch of ``batches`` into ``sums``: EagerEvaluation, or
    cuda_graph.GraphedEvaluation; ``status`` says which, and why."""
    sums: EvaluationSums
    batches: data.EvalBatches
    status: str

    def __call__(self) -> None: ...


class EagerEvaluation:
    """An evaluation's batches one after another into ``sums`` (``status``: why not as a graph)."""

    def __init__(self, sums: EvaluationSums, batches: data.EvalBatches, reason: str | None = None) -> None:
        self.sums, self.batches = sums, batches
        self.status = f"eager ({reason})" if reason else "eager"

    def __call__(self) -> None:
        self.sums.zero()
        for batch in self.batches:
            self.sums.add(*batch)


@torch.inference_mode()
def read_evaluation(evaluation: EvaluationRunner, runtime: Runtime) -> Evaluation:
    """Run ``evaluation`` (eager, or cuda_graph.GraphedEvaluation) over every process's
    batches; the host reads the sums once, at the end, and checks that every image of the
    split counted once (padded rows count for nothing)."""
    start = time.perf_counter()
    sums = evaluation.sums
    sums.model.eval()
    evaluation()
    if runtime.world_size > 1:
        for total in sums.tensors:
            dist.all_reduce(total)
    confusion = sums.confusion.view(sums.num_classes, sums.num_classes).cpu()
    count = confusion.sum().item()
    if count != evaluation.batches.total_images:
        raise StepCheckFailed(f"the evaluation counted {count:g} images of the split's "
                              f"{evaluation.batches.total_images} ({evaluation.status})")
    error = 100 * (1 - confusion.diagonal().sum().item() / count)
    top5 = 100 * (1 - sums.hits5.item() / count) if sums.num_classes > TOP5_FROM else None
    return Evaluation(sums.loss_sum.item() / count, error, top5, confusion, time.perf_counter() - start)


def evaluate(model: nn.Module, batches: data.EvalBatches, precision: str, runtime: Runtime,
             num_classes: int, tta: bool = False) -> Evaluation:
    """``model`` over every process's ``batches``, eagerly (--evaluate, tools and tests)."""
    sums = EvaluationSums(model, precision, num_classes, runtime.device, tta)
    return read_evaluation(EagerEvaluation(sums, batches), runtime)
