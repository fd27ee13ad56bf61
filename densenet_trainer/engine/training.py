"""The engine: one training step, the same everywhere, the loop over an epoch's steps, and
evaluation. train.py, attic/lr_find.py and bench/ all run this step.

A step gathers and augments its batch from the device-resident dataset (data.TrainBatches),
runs forward, loss, backward and the optimiser, and adds the step's loss and correct count to
sums kept on the device. It never waits for the host: no ``.item()``, no Python branch on a
tensor value (tests/test_step.py runs it on the ``meta`` device, where either would fail).
Every value that changes between steps lives in a device tensor at a fixed address: the batch
number, the epoch's plan, the learning rate, the sums. ``train_epoch`` reads those sums only
every CHECK_EVERY steps, between steps.

That is what lets a GPU run the whole step as one CUDA graph (cuda_graph.py): captured once
and replayed, so the ~1,700 kernels of a DenseNet-BC-100 step cost one launch instead of
keeping the CPU busy launching them. The graph replays exactly the kernels the eager step
runs; the CPU always runs the step eagerly. ``check_epoch`` checks at each epoch's end that
every step ran once, graph or not.

Low precision (``--precision bf16|fp16``) casts the convolution and linear weights to the
compute type in one multi-tensor copy per step, and their gradients back in one more, where
autocast would launch a cast per weight each way; BatchNorm keeps float32 weights, as autocast
does. fp16 adds a gradient scaler whose overflow check and skipped steps stay on the device
(it works with the fused optimisers, which take the scale and the overflow flag as tensors).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_trainer.engine import data
from densenet_trainer.engine.runtime import Runtime, StopFlag, all_sum
from densenet_trainer.records.layout import duration
from densenet_trainer.run.files import non_finite
from densenet_trainer.settings.config import TOP5_FROM

COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Steps between progress updates and non-finite-loss checks. On a GPU each check waits for
# the queued work, so it is rare; on the CPU every step is synchronous anyway.
CHECK_EVERY = {"cuda": 50, "cpu": 1}


class Diverged(Exception):
    """A loss or a weight became NaN or infinite: the run stops before saving (exit status 1)."""


class StepCheckFailed(Exception):
    """The epoch's bookkeeping disagrees with the steps it trained (a step that was skipped,
    replayed twice or left no loss): the run stops before saving (exit status 1)."""


UNWRITTEN = -1.0  # a loss slot's value until its step writes it: cross-entropy is never negative


# ---------------------------------------------------------------- forward in a precision

class _CastAll(torch.autograd.Function):
    """Tensors to ``dtype`` in one multi-tensor copy; their gradients back in one more."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.dtypes = [t.dtype for t in tensors]
        out = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(out, list(tensors))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        out = [torch.empty_like(g, dtype=dtype) for g, dtype in zip(grads, ctx.dtypes)]
        torch._foreach_copy_(out, list(grads))
        return (None, *out)


class Precision:
    """Makes ``model`` compute in ``precision`` (fp32, bf16 or fp16) within ``computing()``.

    In low precision the convolutions and the classifier see their weights cast all at once
    (``_CastAll``), for forward and backward alike: the memory-efficient mode recomputes
    layers during backward and must see the same weights. The BatchNorms keep float32 weights
    and normalise low-precision inputs, as under autocast, which gives the same numbers
    (tests/test_step.py). A torch.compile'd model runs under autocast instead: the compiler
    fuses those casts itself, and swapping its weights would make it recompile.
    """

    def __init__(self, model: nn.Module, precision: str) -> None:
        self.dtype = COMPUTE_DTYPES[precision]
        self.autocast = hasattr(model, "_orig_mod")  # torch.compile's wrapper
        self.slots = [(module, name) for module in model.modules()
                      if isinstance(module, (nn.Conv2d, nn.Linear))
                      for name, _ in module.named_parameters(recurse=False)]
        self.device_type = next(model.parameters()).device.type

    def inputs(self, images: Tensor) -> Tensor:
        return images.to(self.dtype) if self.dtype is not None and not self.autocast else images

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        if self.autocast:
            with torch.autocast(self.device_type, dtype=self.dtype):
                yield
            return
        weights = [module._parameters[name] for module, name in self.slots]
        cast = _CastAll.apply(self.dtype, *weights)
        for (module, name), tensor in zip(self.slots, cast):
            module._parameters[name] = tensor  # read as module.weight; not a Parameter
        try:
            yield
        finally:
            for (module, name), weight in zip(self.slots, weights):
                module._parameters[name] = weight


# ---------------------------------------------------------------- the step

