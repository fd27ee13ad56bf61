"""A run built from its configuration: ``build_run`` is where a configuration becomes a
run, for train.py, attic/lr_find.py and bench/ alike.

In this order: the data (subsets, validation split, normalisation by the training images'
own statistics); the kernels (kernel_choice.py); the model on its device and in its memory
layout, the learning rate, the optimiser, the gradient scaler and the training batches;
then, from a checkpoint when resuming, their state (checkpoint.py); then the wrapping, once
and in this order: SyncBatchNorm, DistributedDataParallel, torch.compile; last the training
step and what runs it (its CUDA graph on one GPU).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch
from torch import nn

from densenet import DenseNet
from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.data import datasets, loader
from densenet_trainer.loop import evaluation, training
from densenet_trainer.loop.training import LearningRate, TrainStep, build_optimizer
from densenet_trainer.provenance import code_version, environment
from densenet_trainer.random_state import rng_state, seed_everything, set_rng_state
from densenet_trainer.run.checkpoint import BestEpochs, Checkpoint, restore
from densenet_trainer.run.files import RunError
from densenet_trainer.runtime import Runtime
from densenet_trainer.speed import apply_fused_kernels, cuda_graph, fused_gemm
from densenet_trainer.speed.fused_densenet import kernels_of
from densenet_trainer.speed.kernel_choice import (
    FUSED,
    KernelChoice,
    choose_kernels,
    confirm_on_model,
    time_steps,
)
from densenet_trainer.speed.precision import precision_of


@dataclass
class RunData:
    """The images a run trains, validates and tests on, and its normalisation."""
    train: datasets.Split
    val: datasets.Split | None
    test: datasets.Split
    classes: list[str]
    mean: list[float]
    std: list[float]
    pool: datasets.Split | None = None  # with a validation set: the training images it was drawn from

    @functools.cached_property
    def identity(self) -> dict[str, dict]:
        """Which images, by split: their count and fingerprint, and with a validation set
        those of the pool it was drawn from (the seed draws; the pool is what the user
        chose). config.json and every checkpoint keep it; a resume on other images is refused."""
        splits = {"train": self.train, "val": self.val, "test": self.test, "pool": self.pool}
        return {name: {"images": len(split), "fingerprint": split.fingerprint()}
                for name, split in splits.items() if split is not None}


def check_same_data(checkpoint: Checkpoint, dataset: RunData, data_dir: str) -> None:
    """RunError where the images found are not those the checkpoint's run trained on (a run
    of an earlier version, which recorded none, is taken as it is)."""
    recorded = checkpoint.state.get("data")
    if not isinstance(recorded, dict):
        return
    for split, found in dataset.identity.items():
        theirs = recorded.get(split)
        if split == "pool" and theirs is None:  # recorded by a version before pools
            continue
        if theirs == found:
            continue
        what = (f"{found['images']:,} images where the run had {theirs['images']:,}"
                if isinstance(theirs, dict) and theirs.get("images") != found["images"] else
                f"fingerprint {found['fingerprint']}, the run's {(theirs or {}).get('fingerprint')}")
        raise RunError(f"the {split} images found in {data_dir} are not those {checkpoint.path} "
                       f"trained on ({what}); point --data-dir at the run's data")


def load_data(cfg: RunConfig, log: Callable[..., None]) -> RunData:
    """Read the dataset, apply the validation split and subsets, print the counts."""
    dataset = datasets.load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.svhn_extra)
    log(f"{cfg.dataset}: found {len(dataset.train)} training and {len(dataset.test)} test "
        f"images in {cfg.data_dir}")
    train, val, test = dataset.train, None, dataset.test
    if cfg.val_size:
        train, val = datasets.split_validation(train, cfg.val_size, cfg.seed)
    pool = dataset.train if cfg.val_size else None
    for flag, asked, found in (("train", cfg.train_subset, train), ("test", cfg.test_subset, test)):
        if asked and asked > len(found):
            log(f"notice: --{flag}-subset {asked} is more than the {len(found)} {flag} images there: all are used")
    if cfg.train_subset:
        train = train.first(cfg.train_subset)
    if cfg.test_subset:
        test = test.first(cfg.test_subset)
    log(f"using {len(train)} training, {len(val) if val else 0} validation and "
        f"{len(test)} test images")
    mean, std = datasets.channel_stats(train.images)
    classes = dataset.classes or [str(c) for c in range(cfg.num_classes)]
    return RunData(train, val, test, classes, mean, std, pool)


def build_model(cfg: RunConfig, kernels: str, device: torch.device) -> DenseNet:
    """The configuration's DenseNet on ``device`` in the run's memory layout, computing with
    ``kernels`` ("fused" or "fused-gemm": apply_fused_kernels, which leaves it on ATen's where
    the kernels failed their self-test there, with a warning; or "aten"). fused-gemm where
    its GEMMs are unavailable (an --evaluate on the CPU) is fused: the same function."""
    model = DenseNet(depth=cfg.depth, growth_rate=cfg.growth_rate, bottleneck=cfg.bottleneck,
                     compression=cfg.compression, dropout=cfg.dropout, num_classes=cfg.num_classes,
                     memory_efficient=cfg.memory_efficient)
    model.to(device, memory_format=loader.memory_format(cfg.channels_last))
    if kernels in FUSED:
        apply_fused_kernels(model, gemm=kernels == "fused-gemm" and not fused_gemm.unavailable(device.type))
    return model


@dataclass
class Run:
    """Everything a run trains with. ``model`` is the network whose state a checkpoint keeps;
    the step runs it wrapped (DistributedDataParallel, torch.compile) where the run says so."""
    config: RunConfig
    runtime: Runtime
    data: RunData
    normalizer: loader.Normalizer
    model: nn.Module
    kernel_choice: KernelChoice
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    batches: loader.TrainBatches
    lr: LearningRate  # the optimiser's; the schedule sets it before each epoch
    step: TrainStep
    run_step: Callable[[], None]  # the step itself, or its CUDA graph
    test: datasets.Split  # on the device
    val: datasets.Split | None
    startup: dict[str, float] = field(default_factory=dict)  # seconds by phase
    log: Callable[..., None] = print  # notices, on the main process
    evaluations: dict[str, evaluation.EvaluationRunner] = field(default_factory=dict)  # by split, made at first use

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def evaluate(self, split: str) -> evaluation.Evaluation:
        """The model on the "test" or "val" split (all processes together)."""
        return evaluation.read_evaluation(self.evaluation_of(split), self.runtime)

    def evaluate_splits(self) -> Generator[None, None, dict[str, evaluation.Evaluation]]:
        """The model on the test split and, with --val-size, the validation one: both queued
        on the device, then after a yield read (with several runs in the process, loop/turns.py,
        the others queue their steps meanwhile), by split."""
        start = time.perf_counter()
        runners = {split: self.evaluation_of(split) for split in ["test"] + (["val"] if self.val is not None else [])}
        self.step.model.eval()  # what the step runs (wrapped where the run wraps it)
        for runner in runners.values():
            runner()
        yield
        return {split: evaluation.read_sums(runner, self.runtime, start) for split, runner in runners.items()}

    def evaluation_of(self, split: str) -> evaluation.EvaluationRunner:
        """What evaluates ``split``: its batches, sums and graph, made once and kept."""
        cfg, runtime = self.config, self.runtime
        if split not in self.evaluations:
            batches = loader.EvalBatches({"test": self.test, "val": self.val}[split], cfg.eval_batch_size,
                                       self.normalizer, runtime.device, runtime.rank,
                                       runtime.world_size, cfg.channels_last)
            sums = evaluation.EvaluationSums(self.step.model, self.step.precision, cfg.num_classes,
                                             runtime.device)
            self.evaluations[split] = cuda_graph.evaluation_runner(sums, batches, cfg, runtime, self.log)
        return self.evaluations[split]

    @property
    def evaluation_status(self) -> dict[str, str]:
        """How each split is evaluated (graphed, or eager and why), by split; before its first
        evaluation, how it will be."""
        reason = cuda_graph.evaluation_eager_reason(self.config, self.runtime)
        before = f"eager ({reason})" if reason else "graphed (not captured yet)"
        splits = ["test"] + (["val"] if self.val is not None else [])
        return {split: self.evaluations[split].status if split in self.evaluations else before
                for split in splits}

    @property
    def graphed(self) -> bool:
        """Whether the steps run as a CUDA graph (once captured and checked)."""
        return isinstance(self.run_step, cuda_graph.GraphedStep)

    @property
    def step_status(self) -> str:
        """Whether the steps run as a CUDA graph (checked, or not yet) or eagerly, and why."""
        if self.graphed:
            return self.run_step.status
        return f"eager ({cuda_graph.eager_reason(self.config, self.runtime, self.kernel_choice.kernels)})"

    def checkpoint_state(self, epoch: int, progress: training.EpochProgress, best: BestEpochs,
                         data_rng: torch.Tensor) -> dict:
        """What the run's checkpoint holds after ``epoch`` epochs and ``progress.step`` more
        steps (checkpoint.CHECKPOINT_KEYS); ``data_rng`` plans the epoch that follows."""
        return {"config": self.config.to_dict(), "epoch": epoch, "progress": vars(progress),
                "best": best.state(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "data_rng": data_rng, "rng": rng_state(),
                "normalization": {"mean": self.data.mean, "std": self.data.std},
                "num_classes": self.config.num_classes, "data": self.data.identity,
                "kernels": {"device_type": self.runtime.device.type,
                            "kernels": self.kernel_choice.kernels}}

    def record(self) -> dict:
        """What config.json says of the run beside its configuration: what it ran on and how."""
        model, device = self.model, self.runtime.device
        return {"model": model.name, "parameters": self.parameters,
                "kernels_used": f"{self.kernel_choice.kernels}{', compiled' if self.config.compile else ''} "
                                f"on {device.type}",
                "kernels_chosen": self.kernel_choice.record(),
                "step": self.step_status, "evaluation": self.evaluation_status,
                "classes": self.data.classes, "train_images": len(self.data.train),
                "test_images": len(self.data.test),
                "val_images": len(self.data.val) if self.data.val else 0,
                "data": self.data.identity,
                "normalization": {"mean": self.data.mean, "std": self.data.std},
                "environment": environment(self.runtime), "code": code_version(),
                "jobs": self.runtime.jobs, "startup_seconds": self.startup}


def build_run(cfg: RunConfig, runtime: Runtime, log: Callable[..., None] = print,
              checkpoint: Checkpoint | None = None, *, dataset: RunData | None = None,
              model: nn.Module | None = None, self_test: bool = True,
              kernel_choice: KernelChoice | None = None) -> Run:
    """The run ``cfg`` describes, continued from ``checkpoint`` if given. ``dataset`` and
    ``model`` replace the configuration's own (bench/'s synthetic images, torchvision's
    DenseNet; train.py --seeds's images read once for all seeds); ``kernel_choice`` is one
    made already (--seeds: once for all); ``log`` prints the data's counts and any notice of
    the step's runner.
    ``self_test`` False skips the fused model's check on the run's first batches (bench/'s
    kernel count, whose kernels only count)."""
    device = runtime.device
    if cfg.batch_size % runtime.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must be "
                        f"divisible by the {runtime.world_size} processes")
    if cfg.sync_bn and runtime.world_size == 1:
        raise UserError("--sync-bn synchronises BatchNorm across torchrun's processes, and this "
                        "run has one: drop it (or start the run with torchrun)")
    if cfg.sync_bn and runtime.world_size > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs: SyncBatchNorm does not run on the CPU")
    began = time.perf_counter()
    dataset = dataset or load_data(cfg, log)
    normalizer = loader.Normalizer(dataset.mean, dataset.std, device)
    loaded = time.perf_counter()
    if model is not None:
        kernel_choice = KernelChoice(kernels_of(model), "a model given to build_run")
        model.to(device, memory_format=loader.memory_format(cfg.channels_last))
    elif kernel_choice is None:  # the fused kernels' self-test, and on a GPU the timing of each set
        kernel_choice = choose_kernels(cfg, runtime, log, checkpoint and checkpoint.state.get("kernels"),
                                       functools.partial(time_steps, build_synthetic_run, cfg, runtime))
    chosen = time.perf_counter()
    seed_everything(cfg.seed)  # after choose_kernels, whose timing draws random numbers
    model = model or build_model(cfg, kernel_choice.kernels, device)
    lr = LearningRate(cfg.lr, device)
    optimizer = build_optimizer(cfg, model, lr)
    # fp16 only: bfloat16 has float32's range
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    batches = loader.TrainBatches(dataset.train, cfg.batch_size, normalizer, cfg.augment, cfg.seed,
                                device, runtime.rank, runtime.world_size, cfg.channels_last)
    if checkpoint is not None:
        state = checkpoint.state
        check_same_data(checkpoint, dataset, cfg.data_dir)
        if state["progress"]["step"] >= batches.steps:
            raise RunError(f"{checkpoint.path} stopped at step {state['progress']['step']} of "
                           f"epoch {checkpoint.epoch + 1}, but an epoch of the {len(dataset.train)} "
                           f"training images found has {batches.steps} step(s): these are not the "
                           f"images the run trained on; point --data-dir at those")
        restore(model, state["model"], checkpoint.path)
        restore(optimizer, state["optimizer"], checkpoint.path)
        if scaler is not None and state["scaler"]:
            restore(scaler, state["scaler"], checkpoint.path)
        batches.set_state(state["data_rng"])
        set_rng_state(state["rng"])
    test_seconds = None
    if kernel_choice.kernels in FUSED and self_test:  # the run's own shapes, fused against ATen's
        testing = time.perf_counter()
        kernel_choice = confirm_on_model(kernel_choice, model, *first_batches(batches, dataset, cfg, runtime),
                                         cfg.precision, runtime, log)
        test_seconds = time.perf_counter() - testing
    if cfg.sync_bn and runtime.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    module = model
    if runtime.world_size > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.kernels == "compile":
        module = torch.compile(module)
    step = TrainStep(module, optimizer, batches, precision_of(module, cfg.precision), scaler, top5=cfg.top5)
    run_step = cuda_graph.step_runner(step, cfg, kernel_choice.kernels, runtime, log)
    val = dataset.val.to(device) if dataset.val is not None else None
    startup = {"data": loaded - began, "kernels": chosen - loaded,
               "model": time.perf_counter() - chosen - (test_seconds or 0)}
    if test_seconds is not None:
        startup["self-test"] = test_seconds
    return Run(cfg, runtime, dataset, normalizer, model, kernel_choice, optimizer, scaler, batches,
               lr, step, run_step, dataset.test.to(device), val,
               {phase: round(seconds, 3) for phase, seconds in startup.items()}, log)


def first_batches(batches: loader.TrainBatches, dataset: RunData, cfg: RunConfig,
                  runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's first training batch (images, labels; not augmented, which keeps the
    shapes) and as many of its first evaluation batch's images (a map's pixels stay multiples
    of 64 however many images: the same kernel variants), in the run's memory layout."""
    images = batches.normalizer(batches.images[:batches.share]).contiguous(memory_format=batches.memory_format)
    evaluation_batches = loader.EvalBatches(dataset.test, cfg.eval_batch_size, batches.normalizer,
                                            runtime.device, runtime.rank, runtime.world_size,
                                            cfg.channels_last)
    first = torch.zeros(1, dtype=torch.int64, device=dataset.test.labels.device)
    return images, batches.labels[:batches.share], evaluation_batches.batch(first)[0][:batches.share]


