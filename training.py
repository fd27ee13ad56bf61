"""One training step, the same everywhere: train.py, attic/lr_find.py and bench/ all run it.

A step gathers and augments its batch from the device-resident dataset (data.TrainBatches),
runs forward, loss, backward and the optimiser, and adds the step's loss and correct count to
sums kept on the device. It never waits for the host: no ``.item()``, no Python branch on a
tensor value (tests/test_step.py runs it on the ``meta`` device, where either would fail).
Every value that changes between steps lives in a device tensor at a fixed address: the batch
number, the epoch's plan, the learning rate, the sums.

That is what lets a GPU run the whole step as one CUDA graph (``GraphedStep``): captured once
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
import ctypes
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import data
from densenet import DenseNet
from runlog import RunError

COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TOP5_FROM = 10  # datasets with more classes than this (CIFAR-100) also log the top-5 error


# ---------------------------------------------------------------- set-up

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_flag: str) -> Runtime:
    """One process, or DistributedDataParallel when started by torchrun (NCCL or Gloo).

    On CUDA, cuDNN benchmarks its convolution algorithms once per shape: every training and
    evaluation batch has one shape, so that happens in the first steps only.
    """
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    torch.backends.cudnn.benchmark = use_cuda
    if "LOCAL_RANK" not in os.environ:
        return Runtime(torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def keep_freed_memory_mapped() -> None:
    """Make glibc keep freed memory for reuse instead of handing it back to the system.

    By default every tensor over 32 MB is mmap'd and unmapped again, and the heap is trimmed
    after frees, so each training step page-faults its activations in afresh (seconds of
    kernel time per step on the CPU; see bench/speed.py). Serving all sizes from the heap
    and never trimming it keeps that memory mapped between steps. Other C libraries: no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


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


def model_kernels(cfg: dict, device: torch.device) -> str:
    """The DenseNet kernels that --kernels means on ``device``: "auto" is fused.py's on the
    CPU in float32 (measured faster there, see README) and ATen's elsewhere, until the
    Triton path is measured on a GPU; "compile" compiles the ATen model."""
    choice = cfg.get("kernels", "auto")  # runs saved before the flag: auto
    if choice == "auto":
        return "fused" if device.type == "cpu" and cfg["precision"] == "fp32" else "aten"
    return "aten" if choice == "compile" else choice


def build_model(cfg: dict, num_classes: int, device: torch.device = torch.device("cpu")) -> DenseNet:
    return DenseNet(cfg["depth"], cfg["growth_rate"], cfg["bottleneck"], cfg["compression"],
                    cfg["dropout"], num_classes, cfg["memory_efficient"], model_kernels(cfg, device))


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimiser for ``model``'s parameters, on their device.

    SGD and Adam are the fused implementations: one kernel per step for all parameters, and
    they take the learning rate, the gradient scale and the overflow flag as device tensors.
    RMSprop has no fused form. Adam and RMSprop keep their step count on the device where a
    CUDA graph will capture them ("capturable"; torch refuses to capture them otherwise).
    """
    params, lr, decay = list(model.parameters()), cfg["lr"], cfg["weight_decay"]
    capturable = params[0].is_cuda and cfg.get("cuda_graph", True)
    if cfg["opt"] == "sgd":
        return torch.optim.SGD(params, lr, momentum=cfg["momentum"], nesterov=cfg["momentum"] > 0,
                               weight_decay=decay, fused=True)
    if cfg["opt"] == "adam":
        return torch.optim.Adam(params, lr, weight_decay=decay, fused=True, capturable=capturable)
    return torch.optim.RMSprop(params, lr, weight_decay=decay, foreach=True, capturable=capturable)


def restore(target: nn.Module | torch.optim.Optimizer | torch.amp.GradScaler, state: dict,
            path: Path) -> None:
    """load_state_dict, with a mismatch (another architecture, a damaged file) in one line.

    An optimiser keeps the implementation it was built with (fused, foreach, capturable): the
    state is the run's, how the step computes it is this version's.
    """
    implementation = [{k: group[k] for k in ("fused", "foreach", "capturable") if k in group}
                      for group in getattr(target, "param_groups", [])]
    try:
        target.load_state_dict(state)
        for group, kept in zip(getattr(target, "param_groups", []), implementation):
            group.update(kept)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()
        raise RunError(f"{path} does not fit the model its own config describes ({reason}); "
                       f"use a checkpoint that train.py wrote for this run") from None


def learning_rate(cfg: dict, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: a pure function, so resuming needs no scheduler state."""
    if cfg["schedule"] == "cosine":
        return 0.5 * cfg["lr"] * (1 + math.cos(math.pi * epoch / cfg["epochs"]))
    drops = sum(epoch >= int(cfg["epochs"] * share) for share in (0.5, 0.75))
    return cfg["lr"] * 0.1 ** drops