class TrainStep:
    """One training step of the epoch that ``start_epoch`` planned; call it once per step.

    ``losses[i]`` is step i's mean loss, ``correct`` the epoch's correct predictions so far
    and ``correct5`` its top-5 correct ones (counted with ``top5``), all on the device; ``lr``
    is the learning rate every parameter group reads. ``norms`` are the model's BatchNorms,
    whose batch counters the epoch's check reads.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: data.TrainBatches, precision: str,
                 scaler: torch.amp.GradScaler | None = None, top5: bool = False) -> None:
        device = batches.device
        self.model, self.optimizer, self.batches, self.scaler = model, optimizer, batches, scaler
        self.precision = Precision(model, precision)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)  # the batch to train on
        self.losses = torch.zeros(batches.steps, dtype=torch.float32, device=device)
        self.correct = torch.zeros(1, dtype=torch.int64, device=device)
        self.correct5 = torch.zeros(1, dtype=torch.int64, device=device)
        self.top5 = top5
        self.lr = torch.full((), float(optimizer.param_groups[0]["lr"]), device=device)
        for group in optimizer.param_groups:  # also after load_state_dict put floats back
            group["lr"] = self.lr
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.norm_batches_at_start = self.norm_batches()

    def norm_batches(self) -> Tensor:
        """The BatchNorms' batch counters, summed (on the device)."""
        return sum((m.num_batches_tracked for m in self.norms),
                   torch.zeros((), dtype=torch.int64, device=self.step.device))

    def state(self) -> dict[str, list[Tensor]]:
        """Every tensor a step changes, by kind: what a replay of the step must change alike."""
        module_state = [*self.model.parameters(), *self.model.buffers()]
        optimizer = [t for s in self.optimizer.state.values() for t in s.values()
                     if isinstance(t, Tensor)]
        if self.scaler is not None and self.scaler._scale is not None:
            optimizer += [self.scaler._scale, self.scaler._growth_tracker]
        return {"counters": [self.step, self.correct, self.correct5,
                             *(t for t in module_state if not t.is_floating_point())],
                "losses": [self.losses],
                "weights and BatchNorm statistics": [t for t in module_state if t.is_floating_point()],
                "optimizer state": optimizer}

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    def start_epoch(self, start_step: int = 0) -> None:
        """Plan the next epoch and begin it at ``start_step`` (a resumed epoch's next step)."""
        self.batches.plan_epoch()
        self.step.fill_(start_step)
        self.losses[start_step:].fill_(UNWRITTEN)
        self.correct.zero_()
        self.correct5.zero_()
        self.norm_batches_at_start = self.norm_batches()

    def __call__(self) -> None:
        images, labels = self.batches.batch(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.computing():
            logits = self.model(self.precision.inputs(images)).float()
            loss = F.cross_entropy(logits, labels)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.losses.index_copy_(0, self.step, loss.detach().view(1))
        self.correct += (logits.argmax(1) == labels).sum()
        if self.top5:
            self.correct5 += top5_hits(logits, labels).sum()
        self.step += 1


def top5_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row, whether the label is among the five highest logits."""
    return (logits.topk(5, dim=1).indices == labels[:, None]).any(1)


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


class ProgressBar:
    """On a terminal: tqdm's bar for the epoch, updated at every check."""

    def __init__(self, epoch: int, epochs: int, steps: int, start_step: int) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=steps, initial=start_step, leave=False, unit="step",
                        desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True)

    def due(self, done: int) -> bool:
        return True

    def show(self, done: int, loss: float, error: float, images_per_s: float, elapsed: float) -> None:
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.3f}", err=f"{error:.1f}%", img_s=f"{images_per_s:.0f}")

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
        per_step = elapsed / max(done - self.start_step, 1)
        eta = (self.steps - done) * per_step
        run = eta + (self.epochs - self.epoch) * self.steps * per_step  # training time alone
        print(f"  epoch {self.epoch}: step {done}/{self.steps} ({100 * done // self.steps}%)  "
              f"loss {loss:.4f}  error {error:.2f}%  {images_per_s:,.0f} img/s  "
              f"epoch ends in {duration(eta)}"
              + (f", the run in about {duration(run)}" if self.epoch < self.epochs else ""),
              flush=True)

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
        step.step[0], (step.losses[first:done] == UNWRITTEN).sum(),
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


@torch.inference_mode()
def evaluate(model: nn.Module, batches, precision: str, runtime: Runtime, num_classes: int,
             tta: bool = False) -> Evaluation:
    """Evaluate ``model`` over all processes' batches; ``batches`` yields (images, labels,
    valid) as data.eval_batches does: padded rows count for nothing."""
    start = time.perf_counter()
    model.eval()
    precision = Precision(model, precision)

    def forward(images: Tensor) -> Tensor:
        with precision.computing():
            return model(precision.inputs(images)).float()

    device = runtime.device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits5 = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels, valid in batches:
        logits = forward(images)
        if tta:
            logits = ((logits.softmax(1) + forward(images.flip(3)).softmax(1)) / 2).log()
        losses = F.cross_entropy(logits, labels, reduction="none")
        loss_sum += torch.where(valid, losses, 0).sum()
        # index_add_, not bincount: on CUDA, bincount reads its input's maximum on the host
        confusion.index_add_(0, labels * num_classes + logits.argmax(1), valid.double())
        if num_classes > TOP5_FROM:
            hits5 += (top5_hits(logits, labels) & valid).sum()
    if runtime.world_size > 1:
        for total in (confusion, loss_sum, hits5):
            dist.all_reduce(total)
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = confusion.sum().item()
    error = 100 * (1 - confusion.diagonal().sum().item() / count)
    top5 = 100 * (1 - hits5.item() / count) if num_classes > TOP5_FROM else None
    return Evaluation(loss_sum.item() / count, error, top5, confusion, time.perf_counter() - start)
