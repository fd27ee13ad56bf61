"""The training loop, in the order it runs: the learning rate, the optimiser that reads it,
the step (forward, loss, backward, optimiser), the epoch over the steps, and its checks.
train.py's ``train_epochs`` runs ``train_epoch`` once an epoch after setting the schedule's
rate (RunConfig.learning_rate); to change the loss or clip gradients, change ``TrainStep``.
``train_epoch`` yields after every step, so that several runs in one process can take turns
(train.py's --seeds: loop/turns.py).

The step's rules, which let a GPU run it as one CUDA graph (speed/cuda_graph.py) and so make
the ~1,700 kernels of a DenseNet-BC-100 step one launch:

- **No host read.** A step gathers and augments its batch from the device-resident dataset
  (data.TrainBatches), runs forward, loss, backward and the optimiser, and adds its loss and
  correct count to sums on the device. No ``.item()``, no Python branch on a tensor's value
  (tests/unit/test_step.py runs it on the ``meta`` device, where either would fail);
  ``train_epoch`` reads the sums only every CHECK_EVERY steps, between steps.
- **Fixed addresses.** Every value that changes between steps lives in a device tensor that
  is never replaced: the batch number, the epoch's plan, the learning rate (``LearningRate``,
  which every parameter group of the optimiser reads), the sums.
- **Every step counted.** ``check_epoch`` checks at the epoch's end that the batch counter,
  the loss slots and every BatchNorm's batch counter say each step ran once, graph or not.

The CPU runs the same step eagerly. Low precision is the object the step is handed, one for
the step and the run's evaluation: ``Autocast`` here, or speed/precision.py's one cast of all
weights, which computes the same.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.data import loader
from densenet_trainer.loop.progress import ProgressBar, ProgressLines
from densenet_trainer.runtime import Runtime, StopFlag, all_sum

COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
UNWRITTEN = -1.0  # a loss slot's value until its step writes it: cross-entropy is never negative
# Steps between progress updates and non-finite-loss checks. On a GPU each check waits for
# the queued work, so it is rare; on the CPU every step is synchronous anyway.
CHECK_EVERY = {"cuda": 50, "cpu": 1}


class Diverged(Exception):
    """A loss or a weight became NaN or infinite: the run stops before saving (exit status 1)."""


class StepCheckFailed(Exception):
    """The epoch's bookkeeping disagrees with the steps it trained (a step that was skipped,
    replayed twice or left no loss): the run stops before saving (exit status 1)."""



# ---------------------------------------------------------------- the learning rate and the optimiser

class LearningRate:
    """The run's learning rate: one device tensor at a fixed address, which every parameter
    group of the optimiser reads (build_optimizer hands it over; a checkpoint's restore keeps
    it), so that the schedule's ``set`` reaches a step replayed as a CUDA graph."""

    def __init__(self, value: float, device: torch.device) -> None:
        self.tensor = torch.full((), float(value), device=device)

    def set(self, value: float) -> None:
        self.tensor.fill_(value)


def build_optimizer(cfg: RunConfig, model: nn.Module, lr: LearningRate) -> torch.optim.Optimizer:
    """The run's optimiser for ``model``'s parameters, on their device, reading ``lr``.

    SGD and Adam are the fused implementations: one kernel per step for all parameters, and
    they take the learning rate, the gradient scale and the overflow flag as device tensors.
    RMSprop has no fused form. Adam and RMSprop keep their step count on the device where a
    CUDA graph will capture them ("capturable"; torch refuses to capture them otherwise).
    """
    params = list(model.parameters())
    capturable = params[0].is_cuda and cfg.cuda_graph
    if cfg.opt == "sgd":
        return torch.optim.SGD(params, lr.tensor, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.opt == "adam":
        return torch.optim.Adam(params, lr.tensor, weight_decay=cfg.weight_decay, fused=True,
                                capturable=capturable)
    return torch.optim.RMSprop(params, lr.tensor, weight_decay=cfg.weight_decay, foreach=True,
                               capturable=capturable)


# ---------------------------------------------------------------- the step

class Autocast:
    """Makes ``model`` compute in ``precision`` (fp32, bf16 or fp16) within ``computing()``,
    as torch.autocast does: the convolutions and the classifier in the low precision, the
    BatchNorms normalising in float32. fp32 leaves everything as it is."""

    def __init__(self, model: nn.Module, precision: str) -> None:
        self.dtype = COMPUTE_DTYPES[precision]
        self.device_type = next(model.parameters()).device.type

    def inputs(self, images: Tensor) -> Tensor:
        return images

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype):
            yield


