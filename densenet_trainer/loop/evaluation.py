"""Evaluation: a model's loss, error, top-5 error and confusion matrix over a split.

``EvaluationSums.add`` adds a batch's results to sums on the device without a host read, so
that a split's evaluation can be the replays of a CUDA graph (speed/cuda_graph.py) as well as
its batches one after another (``EagerEvaluation``); ``read_evaluation`` reads the sums once
and checks that every image of the split counted once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_trainer.config.run_config import TOP5_FROM
from densenet_trainer.data import loader
from densenet_trainer.loop.training import Autocast, StepCheckFailed, top5_hits
from densenet_trainer.runtime import Runtime


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

    def __init__(self, model: nn.Module, precision: Autocast, num_classes: int, device: torch.device,
                 tta: bool = False) -> None:
        self.model, self.num_classes, self.tta = model, num_classes, tta
        self.precision = precision  # the training step's, in a run
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
    batches: loader.EvalBatches
    status: str

    def __call__(self) -> None: ...


class EagerEvaluation:
    """An evaluation's batches one after another into ``sums`` (``status``: why not as a graph)."""

    def __init__(self, sums: EvaluationSums, batches: loader.EvalBatches, reason: str | None = None) -> None:
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
    evaluation.sums.model.eval()
    evaluation()
    return read_sums(evaluation, runtime, start)


def read_sums(evaluation: EvaluationRunner, runtime: Runtime, start: float) -> Evaluation:
    """The result of ``evaluation``, run (or queued on the device) since ``start``."""
    sums = evaluation.sums
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


def evaluate(model: nn.Module, batches: loader.EvalBatches, precision: str, runtime: Runtime,
             num_classes: int, tta: bool = False) -> Evaluation:
    """``model`` over every process's ``batches``, eagerly (--evaluate, tools and tests)."""
    sums = EvaluationSums(model, Autocast(model, precision), num_classes, runtime.device, tta)
    return read_evaluation(EagerEvaluation(sums, batches), runtime)
