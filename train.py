#!/usr/bin/env python3
"""Train a DenseNet or DenseNet-BC on CIFAR-10, CIFAR-100 or SVHN with the paper's recipe.

Defaults are those of Huang et al. (arXiv 1608.06993): DenseNet-BC L=100 k=12, SGD with
Nesterov momentum 0.9, weight decay 1e-4, batch 64, 300 epochs (40 for SVHN), learning rate
0.1 divided by 10 at 50% and 75% of the epochs, standard augmentation.

After every epoch one row goes to train.csv and test.csv (and val.csv with --val-size) in
the work directory, and the checkpoint is replaced atomically. A work directory that holds
a run is never overwritten: --resume continues it exactly where it stopped, and one process
at a time works in it. A NaN or infinite loss or weight stops the run before it is saved.

Examples:
  ./train.py                                        # DenseNet-BC-100-12 on CIFAR-10
  ./train.py --depth 40 --no-bottleneck --compression 1 --epochs 15 --data-dir ../shared/data
  ./train.py --resume --save work/cifar10-densenet-bc-100-12
  torchrun --nproc_per_node=4 ./train.py --depth 190 --growth-rate 40
  ./train.py --evaluate work/cifar10-densenet-bc-100-12/checkpoint.pt --tta
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import cli
import data
import training
from cli import OneLineParser, UserError
from densenet import KERNELS, check_config, model_name
from training import Runtime, TrainStep, setup_runtime
from runlog import (CsvLog, RunError, WorkDirLock, holds_run, load_checkpoint, non_finite,
                    remove_stale_temporaries, save_checkpoint, write_errors, write_json, write_text)

TRAIN_COLUMNS = ["epoch", "lr", "loss", "error", "seconds", "images_per_s"]
EVAL_COLUMNS = ["epoch", "loss", "error", "seconds"]
# Flags that may differ when resuming: they change speed or length, not the run's numbers
# (a longer --epochs may change the schedule: see check_schedule).
RESUMABLE_CHANGES = {"epochs", "device", "channels_last", "compile", "kernels", "cuda_graph",
                     "memory_efficient",
                     "data_dir", "download", "eval_batch_size", "save", "resume", "stop_after"}
# What every checkpoint holds; one that lacks any of it was not written by this trainer.
CHECKPOINT_KEYS = ("config", "epoch", "progress", "best", "model", "optimizer", "scaler",
                   "data_rng", "rng", "normalization", "num_classes")
# Steps between progress updates and non-finite-loss checks. On a GPU each check waits for
# the queued work, so it is rare; on the CPU every step is synchronous anyway.
CHECK_EVERY = {"cuda": 50, "cpu": 1}
BEST_CHECKPOINT = "best.pt"  # with --val-size: the epoch of lowest validation error
PROGRESS_SECONDS = 30  # without a terminal, a progress line this often (and at each quarter)


class Diverged(Exception):
    """A loss or a weight became NaN or infinite: the run stops before saving (exit status 1)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was saved at a safe point."""

    def __init__(self, signum: int, save: Path, epoch: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} in epoch {epoch} after "
                         f"step {step}; saved. Resume with: {sys.argv[0]} --resume --save {save}")
        self.signum = signum


# ---------------------------------------------------------------- command line

def build_parser(tool: bool = False) -> argparse.ArgumentParser:
    """train.py's flags; ``tool``: for a tool that builds a run's model and data from them
    (attic/lr_find.py, bench/pipeline.py), without those that resume, stop or evaluate a run."""
    p = OneLineParser(
        description=__doc__.split("\n\n")[0],
        epilog="Table 2 of the paper as flags: see README.md. Errors are one line and exit 2.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=data.DATASETS, help="which dataset")
    g.add_argument("--data-dir", default="data",
                   help="torchvision-style root: holds cifar-10-batches-py/, cifar-100-python/ or svhn/")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download the dataset through torchvision when it is absent")
    g.add_argument("--svhn-extra", action=argparse.BooleanOptionalAction, default=True,
                   help="SVHN: train on train+extra, as the paper does")
    g.add_argument("--val-size", type=cli.count, default=0,
                   help="hold this many training images out as a validation set (paper: 5000)")
    g.add_argument("--train-subset", type=cli.count, default=0,
                   help="train on the first N training images only (0: all), for quick experiments")
    g.add_argument("--test-subset", type=cli.count, default=0, help="test on the first N test images only (0: all)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="4-pixel padding, random 32x32 crop, random horizontal flip (the paper's "
                        "'+'; default on for CIFAR, off for SVHN as in the paper)")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=100, help="L: layers with weights")
    g.add_argument("--growth-rate", type=int, default=12, help="k: feature maps per layer")
    g.add_argument("--bottleneck", action=argparse.BooleanOptionalAction, default=True,
                   help="1x1 conv to 4k maps before each 3x3 conv (the B of DenseNet-BC)")
    g.add_argument("--compression", type=float, default=0.5,
                   help="theta: transitions keep floor(theta*m) maps (1: no compression)")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout after each conv but the first (default 0, or 0.2 with --no-augment)")
    g.add_argument("--memory-efficient", action="store_true",
                   help="store only conv outputs, recompute BN and ReLU in backward: "
                        "memory linear in depth, same results, slightly slower steps")
    g = p.add_argument_group("optimisation")
    g.add_argument("--opt", default="sgd", choices=["sgd", "adam", "rmsprop"], help="optimiser")
    g.add_argument("--lr", type=cli.positive_float, default=None, help="initial learning rate (default 0.1 for sgd, 0.001 otherwise)")
    g.add_argument("--schedule", default="step", choices=["step", "cosine"],
                   help="step: divide by 10 at 50%% and 75%% of the epochs; cosine: anneal to 0")
    g.add_argument("--momentum", type=cli.float_range(0, 1, high_open=True), default=0.9,
                   help="SGD Nesterov momentum, in [0, 1)")
    g.add_argument("--weight-decay", type=cli.non_negative_float, default=1e-4,
                   help="L2 penalty on all weights")
    g.add_argument("--epochs", type=cli.positive_int, default=None, help="default 300, or 40 for SVHN")
    g.add_argument("--batch-size", type=cli.positive_int, default=64, help="global batch, over all processes")
    g.add_argument("--seed", type=cli.seed, default=0,
                   help="seeds initialisation, data order and augmentation (0 to 2**32 - 1)")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: a GPU when there is one")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision; fp16 uses a gradient scaler")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout (faster on tensor-core GPUs; on the CPU it enables "
                        "the fused dense blocks of fused.py)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, capture the whole training step as one CUDA graph after 3 "
                        "eager steps and replay it (one process; if capture fails, the run goes "
                        "on eagerly and says why)")
    g.add_argument("--kernels", default="auto", choices=["auto", *KERNELS, "compile"],
                   help="how dense blocks and BatchNorm-ReLU run: fused (fused.py: C loops on "
                        "the CPU in float32, Triton on CUDA in float32 or bf16), aten (PyTorch's "
                        "operations), compile "
                        "(torch.compile of the aten model; inside the CUDA graph on a GPU); auto: "
                        "fused on the CPU in float32, aten otherwise (the Triton path is not yet "
                        "measured on a GPU). Same results, different speed")
    g.add_argument("--compile", action="store_true", help="the same as --kernels compile")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (torchrun)")
    g.add_argument("--eval-batch-size", type=cli.positive_int, default=500, help="batch size for evaluation")
    g = p.add_argument_group("run")
    g.add_argument("--save", default=None, help="work directory (default work/<dataset>-<model name>)")
    if tool:
        return p
    g.add_argument("--resume", action="store_true", help="continue the run in --save from its checkpoint")
    g.add_argument("--stop-after", type=cli.count, default=0, metavar="EPOCH",
                   help="end this session after EPOCH (0: run all epochs); continue later with --resume")
    g.add_argument("--reschedule", action="store_true",
                   help="with --resume and a larger --epochs: accept the new length's schedule "
                        "even where it raises the learning rate above the last one trained "
                        "(without it such a resume is refused, naming the lr it would use)")
    g.add_argument("--evaluate", metavar="CHECKPOINT", default=None,
                   help="only report the test error of a checkpoint file or of a run's directory "
                        "(its checkpoint.pt), on the data the run was trained on (or --data-dir); "
                        "writes CHECKPOINT-classes.csv and CHECKPOINT-confusion.csv beside it "
                        "(-classes-tta.csv, -confusion-tta.csv with --tta)")
    g.add_argument("--tta", action="store_true", help="with --evaluate: average over horizontal flips")
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
               ) -> tuple[argparse.Namespace, set[str]]:
    """The flags with defaults filled in, and the names of those given on the command line.

    ``parser`` lets other tools (attic/, bench/) add their own flags to the trainer's.
    """
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(parser.parse_args(argv)))
    if args.epochs is None:
        args.epochs = 40 if args.dataset == "svhn" else 300
    if args.augment is None:
        args.augment = args.dataset != "svhn"
    if args.lr is None:
        args.lr = 0.1 if args.opt == "sgd" else 0.001
    if args.dropout is None:
        args.dropout = 0.0 if args.augment else 0.2
    if args.compile:  # --compile is --kernels compile; both are kept, in agreement
        args.kernels = "compile"
    args.compile = args.kernels == "compile"
    if explicit & {"compile", "kernels"}:
        explicit |= {"compile", "kernels"}
    return args, explicit


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible combinations before any file is touched (each flag's own range is
    checked by its argparse type). attic/ and bench/ tools that take these flags call it too."""
    try:
        check_config(args.depth, args.growth_rate, args.bottleneck, args.compression, args.dropout)
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if getattr(args, "tta", False) and not args.evaluate:
        raise UserError("--tta only applies with --evaluate CHECKPOINT")
    if getattr(args, "reschedule", False) and not args.resume:
        raise UserError("--reschedule only applies with --resume")