def build_synthetic_run(cfg: RunConfig, runtime: Runtime, steps: int, model: nn.Module | None = None,
                        log: Callable[..., None] = print, self_test: bool = True,
                        kernel_choice: KernelChoice | None = None) -> Run:
    """``cfg``'s run (model, precision, kernels, graph, compilation: all as build_run makes
    them) on random images, enough for ``steps`` calls after a CUDA graph's warm-up and
    check, which are done: the epoch is started, and ``run.run_step`` is what to time.
    ``model`` replaces ours (bench/'s torchvision DenseNet)."""
    count = cfg.batch_size * (steps + cuda_graph.GraphedStep.CALLS_BEFORE_REPLAYS)
    generator = torch.Generator().manual_seed(0)
    images = datasets.Split(torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator),
                        torch.randint(0, cfg.num_classes, (count,), generator=generator))
    dataset = RunData(images, None, images.first(cfg.batch_size), [], [0.5] * 3, [0.25] * 3)
    run = build_run(cfg, runtime, log, dataset=dataset, model=model, self_test=self_test,
                    kernel_choice=kernel_choice)
    run.step.start_epoch()
    run.step.model.train()
    if run.run_step is not run.step:
        for _ in range(cuda_graph.GraphedStep.CALLS_BEFORE_REPLAYS):
            run.run_step()
    return run

