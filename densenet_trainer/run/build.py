"""A run built from its configuration, a checkpoint of it, and a trained model for inference.

``build_run`` is where a configuration becomes a run, for train.py, attic/lr_find.py and
bench/ alike: the data (subsets, validation split, normalisation by the training images'
own statistics), the model on its device and in its memory layout, the optimiser, the
gradient scaler and the training batches; then, from a checkpoint when resuming, their
state; then the wrapping, once and in this order: SyncBatchNorm, DistributedDataParallel,
torch.compile; last the training step and what runs it (its CUDA graph on one GPU). The
restore comes before the step, which makes the learning rate a device tensor that loading an
optimiser's state would replace.

``Checkpoint`` is the checkpoint format (``Run.checkpoint`` writes it, ``Checkpoint.load``
reads it back), and ``load_trained`` turns one into a model for inference (train.py
--evaluate, attic/predict.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from densenet import DenseNet
from densenet_trainer.engine import cuda_graph, data, training
from densenet_trainer.engine.runtime import (
    Runtime,
    broadcast,
    environment,
    rng_state,
    seed_everything,
    set_rng_state,
    synchronize,
)
from densenet_trainer.kernels import fused, kernel_check
from densenet_trainer.records.layout import CONFIG_FILE, LAST_CHECKPOINT
from densenet_trainer.run.files import RunError, load_checkpoint
from densenet_trainer.settings.cli import UserError
from densenet_trainer.settings.config import RESUMABLE, RunConfig, flag_name

# What every checkpoint holds; one that lacks any of it was not written by this trainer.
CHECKPOINT_KEYS = ("config", "epoch", "progress", "best", "model", "optimizer", "scaler",
                   "data_rng", "rng", "normalization", "num_classes")
INFERENCE_KEYS = ("config", "epoch", "model", "normalization", "num_classes")


@dataclass
class Checkpoint:
    """A checkpoint file's content, with the run's configuration read back from it."""
    path: Path
    state: dict
    config: RunConfig

    @classmethod
    def load(cls, path: Path, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> Checkpoint:
        """Read checkpoint ``path`` (a run's directory: its checkpoint.pt) safely, as
        runlog.load_checkpoint does, and check that it is the run of its folder
        (``check_folder``); RunError for anything amiss."""
        if path.is_dir():
            path = path / LAST_CHECKPOINT
        state = load_checkpoint(path, keys)
        checkpoint = cls(path, state, RunConfig.from_dict(state["config"], str(path)))
        checkpoint.check_folder()
        return checkpoint

    def check_folder(self) -> None:
        """Refuse a checkpoint that is not the run whose config.json lies beside it: another
        run's identity, or settings that no resume could have changed (a checkpoint copied in
        from elsewhere). A checkpoint with no readable config.json beside it is its own record."""
        try:
            recorded = json.loads((self.path.parent / CONFIG_FILE).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return
        if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
            return
        ours, theirs = self.state.get("run_id"), recorded.get("run_id")
        differ = [name for name, value in recorded["config"].items()
                  if name not in RESUMABLE and name in self.state["config"]
                  and self.state["config"][name] != value]
        if ours and theirs and ours != theirs:
            reason = f"it is run {ours}, the folder's config.json is run {theirs}"
        elif differ:
            reason = ", ".join(f"{flag_name(name)} {self.state['config'][name]} (config.json: "
                               f"{recorded['config'][name]})" for name in differ[:3])
        else:
            return
        raise RunError(f"{self.path} is not the run recorded in {self.path.parent / CONFIG_FILE} "
                       f"({reason}): it was copied in from another run; put this run's own "
                       f"checkpoint back, or use the checkpoint from its own folder")

    @property
    def epoch(self) -> int:
        return self.state["epoch"]


# ---------------------------------------------------------------- the parts

@dataclass
class RunData:
    """The images a run trains, validates and tests on, and its normalisation."""
    train: data.Split
    val: data.Split | None
    test: data.Split
    classes: list[str]
    mean: list[float]
    std: list[float]


def load_data(cfg: RunConfig, log: Callable[..., None]) -> RunData:
    """Read the dataset, apply the validation split and subsets, print the counts."""
    dataset = data.load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.svhn_extra)
    log(f"{cfg.dataset}: found {len(dataset.train)} training and {len(dataset.test)} test "
        f"images in {cfg.data_dir}")
    train, val, test = dataset.train, None, dataset.test
    if cfg.val_size:
        train, val = data.split_validation(train, cfg.val_size, cfg.seed)
    if cfg.train_subset:
        train = train.first(cfg.train_subset)
    if cfg.test_subset:
        test = test.first(cfg.test_subset)
    log(f"using {len(train)} training, {len(val) if val else 0} validation and "
        f"{len(test)} test images")
    mean, std = data.channel_stats(train.images)
    classes = dataset.classes or [str(c) for c in range(cfg.num_classes)]
    return RunData(train, val, test, classes, mean, std)


def build_model(cfg: RunConfig, kernels: str) -> DenseNet:
    """The configuration's DenseNet, computing with ``kernels`` ("fused" or "aten")."""
    return DenseNet(depth=cfg.depth, growth_rate=cfg.growth_rate, bottleneck=cfg.bottleneck,
                    compression=cfg.compression, dropout=cfg.dropout, num_classes=cfg.num_classes,
                    memory_efficient=cfg.memory_efficient, kernels=kernels)


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
    dtype = training.COMPUTE_DTYPES[cfg.precision] or torch.float32
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


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The run's optimiser for ``model``'s parameters, on their device.

    SGD and Adam are the fused implementations: one kernel per step for all parameters, and
    they take the learning rate, the gradient scale and the overflow flag as device tensors.
    RMSprop has no fused form. Adam and RMSprop keep their step count on the device where a
    CUDA graph will capture them ("capturable"; torch refuses to capture them otherwise).
    """
    params = list(model.parameters())
    capturable = params[0].is_cuda and cfg.cuda_graph
    if cfg.opt == "sgd":
        return torch.optim.SGD(params, cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.opt == "adam":
        return torch.optim.Adam(params, cfg.lr, weight_decay=cfg.weight_decay, fused=True,
                                capturable=capturable)
    return torch.optim.RMSprop(params, cfg.lr, weight_decay=cfg.weight_decay, foreach=True,
                               capturable=capturable)


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
            _place_step_counts(target, group)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()
        raise RunError(f"{path} does not fit the model its own config describes ({reason}); "
                       f"use a checkpoint that train.py wrote for this run") from None


def _place_step_counts(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Put the group's step counts where its implementation reads them: on the parameters'
    device for the fused and capturable ones, on the CPU otherwise. load_state_dict placed
    them for the implementation that saved them (a run trained on the CPU, or without the
    graph, and resumed with it would otherwise fail at its first step)."""
    on_device = group.get("fused") or group.get("capturable")
    for param in group["params"]:
        state = optimizer.state.get(param, {})
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].to(param.device if on_device else "cpu", torch.float32)