def run_config(args: argparse.Namespace) -> dict:
    """The flags that define a run, as stored in config.json and the checkpoint."""
    skip = {"evaluate", "tta", "reschedule"}  # what one invocation does, not what the run is
    return {k: v for k, v in vars(args).items() if k not in skip}


# ---------------------------------------------------------------- set-up

def prepare_data(cfg: dict, runtime: Runtime, log) -> tuple[data.Dataset, data.Split | None]:
    """Load the dataset, apply subsets and the validation split, print the counts."""
    dataset = data.load_dataset(cfg["dataset"], cfg["data_dir"], cfg["download"], cfg["svhn_extra"])
    log(f"{cfg['dataset']}: found {len(dataset.train)} training and {len(dataset.test)} test "
        f"images in {cfg['data_dir']}")
    val = None
    if cfg["val_size"]:
        dataset.train, val = data.split_validation(dataset.train, cfg["val_size"], cfg["seed"])
    if cfg["train_subset"]:
        dataset.train = dataset.train.first(cfg["train_subset"])
    if cfg["test_subset"]:
        dataset.test = dataset.test.first(cfg["test_subset"])
    log(f"using {len(dataset.train)} training, {len(val) if val else 0} validation and "
        f"{len(dataset.test)} test images")
    return dataset, val