def build_training(cfg: dict, split: data.Split, normalizer: data.Normalizer, runtime: Runtime,
                   num_classes: int) -> tuple[DenseNet, torch.optim.Optimizer,
                                              torch.amp.GradScaler | None, data.TrainBatches]:
    """The run's model (seeded, on the device in its memory layout), optimiser, gradient
    scaler (fp16 only: bfloat16 has float32's range) and training batches."""
    seed_everything(cfg["seed"])
    model = build_model(cfg, num_classes, runtime.device)
    model.to(runtime.device, memory_format=data.memory_format(cfg["channels_last"]))
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(runtime.device.type) if cfg["precision"] == "fp16" else None
    batches = data.TrainBatches(split, cfg["batch_size"], normalizer, cfg["augment"], cfg["seed"],
                                runtime.device, runtime.rank, runtime.world_size,
                                cfg["channels_last"])
    return model, optimizer, scaler, batches


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
    is the learning rate every parameter group reads.
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

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)

    def start_epoch(self, start_step: int = 0) -> None:
        """Plan the next epoch and begin it at ``start_step`` (a resumed epoch's next step)."""
        self.batches.plan_epoch()
        self.step.fill_(start_step)
        self.correct.zero_()
        self.correct5.zero_()

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


def capture_cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """Record one call of ``step`` as a CUDA graph (nothing runs); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


class GraphedStep:
    """``step`` as one CUDA graph: run eagerly for WARMUP calls, then captured and replayed.

    The warm-up calls are real training steps, run on a side stream as PyTorch's CUDA-graph
    notes ask (cuDNN's benchmarking, the optimiser's state and the allocator settle there), so
    the model, BatchNorm buffers and optimiser are exactly what the eager steps leave. Capture
    records without running anything; the graph then replays the same kernels on the same
    tensors. If capture fails (an operation that cannot be captured, a driver or memory
    limit) training goes on eagerly, after ``notice`` says why.
    """

    WARMUP = 3

    def __init__(self, step: TrainStep, notice: Callable[[str], None],
                 capture: Callable = capture_cuda_graph) -> None:
        self.step, self.notice, self.capture = step, notice, capture
        self.cuda = step.batches.device.type == "cuda"
        self.replay: Callable[[], None] | None = None
        self.eager, self.warmed = False, 0

    def __call__(self) -> None:
        if self.replay is not None:
            self.replay()
        elif self.eager:
            self.step()
        elif self.warmed < self.WARMUP:
            self.warmed += 1
            self._on_side_stream()
        else:
            try:
                self.replay = self.capture(self.step)
            except Exception as error:  # any failure: CUDA, an uncapturable op, memory
                self._fall_back(error)
                self.step()
                return
            self.replay()

    def _on_side_stream(self) -> None:
        if not self.cuda:
            return self.step()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)

    def _fall_back(self, error: Exception) -> None:
        """Undo what the failed capture left on the Python side; nothing ran on the device."""
        self.eager = True
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients allocated by the capture
        if self.step.scaler is not None:
            self.step.scaler._per_optimizer_states.clear()  # its per-step bookkeeping
        if self.cuda:
            torch.cuda.synchronize()
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        self.notice(f"notice: the training step could not be captured as a CUDA graph "
                    f"({reason}); training goes on eagerly, with the same results, slower")


def step_runner(step: TrainStep, cuda_graph: bool, runtime: Runtime,
                notice: Callable[[str], None]) -> Callable[[], None]:
    """What runs each step: on one GPU its CUDA graph (``--cuda-graph``), else ``step`` itself."""
    if runtime.device.type != "cuda" or not cuda_graph:
        return step
    if runtime.world_size > 1:
        notice("notice: --cuda-graph: with several processes the step runs eagerly "
               "(DistributedDataParallel's all-reduce is not captured)")
        return step
    return GraphedStep(step, notice)


# ---------------------------------------------------------------- evaluation

@torch.inference_mode()
def evaluate(model: nn.Module, batches, precision: str, runtime: Runtime, num_classes: int,
             tta: bool = False) -> tuple[float, float, Tensor, float | None]:
    """Mean loss, error in percent, the confusion matrix (true x predicted) and, for more than
    TOP5_FROM classes, the top-5 error in percent (else None); over all processes.

    ``batches`` yields (images, labels, valid) as data.eval_batches does: padded rows count
    for nothing.
    """
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
    return loss_sum.item() / count, error, confusion, top5
