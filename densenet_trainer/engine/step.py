"""One training step, the same everywhere: train.py, attic/lr_find.py and bench/ all run it.

A step gathers and augments its batch from the device-resident dataset (data.TrainBatches),
runs forward, loss, backward and the optimiser, and adds the step's loss and correct count to
sums kept on the device. It never waits for the host: no ``.item()``, no Python branch on a
tensor value (tests/unit/test_step.py runs it on the ``meta`` device, where either would fail).
Every value that changes between steps lives in a device tensor at a fixed address: the batch
number, the epoch's plan, the learning rate, the sums. training.train_epoch reads those sums
only every CHECK_EVERY steps, between steps.

That is what lets a GPU run the whole step as one CUDA graph (cuda_graph.py): captured once
and replayed, so the ~1,700 kernels of a DenseNet-BC-100 step cost one launch instead of
keeping the CPU busy launching them. The graph replays exactly the kernels the eager step
runs; the CPU always runs the step eagerly.

Low precision (``--precision bf16|fp16``) casts the convolution and linear weights to the
compute type in one multi-tensor copy per step, and their gradients back in one more, where
autocast would launch a cast per weight each way; BatchNorm keeps float32 weights, as autocast
does. fp16 adds a gradient scaler whose overflow check and skipped steps stay on the device
(it works with the fused optimisers, which take the scale and the overflow flag as tensors).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_trainer.engine import data

COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
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
    (tests/unit/test_step.py). A torch.compile'd model runs under autocast instead: the compiler
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


# ---------------------------------------------------------------- the learning rate

class LearningRate:
    """The run's learning rate: one device tensor at a fixed address, which every parameter
    group of the optimiser reads (build_optimizer hands it over; a checkpoint's restore keeps
    it), so that the schedule's ``set`` reaches a step replayed as a CUDA graph."""

    def __init__(self, value: float, device: torch.device) -> None:
        self.tensor = torch.full((), float(value), device=device)

    def set(self, value: float) -> None:
        self.tensor.fill_(value)


# ---------------------------------------------------------------- the step

class TrainStep:
    """One training step of the epoch that ``start_epoch`` planned; call it once per step.

    ``losses[i]`` is step i's mean loss, ``correct`` the epoch's correct predictions so far
    and ``correct5`` its top-5 correct ones (counted with ``top5``), all on the device.
    ``norms`` are the model's BatchNorms, whose batch counters the epoch's check reads. The
    learning rate is the optimiser's (a LearningRate its parameter groups read).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: data.TrainBatches, precision: str,
                 scaler: torch.amp.GradScaler | None = None, top5: bool = False) -> None:
        device = batches.device
        self.model, self.optimizer, self.batches, self.scaler = model, optimizer, batches, scaler
        self.precision = Precision(model, precision)
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