# ---------------------------------------------------------------- a run

@dataclass
class Run:
    """Everything a run trains with. ``model`` is the network whose state a checkpoint keeps;
    the step runs it wrapped (DistributedDataParallel, torch.compile) where the run says so."""
    config: RunConfig
    runtime: Runtime
    data: RunData
    normalizer: data.Normalizer
    model: nn.Module
    kernels: KernelChoice
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    batches: data.TrainBatches
    step: training.TrainStep
    run_step: Callable[[], None]  # the step itself, or its CUDA graph
    test: data.Split  # on the device
    val: data.Split | None

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def evaluate(self, split: data.Split) -> training.Evaluation:
        """The model on ``split`` (all processes together)."""
        cfg, runtime = self.config, self.runtime
        batches = data.eval_batches(split, cfg.eval_batch_size, self.normalizer, runtime.device,
                                    runtime.rank, runtime.world_size, cfg.channels_last)
        return training.evaluate(self.step.model, batches, cfg.precision, runtime, cfg.num_classes)

    def checkpoint(self, epoch: int, progress: training.EpochProgress, best: dict,
                   data_rng: torch.Tensor) -> dict:
        """What a checkpoint holds after ``epoch`` epochs and ``progress.step`` more steps
        (CHECKPOINT_KEYS); ``data_rng`` plans the epoch that follows."""
        return {"config": self.config.to_dict(), "epoch": epoch, "progress": vars(progress),
                "best": best, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "data_rng": data_rng, "rng": rng_state(),
                "normalization": {"mean": self.data.mean, "std": self.data.std},
                "num_classes": self.config.num_classes,
                "kernels": {"device_type": self.runtime.device.type, "kernels": self.kernels.kernels}}

    @property
    def step_status(self) -> str:
        """Whether the steps run as a CUDA graph (checked, or not yet) or eagerly, and why."""
        if isinstance(self.run_step, cuda_graph.GraphedStep):
            return self.run_step.status
        return f"eager ({cuda_graph.eager_reason(self.config, self.runtime, self.kernels.kernels)})"

    def record(self) -> dict:
        """What config.json says of the run beside its configuration: what it ran on and how."""
        model, device = self.model, self.runtime.device
        return {"model": model.name, "parameters": self.parameters,
                "kernels_used": f"{self.kernels.kernels}{', compiled' if self.config.compile else ''} "
                                f"on {device.type}",
                "kernels_chosen": self.kernels.record(),
                "step": self.step_status,
                "classes": self.data.classes, "train_images": len(self.data.train),
                "test_images": len(self.data.test),
                "val_images": len(self.data.val) if self.data.val else 0,
                "normalization": {"mean": self.data.mean, "std": self.data.std},
                "environment": environment(self.runtime)}