class TrainStep:
    """One training step of the epoch that ``start_epoch`` planned; call it once per step.

    ``losses[i]`` is step i's mean loss, ``correct`` the epoch's correct predictions so far
    and ``correct5`` its top-5 correct ones (counted with ``top5``), all on the device.
    ``norms`` are the model's BatchNorms, whose batch counters the epoch's check reads. The
    learning rate is the optimiser's (a LearningRate its parameter groups read).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: loader.TrainBatches, precision: Autocast,
                 scaler: torch.amp.GradScaler | None = None, top5: bool = False) -> None:
        device = batches.device
        self.model, self.optimizer, self.batches, self.scaler = model, optimizer, batches, scaler
        self.precision = precision  # how the model computes: Autocast, or speed/precision.py's
        self.batch_index = torch.zeros(1, dtype=torch.int64, device=device)  # the batch to train on
        self.losses = torch.zeros(batches.steps, dtype=torch.float32, device=device)
        self.correct = torch.zeros(1, dtype=torch.int64, device=device)
        self.correct5 = torch.zeros(1, dtype=torch.int64, device=device)
        self.top5 = top5
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.norm_batches_at_start = self.norm_batches()

    def norm_batches(self) -> Tensor:
        """The BatchNorms' batch counters, summed (on the device)."""
        return sum((m.num_batches_tracked for m in self.norms),
                   torch.zeros((), dtype=torch.int64, device=self.batch_index.device))

    def state(self) -> dict[str, list[Tensor]]:
        """Every tensor a step changes, by kind: what a replay of the step must change alike."""
        module_state = [*self.model.parameters(), *self.model.buffers()]
        optimizer = [t for s in self.optimizer.state.values() for t in s.values()
                     if isinstance(t, Tensor)]
        if self.scaler is not None and self.scaler._scale is not None:
            optimizer += [self.scaler._scale, self.scaler._growth_tracker]
        return {"counters": [self.batch_index, self.correct, self.correct5,
                             *(t for t in module_state if not t.is_floating_point())],
                "losses": [self.losses],
                "weights and BatchNorm statistics": [t for t in module_state if t.is_floating_point()],
                "optimizer state": optimizer}

    def start_epoch(self, start_step: int = 0) -> None:
        """Plan the next epoch and begin it at ``start_step`` (a resumed epoch's next step)."""
        self.batches.plan_epoch()
        self.batch_index.fill_(start_step)
        self.losses[start_step:].fill_(UNWRITTEN)
        self.correct.zero_()
        self.correct5.zero_()
        self.norm_batches_at_start = self.norm_batches()

    def __call__(self) -> None:
        images, labels = self.batches.batch(self.batch_index)
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
        self.losses.index_copy_(0, self.batch_index, loss.detach().view(1))
        self.correct += (logits.argmax(1) == labels).sum()
        if self.top5:
            self.correct5 += top5_hits(logits, labels).sum()
        self.batch_index += 1


def top5_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row, whether the label is among the five highest logits."""
    return (logits.topk(5, dim=1).indices == labels[:, None]).any(1)


# ---------------------------------------------------------------- the epoch

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


def train_epoch(step: TrainStep, run_step: Callable[[], None], runtime: Runtime, epoch: int,
                progress: EpochProgress, stop: StopFlag,
                display: ProgressBar | ProgressLines | None) -> Generator[None, None, EpochProgress]:
    """Train 1-based ``epoch`` from ``progress.step``, or until ``stop`` is requested; returns
    the sums (global over processes). A generator: it yields after every step, and its
    caller takes the sums with ``yield from`` (or loop/turns.py's ``finish``).

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
        yield
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