# ---------------------------------------------------------------- training and evaluation

class StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop at the next safe point; a second one kills."""

    def __init__(self) -> None:
        self.signum = self.agreed = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._request)

    def _request(self, signum, frame) -> None:
        if self.signum:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def requested(self, runtime: Runtime) -> int:
        """The signal to stop for, agreed by every process (0: go on); kept in ``agreed``."""
        self.agreed = self.signum
        if runtime.world_size > 1:
            flag = torch.tensor([self.signum], device=runtime.device)
            dist.all_reduce(flag, dist.ReduceOp.MAX)
            self.agreed = int(flag.item())
        return self.agreed


def all_sum(values: list[float], runtime: Runtime) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    if runtime.world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


@dataclass
class EpochProgress:
    """Sums of the epoch so far; saved in a mid-epoch checkpoint."""
    step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    correct5: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0


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
    """Without a terminal (nohup, a batch scheduler's log): a plain line every PROGRESS_SECONDS
    and at 25, 50 and 75% of the epoch, indented so that it never reads as an epoch's result."""

    def __init__(self, epoch: int, epochs: int, steps: int, start_step: int) -> None:
        self.epoch, self.steps, self.start_step = epoch, steps, start_step
        self.marks = [math.ceil(steps * q / 4) for q in (1, 2, 3)]
        self.marks = [m for m in self.marks if start_step < m < steps]
        self.last = time.perf_counter()

    def due(self, done: int) -> bool:
        if done == self.steps:  # the epoch's own line follows
            return False
        quarter = bool(self.marks) and done >= self.marks[0]
        return quarter or time.perf_counter() - self.last >= PROGRESS_SECONDS

    def show(self, done: int, loss: float, error: float, images_per_s: float, elapsed: float) -> None:
        while self.marks and done >= self.marks[0]:
            self.marks.pop(0)
        self.last = time.perf_counter()
        eta = (self.steps - done) * elapsed / max(done - self.start_step, 1)
        print(f"  epoch {self.epoch}: step {done}/{self.steps} ({100 * done // self.steps}%)  "
              f"loss {loss:.4f}  error {error:.2f}%  {images_per_s:,.0f} img/s  "
              f"epoch ends in {eta:.0f} s", flush=True)

    def close(self) -> None:
        pass


def train_epoch(step: TrainStep, run_step, runtime: Runtime, epoch: int, progress: EpochProgress,
                stop: StopFlag, display: ProgressBar | ProgressLines | None) -> EpochProgress:
    """Train one epoch from ``progress.step``; returns the sums (global over processes).

    ``run_step`` is ``step`` itself or its CUDA graph. Losses and the correct count stay on
    the device and are read every CHECK_EVERY steps, between steps: the step never waits.
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
            window = step.losses[first:done]
            finite = torch.isfinite(window)
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
    steps_run = done - progress.step
    loss_sum, correct_sum, correct5_sum, seen_sum = all_sum(
        [step.losses[progress.step:done].double().sum().item() * share, step.correct.item(),
         step.correct5.item(), steps_run * share], runtime)
    return EpochProgress(done, progress.loss_sum + loss_sum, progress.correct + correct_sum,
                         progress.correct5 + correct5_sum, progress.seen + seen_sum,
                         progress.seconds + time.perf_counter() - start)


# ---------------------------------------------------------------- the run

@dataclass
class RunPlan:
    """What this start or resume will do, decided before any file is written."""
    cfg: dict
    state: dict | None = None  # the checkpoint to continue from
    changes: dict = field(default_factory=dict)  # flags that differ at this resume
    config_json: dict | None = None  # config.json as found, to append this resume to
    note: str = ""  # a line to print about the schedule

    @property
    def start_epoch(self) -> int:
        return self.state["epoch"] if self.state else 0


def resumed_config(saved: dict, args: argparse.Namespace, explicit: set[str],
                   save: Path) -> tuple[dict, dict]:
    """The saved run's flags, updated by the flags given now that may change on resume.

    Returns (config, changes). A given flag that would change the run's numbers is refused.
    """
    given = run_config(args)
    # a speed flag newer than the run takes its value from this command
    saved = {**{k: given[k] for k in RESUMABLE_CHANGES if k in given}, **saved}
    lacking = sorted(set(given) - set(saved))
    if lacking:
        raise RunError(f"the run in {save} was saved without --{lacking[0].replace('_', '-')}: "
                       f"it is not a run of this trainer; start a new run with another --save")
    changes = {k: given[k] for k in explicit if k in given and given[k] != saved[k]}
    fixed = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
    if fixed:
        described = ", ".join(f"--{k.replace('_', '-')} {v} (the run has {saved[k]})"
                              for k, v in sorted(fixed.items()))
        raise UserError(f"--resume: {described} would change the run in {save}; "
                        f"drop these flags or start a new run with --save")
    return {**saved, **changes}, changes


def check_schedule(saved: dict, cfg: dict, start_epoch: int, partial: bool, reschedule: bool,
                   save: Path) -> str:
    """Refuse an --epochs on resume that would shorten the run or raise its learning rate.

    The run continues in 0-based ``start_epoch`` (``partial``: some of its steps are done).
    A new length whose schedule gives every epoch trained so far the learning rate it had is
    exact, as if the run had started with it. Any other length is a new schedule from here
    on: accepted where the next learning rate is no higher than the last one trained (say,
    more epochs at the final rate of a finished run), refused where it would jump back up
    unless ``reschedule``. Returns what changed, to print and record ('' when exact).
    """
    epochs, planned = cfg["epochs"], saved["epochs"]
    trained = start_epoch + partial
    if epochs < planned and epochs <= trained:
        raise UserError(f"--epochs {epochs}: the run in {save} has trained {trained} of its "
                        f"{planned} epochs and cannot be shortened to {epochs}; resume without "
                        f"--epochs to finish it, or pass a larger --epochs")
    had = [training.learning_rate(saved, epoch) for epoch in range(trained)]
    if epochs == planned or had == [training.learning_rate(cfg, epoch) for epoch in range(trained)]:
        return ""
    following = training.learning_rate(cfg, start_epoch)
    change = (f"the {trained} epoch(s) trained followed the schedule of --epochs {planned}, the "
              f"last at lr {had[-1]:.3g}; under --epochs {epochs}, epoch {start_epoch + 1} trains "
              f"at lr {following:.3g}")
    if following > had[-1] and not reschedule:
        raise UserError(f"--epochs {epochs} would raise the learning rate: {change}; add "
                        f"--reschedule to accept that, or resume without --epochs")
    return change


def read_config_json(save: Path, has_checkpoint: bool) -> dict | None:
    """config.json of a run (None when absent); a damaged one is refused."""
    path = save / "config.json"
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        content = None
    if not isinstance(content, dict) or not isinstance(content.get("config"), dict):
        fix = ("move it away and resume again (checkpoint.pt holds the run's flags; a new "
               "config.json is written)" if has_checkpoint else
               "there is no checkpoint either: start a new run with another --save")
        raise RunError(f"{path} is damaged; {fix}")
    return content


def run_logs(save: Path, cfg: dict) -> dict[str, CsvLog]:
    """The run's CSV files; with more than TOP5_FROM classes each also has a top5_error column
    (except in a run logged before there was one, which keeps its columns)."""
    top5 = ["top5_error"] if data.NUM_CLASSES[cfg["dataset"]] > training.TOP5_FROM else []

    def log(name: str, columns: list[str]) -> CsvLog:
        path = save / name
        try:
            with open(path) as f:
                earlier = f.readline().rstrip("\n") == ",".join(columns)
        except (OSError, UnicodeDecodeError):
            earlier = False
        return CsvLog(path, columns if earlier else columns + top5)

    splits = ["train", "test"] + (["val"] if cfg["val_size"] else [])
    return {split: log(f"{split}.csv", TRAIN_COLUMNS if split == "train" else EVAL_COLUMNS)
            for split in splits}


def plan_run(save: Path, args: argparse.Namespace, explicit: set[str]) -> RunPlan:
    """Decide what to do in ``save``, refusing what cannot start or continue exactly.

    Reads only: a refused start or resume leaves every file as it was.
    """
    if not args.resume:
        if holds_run(save):
            raise UserError(f"{save} already holds a run; continue it with --resume --save {save} "
                            f"or start a new one with another --save DIR")
        return RunPlan(run_config(args))
    checkpoint = save / "checkpoint.pt"
    state = load_checkpoint(checkpoint, CHECKPOINT_KEYS) if checkpoint.exists() else None
    config_json = read_config_json(save, state is not None)
    if state is not None:
        saved = state["config"]
    elif config_json is None:
        raise UserError(f"{save} holds no run to resume (no checkpoint.pt or config.json); "
                        f"start a new run without --resume")
    elif max(run_logs(save, config_json["config"])["train"].epochs(), default=0) > 1:
        # rows are appended before each checkpoint, so only epoch 1 can be logged without one
        raise UserError(f"{save} has epochs logged in train.csv but no checkpoint.pt to continue "
                        f"from; put the checkpoint back, or start a new run with another --save")
    else:  # stopped before its first checkpoint: start over with its flags (epoch 1 again)
        saved = config_json["config"]
    cfg, changes = resumed_config(saved, args, explicit, save)
    plan = RunPlan(cfg, state, changes, config_json)
    partial = bool(state and state["progress"]["step"])
    plan.note = check_schedule(saved, cfg, plan.start_epoch, partial, args.reschedule, save)
    if plan.note:
        changes["schedule"] = plan.note
    for log in run_logs(save, cfg).values():
        log.check_resumable(plan.start_epoch)
    return plan


def environment(runtime: Runtime) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "host": platform.node(), "device": str(runtime.device),
            "world_size": runtime.world_size, "threads": torch.get_num_threads()}
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info


def open_work_dir(save: Path, plan: RunPlan, extra: dict) -> dict[str, CsvLog]:
    """Write config.json and the CSV headers, or on resume the resume entry and the CSVs
    trimmed to the checkpoint. Called holding the lock, once every check has passed."""
    remove_stale_temporaries(save)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    resuming = plan.state is not None or plan.config_json is not None
    if plan.config_json is not None:
        content = plan.config_json
        content.setdefault("resumes", []).append({"time": stamp, "from_epoch": plan.start_epoch,
                                                  "changes": plan.changes, **extra})
        content["config"] = plan.cfg
    else:
        content = {"config": plan.cfg, "started": stamp, **extra}
    write_json(save / "config.json", content)
    logs = run_logs(save, plan.cfg)
    for log in logs.values():
        log.keep_epochs_up_to(plan.start_epoch) if resuming else log.create()
    return logs


def on_main(runtime: Runtime, action):
    """``action()`` on rank 0 alone; a UserError there ends every process, all at this point."""
    error, result = None, None
    if runtime.main:
        try:
            result = action()
        except UserError as raised:
            error = raised
    if runtime.world_size > 1:
        message = [str(error) if error else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and not runtime.main:
            raise UserError(message[0])
    if error is not None:
        raise error
    return result


def train(args: argparse.Namespace, explicit: set[str]) -> int:
    runtime = setup_runtime(args.device)
    log = print if runtime.main else (lambda *a, **k: None)
    name = model_name(args.depth, args.growth_rate, args.bottleneck, args.compression)
    args.save = str(args.save or Path("work") / f"{args.dataset}-{name}")
    save = Path(args.save)
    with WorkDirLock(save, "choose another with --save") as lock:
        # an existing directory is locked at once, so that a busy one is refused before any work
        on_main(runtime, lambda: lock.acquire() if save.is_dir() else None)
        plan = plan_run(save, args, explicit)
        cfg, state, start_epoch = plan.cfg, plan.state, plan.start_epoch
        if start_epoch >= cfg["epochs"]:
            log(f"{save} has finished its {cfg['epochs']} epochs; pass --epochs N to train longer")
            return 0
        if cfg["batch_size"] % runtime.world_size:
            raise UserError(f"--batch-size {cfg['batch_size']} is the global batch and must be "
                            f"divisible by the {runtime.world_size} processes")
        if cfg["sync_bn"] and runtime.world_size > 1 and runtime.device.type != "cuda":
            raise UserError("--sync-bn needs CUDA GPUs: SyncBatchNorm does not run on the CPU")
        dataset, val = prepare_data(cfg, runtime, log)
        num_classes = data.NUM_CLASSES[cfg["dataset"]]
        mean, std = data.channel_stats(dataset.train.images)
        device = runtime.device
        normalizer = data.Normalizer(mean, std, device)
        model, optimizer, scaler, batches = training.build_training(
            cfg, dataset.train, normalizer, runtime, num_classes)
        parameters = sum(p.numel() for p in model.parameters())
        log(f"model {model.name}: {parameters:,} parameters; {runtime.world_size} process(es) on {device}")
        test = dataset.test.to(device)
        val = val.to(device) if val is not None else None
        progress, best = EpochProgress(), {"error": math.inf, "epoch": 0}
        if state is not None:
            checkpoint_path = save / "checkpoint.pt"
            training.restore(model, state["model"], checkpoint_path)
            training.restore(optimizer, state["optimizer"], checkpoint_path)
            if scaler is not None and state["scaler"]:
                training.restore(scaler, state["scaler"], checkpoint_path)
            batches.set_state(state["data_rng"])
            training.set_rng_state(state["rng"])
            progress, best = EpochProgress(**state["progress"]), state["best"]
            log(f"resuming {save} after epoch {start_epoch}"
                + (f", step {progress.step}" if progress.step else ""))
        if plan.note:
            log(f"--epochs {cfg['epochs']}: {plan.note}")
        if cfg["sync_bn"] and runtime.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        raw_model = model
        if runtime.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg["kernels"] == "compile":
            model = torch.compile(model)
        step = TrainStep(model, optimizer, batches, cfg["precision"], scaler,
                         top5=num_classes > training.TOP5_FROM)
        run_step = training.step_runner(step, cfg["cuda_graph"], runtime, log)

        def begin() -> dict[str, CsvLog]:
            if not lock.held:  # the directory did not exist: make it, then look again
                lock.acquire()
                plan_run(save, args, explicit)  # another process may have started a run there
            with write_errors("choose another work directory with --save"):
                return open_work_dir(save, plan, {
                    "model": raw_model.name, "parameters": parameters,
                    "kernels_used": f"{raw_model.kernels}{', compiled' if cfg['compile'] else ''} on "
                                    f"{device.type}",
                    "classes": dataset.classes or [str(c) for c in range(num_classes)],
                    **({"best_checkpoint": {"file": BEST_CHECKPOINT, "chosen_by": "lowest validation error"}}
                       if val else {}),
                    "train_images": len(dataset.train), "test_images": len(dataset.test),
                    "val_images": len(val) if val else 0, "normalization": {"mean": mean, "std": std},
                    "environment": environment(runtime)})

        logs = on_main(runtime, begin) or {}

        def ensure_finite(where: str) -> None:
            """Stop before logging or saving a model whose weights became NaN or infinite."""
            bad = non_finite(raw_model.state_dict())
            if bad:
                raise Diverged(f"the weights are not finite {where} ({', '.join(bad[:3])})")

        def checkpoint(epoch: int, data_rng: torch.Tensor, progress: EpochProgress,
                       path: Path = save / "checkpoint.pt") -> None:
            if runtime.main:
                save_checkpoint(path, {
                    "config": cfg, "epoch": epoch, "progress": vars(progress), "best": best,
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "data_rng": data_rng, "rng": training.rng_state(),
                    "normalization": {"mean": mean, "std": std}, "num_classes": num_classes})

        def evaluate_split(split: data.Split) -> dict:
            """The CSV row of ``split`` (loss, error, top-5 error, seconds), all processes."""
            start = time.perf_counter()
            loss, error, _, top5 = training.evaluate(model, data.eval_batches(
                split, cfg["eval_batch_size"], normalizer, device, runtime.rank, runtime.world_size,
                cfg["channels_last"]), cfg["precision"], runtime, num_classes)
            return {"loss": loss, "error": error, "top5_error": top5,
                    "seconds": time.perf_counter() - start}

        def after_write_error() -> str:
            if (save / "checkpoint.pt").exists():
                return (f"free space (or fix permissions), then continue from the last "
                        f"checkpoint with --resume --save {save}")
            return "nothing was saved yet: free space (or fix permissions) and start again"

        stop = StopFlag()
        on_terminal = sys.stderr.isatty()
        for epoch in range(start_epoch, cfg["epochs"]):
            lr = training.learning_rate(cfg, epoch)
            step.set_lr(lr)
            data_rng = batches.state()
            display = None
            if runtime.main:
                display = (ProgressBar if on_terminal else ProgressLines)(
                    epoch + 1, cfg["epochs"], batches.steps, progress.step)
            try:
                progress = train_epoch(step, run_step, runtime, epoch + 1, progress, stop, display)
            finally:
                if display is not None:
                    display.close()
            if progress.step < batches.steps:
                ensure_finite(f"at epoch {epoch + 1}, step {progress.step}")
                with write_errors(after_write_error()):
                    checkpoint(epoch, data_rng, progress)
                raise Interrupted(stop.agreed, save, epoch + 1, progress.step)
            evaluations = {"test": evaluate_split(test)}
            if val is not None:
                evaluations["val"] = evaluate_split(val)
            for split, row in evaluations.items():
                if not math.isfinite(row["loss"]):
                    raise Diverged(f"the {split} loss is not finite after epoch {epoch + 1}")
            train_loss = progress.loss_sum / progress.seen
            train_error = 100 * (1 - progress.correct / progress.seen)
            test_error = evaluations["test"]["error"]
            if test_error < best["error"]:
                best = {**best, "error": test_error, "epoch": epoch + 1}
            new_best_val = val is not None and evaluations["val"]["error"] < best.get("val_error", math.inf)
            if new_best_val:
                best = {**best, "val_error": evaluations["val"]["error"], "val_epoch": epoch + 1}
            line = (f"epoch {epoch + 1}/{cfg['epochs']}  lr {lr:.3g}  train loss {train_loss:.4f} "
                    f"error {train_error:.2f}%  test loss {evaluations['test']['loss']:.4f} error "
                    f"{test_error:.2f}%" + (f"  val error {evaluations['val']['error']:.2f}%" if val else "")
                    + f"  {progress.seen / progress.seconds:.0f} img/s  {progress.seconds:.1f}s")
            rows = {"train": {"lr": lr, "loss": train_loss, "error": train_error,
                              "top5_error": 100 * (1 - progress.correct5 / progress.seen),
                              "seconds": progress.seconds,
                              "images_per_s": progress.seen / progress.seconds}, **evaluations}
            ensure_finite(f"after epoch {epoch + 1}")
            progress = EpochProgress()
            with write_errors(after_write_error()):
                for split, row in rows.items() if runtime.main else ():
                    logs[split].append({"epoch": epoch + 1, **row})
                if new_best_val:  # before the checkpoint that records it
                    checkpoint(epoch + 1, batches.state(), progress, save / BEST_CHECKPOINT)
                checkpoint(epoch + 1, batches.state(), progress)
            log(line, flush=True)
            signum = stop.requested(runtime)
            if signum:
                raise Interrupted(signum, save, epoch + 1, batches.steps)
            if epoch + 1 == cfg["stop_after"] and epoch + 1 < cfg["epochs"]:
                log(f"stopped after epoch {epoch + 1} (--stop-after); continue with --resume --save {save}")
                return 0
        chosen = (f"; lowest validation error {best['val_error']:.2f}% at epoch {best['val_epoch']}, "
                  f"saved as {save / BEST_CHECKPOINT}" if "val_epoch" in best else "")
        log(f"done: final test error {test_error:.2f}%, best {best['error']:.2f}% at epoch "
            f"{best['epoch']}{chosen}; logs and checkpoint in {save}")
        return 0


def evaluate_checkpoint(args: argparse.Namespace, explicit: set[str]) -> int:
    """--evaluate: test error of a checkpoint; per-class errors and confusion matrix to CSV.

    Takes a checkpoint file or a run's directory (its checkpoint.pt). The data comes from
    where the run was trained, unless --data-dir (or --download) says otherwise.
    """
    path = Path(args.evaluate)
    if path.is_dir():
        path = path / "checkpoint.pt"
    state = load_checkpoint(path, CHECKPOINT_KEYS)
    given = {key: getattr(args, key) for key in ("data_dir", "download") if key in explicit}
    cfg = {**state["config"], **given, "test_subset": args.test_subset, "val_size": 0,
           "train_subset": 0, "eval_batch_size": args.eval_batch_size}
    with WorkDirLock(path.parent, "copy the checkpoint into a folder of your own and evaluate "
                                  "it there") as lock:
        lock.acquire()  # the results go beside the checkpoint: refuse now, not after evaluating
        runtime = setup_runtime(args.device)
        dataset = data.load_dataset(cfg["dataset"], cfg["data_dir"], cfg["download"], svhn_extra=False)
        if cfg["test_subset"]:
            dataset.test = dataset.test.first(cfg["test_subset"])
        num_classes = state["num_classes"]
        model = training.build_model(cfg, num_classes, runtime.device)
        training.restore(model, state["model"], path)
        model.to(runtime.device, memory_format=data.memory_format(cfg["channels_last"]))
        normalizer = data.Normalizer(state["normalization"]["mean"], state["normalization"]["std"],
                                     runtime.device)
        batches = data.eval_batches(dataset.test.to(runtime.device), cfg["eval_batch_size"],
                                    normalizer, runtime.device, channels_last=cfg["channels_last"])
        loss, error, confusion, top5 = training.evaluate(model, batches, cfg["precision"],
                                                         runtime, num_classes, tta=args.tta)
        names = dataset.classes or [str(c) for c in range(num_classes)]
        suffix = "-tta" if args.tta else ""
        per_class = path.parent / f"{path.stem}-classes{suffix}.csv"
        confusion_path = path.parent / f"{path.stem}-confusion{suffix}.csv"
        images = confusion.sum(1)
        rows = ["class,name,images,errors,error"] + [
            f"{c},{names[c]},{int(images[c])},{int(images[c] - confusion[c, c])},"
            f"{100 * (1 - confusion[c, c] / images[c]).item() if images[c] else 0:.4g}"
            for c in range(num_classes)]
        with write_errors("free space or copy the checkpoint into a folder you can write to"):
            write_text(per_class, "\n".join(rows) + "\n")
            write_text(confusion_path, "true\\predicted," + ",".join(names) + "\n" + "".join(
                f"{names[c]}," + ",".join(str(int(v)) for v in confusion[c]) + "\n"
                for c in range(num_classes)))
    print(f"{path} after epoch {state['epoch']}: test error {error:.2f}% "
          + (f"(top-5 {top5:.2f}%) " if top5 is not None else "") + f"(loss {loss:.4f}) on "
          f"{int(images.sum())} images{' with flip test-time augmentation' if args.tta else ''}")
    print(f"per-class errors: {per_class}\nconfusion matrix: {confusion_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, explicit = parse_args(argv)
    training.keep_freed_memory_mapped()
    try:
        check_args(args)
        if args.evaluate:
            return evaluate_checkpoint(args, explicit)
        return train(args, explicit)
    except UserError as error:  # data.DataError and runlog.RunError too
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process has the same error
            print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"error: {error}; stopped without saving that epoch: the last checkpoint and the rows "
              f"up to it are kept. Start a new run (--save) with a lower --lr", file=sys.stderr)
        return 1
    except Interrupted as interrupted:
        print(interrupted, file=sys.stderr)
        return 128 + interrupted.signum
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