def build_run(cfg: RunConfig, runtime: Runtime, log: Callable[..., None] = print,
              checkpoint: Checkpoint | None = None, *, dataset: RunData | None = None,
              model: nn.Module | None = None) -> Run:
    """The run ``cfg`` describes, continued from ``checkpoint`` if given. ``dataset`` and
    ``model`` replace the configuration's own (bench/'s synthetic images, torchvision's
    DenseNet); ``log`` prints the data's counts and any notice of the step's runner."""
    device = runtime.device
    if cfg.batch_size % runtime.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must be "
                        f"divisible by the {runtime.world_size} processes")
    if cfg.sync_bn and runtime.world_size > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs: SyncBatchNorm does not run on the CPU")
    dataset = dataset or load_data(cfg, log)
    normalizer = data.Normalizer(dataset.mean, dataset.std, device)
    if model is None:
        kernels = choose_kernels(cfg, runtime, log, checkpoint and checkpoint.state.get("kernels"))
    else:
        kernels = KernelChoice(getattr(model, "kernels", "aten"), "a model given to build_run")
    seed_everything(cfg.seed)  # after choose_kernels, whose timing draws random numbers
    model = model or build_model(cfg, kernels.kernels)
    model.to(device, memory_format=data.memory_format(cfg.channels_last))
    optimizer = build_optimizer(cfg, model)
    # fp16 only: bfloat16 has float32's range
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    batches = data.TrainBatches(dataset.train, cfg.batch_size, normalizer, cfg.augment, cfg.seed,
                                device, runtime.rank, runtime.world_size, cfg.channels_last)
    if checkpoint is not None:
        state = checkpoint.state
        restore(model, state["model"], checkpoint.path)
        restore(optimizer, state["optimizer"], checkpoint.path)
        if scaler is not None and state["scaler"]:
            restore(scaler, state["scaler"], checkpoint.path)
        batches.set_state(state["data_rng"])
        set_rng_state(state["rng"])
    if cfg.sync_bn and runtime.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    module = model
    if runtime.world_size > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.kernels == "compile":
        module = torch.compile(module)
    step = training.TrainStep(module, optimizer, batches, cfg.precision, scaler, top5=cfg.top5)
    run_step = cuda_graph.step_runner(step, cfg, kernels.kernels, runtime, log)
    val = dataset.val.to(device) if dataset.val is not None else None
    return Run(cfg, runtime, dataset, normalizer, model, kernels, optimizer, scaler, batches,
               step, run_step, dataset.test.to(device), val)


def build_synthetic_run(cfg: RunConfig, runtime: Runtime, steps: int, model: nn.Module | None = None,
                        log: Callable[..., None] = print) -> Run:
    """``cfg``'s run (model, precision, kernels, graph, compilation: all as build_run makes
    them) on random images, enough for ``steps`` calls after a CUDA graph's warm-up and
    check, which are done: the epoch is started, and ``run.run_step`` is what to time.
    ``model`` replaces ours (bench/'s torchvision DenseNet)."""
    count = cfg.batch_size * (steps + cuda_graph.GraphedStep.CALLS_BEFORE_REPLAYS)
    generator = torch.Generator().manual_seed(0)
    images = data.Split(torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator),
                        torch.randint(0, cfg.num_classes, (count,), generator=generator))
    dataset = RunData(images, None, images.first(cfg.batch_size), [], [0.5] * 3, [0.25] * 3)
    run = build_run(cfg, runtime, log, dataset=dataset, model=model)
    run.step.start_epoch()
    run.step.model.train()
    if run.run_step is not run.step:
        for _ in range(cuda_graph.GraphedStep.CALLS_BEFORE_REPLAYS):
            run.run_step()
    return run


# ---------------------------------------------------------------- inference

@dataclass
class Trained:
    """A trained model, ready for inference: in evaluation mode, on its device, in the run's
    memory layout, with the run's normalisation."""
    checkpoint: Checkpoint
    model: DenseNet
    normalizer: data.Normalizer
    device: torch.device

    @property
    def config(self) -> RunConfig:
        return self.checkpoint.config

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, 32, 32) as the model takes them."""
        normalized = self.normalizer(images.to(self.device))
        return normalized.contiguous(memory_format=data.memory_format(self.config.channels_last))


def load_trained(checkpoint: Checkpoint, device: torch.device) -> Trained:
    """The trained model of ``checkpoint`` (read with at least INFERENCE_KEYS), on ``device``."""
    model = build_model(checkpoint.config, checkpoint.config.kernels_on(device.type))
    restore(model, checkpoint.state["model"], checkpoint.path)
    model.to(device, memory_format=data.memory_format(checkpoint.config.channels_last)).eval()
    normalization = checkpoint.state["normalization"]
    normalizer = data.Normalizer(normalization["mean"], normalization["std"], device)
    return Trained(checkpoint, model, normalizer, device)
