#!/usr/bin/env python3
"""Train a DenseNet or DenseNet-BC on CIFAR-10, CIFAR-100 or SVHN with the paper's recipe.

Defaults are those of Huang et al. (arXiv 1608.06993): DenseNet-BC L=100 k=12, SGD with
Nesterov momentum 0.9, weight decay 1e-4, batch 64, 300 epochs (40 for SVHN), learning rate
0.1 divided by 10 at 50% and 75% of the epochs, standard augmentation.

After every epoch a row goes to train.csv and test.csv (val.csv with --val-size) and the
checkpoint is replaced atomically. A work directory holding a run is never overwritten: --resume
continues it where it stopped, one process at a time. A NaN loss or weight stops it unsaved.

Examples:
  ./train.py                                        # DenseNet-BC-100-12 on CIFAR-10
  ./train.py --depth 40 --no-bottleneck --compression 1 --epochs 15 --data-dir ../shared/data
  ./train.py --resume --save work/cifar10-densenet-bc-100-12
  torchrun --nproc_per_node=4 ./train.py --depth 190 --growth-rate 40
  ./train.py --evaluate work/cifar10-densenet-bc-100-12/checkpoint.pt --tta

The story of a run is ``train``: plan the start or resume (workdir.py), build the run (build.py,
which alone puts the speed machinery of densenet_trainer/speed/ on it), begin its files, then
``train_epochs``, an epoch at a time in named steps; the loop itself is loop/training.py.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path

from densenet_trainer.config import cli, run_config
from densenet_trainer.config.cli import OneLineParser, UserError, one_line_interrupt, output_may_close, path
from densenet_trainer.config.run_config import RunConfig, flag_name
from densenet_trainer.results.layout import BEST_CHECKPOINT, duration


class Interrupted(Exception):
    """One of runtime.STOP_SIGNALS arrived; the run was saved at a safe point."""

    def __init__(self, signum: int, save: Path, epoch: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} in epoch {epoch} after "
                         f"step {step}; saved. Resume with: {sys.argv[0]} --resume --save {shlex.quote(str(save))}")
        self.signum = signum


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    """Every setting of a run (config/run_config.py), and what this command does with the run."""
    parser = OneLineParser(
        description=__doc__.split("\n\n")[0],
        epilog="Table 2 of the paper as flags: see README.md. Errors are one line and exit 2.")
    run_flags = run_config.add_flags(parser, run_config.flag_names(*run_config.GROUPS))["run"]
    run_flags.add_argument("--reschedule", action="store_true",
                     help="with --resume and a larger --epochs: accept the new length's schedule "
                          "even where it raises the learning rate above the last one trained "
                          "(without it such a resume is refused, naming the lr it would use)")
    run_flags.add_argument("--evaluate", metavar="CHECKPOINT", default=None, type=path,
                     help="only report the test error of a checkpoint file or of a run's "
                          "directory (its checkpoint.pt), on the data the run was trained on (or "
                          "--data-dir); writes CHECKPOINT-classes.csv and CHECKPOINT-confusion.csv "
                          "beside it (-classes-tta.csv, -confusion-tta.csv with --tta)")
    run_flags.add_argument("--seeds", metavar="SEED", nargs="+", type=cli.seed, default=None,
                     help="train one run per seed together in this process, each in the folder "
                          "--seed SEED alone would use (with --save: put {seed} in it); on a GPU "
                          "their steps overlap. --resume continues each, starting a missing one")
    run_flags.add_argument("--tta", action="store_true",
                     help="with --evaluate: average over horizontal flips")
    return parser


if __name__ == "__main__":  # --help and a flag out of its range answer before torch loads
    with output_may_close():
        build_parser().parse_args()
    one_line_interrupt("interrupted by SIGINT before training started; nothing was saved")  # torch loads
import torch.distributed as dist  # the run's own imports: torch and the layers that use it

from densenet_trainer.loop import evaluation, training
from densenet_trainer.loop.progress import ProgressBar, ProgressLines
from densenet_trainer.loop.training import Diverged, EpochProgress, StepCheckFailed
from densenet_trainer.loop.turns import Turn, finish, take_turns
from densenet_trainer.random_state import rng_state
from densenet_trainer.run import workdir
from densenet_trainer.run.build import Run, build_run
from densenet_trainer.run.files import WorkDirLock, refuse_foreign_folder
from densenet_trainer.run.inference import EVALUATE_READS, evaluate_checkpoint
from densenet_trainer.run.seeds import refuse_unless_fit, seed_configs, shared_images
from densenet_trainer.runtime import (
    STOP_SIGNALS,
    Runtime,
    StopFlag,
    keep_freed_memory_mapped,
    lost_peer,
    on_main,
    setup_runtime,
)

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # loaded: main's
    signal.signal(signal.SIGINT, signal.default_int_handler)


class StoppedBeforeTraining(KeyboardInterrupt):
    """SIGTERM, SIGHUP or SIGUSR1 before the run's own stop handling (StopFlag): as SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_before_training(signum: int, frame) -> None:
    raise StoppedBeforeTraining(signum)


def main(argv: list[str] | None = None) -> int:
    """The command: parse, then train or --evaluate; every outcome is an exit status and its
    line. Output whose reader goes away (``| head``, a closed terminal) never stops the run."""
    with output_may_close():
        return _run_command(build_parser().parse_args(argv))


def first_process() -> bool:
    """Whether this process (the only one, or torchrun's rank 0: all end alike) says how it ended."""
    return os.environ.get("RANK", "0") == "0"


def _run_command(args: argparse.Namespace) -> int:
    keep_freed_memory_mapped()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # SIGINT already raises KeyboardInterrupt
        previous = {signum: signal.signal(signum, _stop_before_training)
                    for signum in STOP_SIGNALS if signum != signal.SIGINT}
    try:
        cfg, given = RunConfig.from_flags(args)  # a value the model cannot take is refused here
        if args.seeds and ("seed" in given or args.evaluate):
            raise UserError(f"--seeds trains a run per seed: drop --{'seed' if 'seed' in given else 'evaluate'}")
        if args.tta and not args.evaluate:
            raise UserError("--tta only applies with --evaluate CHECKPOINT")
        if args.reschedule and not cfg.resume:
            raise UserError("--reschedule only applies with --resume")
        if args.evaluate and given - EVALUATE_READS:
            raise UserError(f"--evaluate takes the checkpoint's own settings; --{flag_name(max(given - EVALUATE_READS))} "
                            f"is a training flag: drop it (it reads {', '.join('--' + flag_name(n) for n in sorted(EVALUATE_READS))})")
        if args.evaluate:
            return evaluate_checkpoint(Path(args.evaluate), cfg, given, args.tta)
        return train(cfg, given, args.reschedule, seeds=args.seeds)
    except (*ENDINGS, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not lost_peer(error):
            raise
        status, line = ending(error)
        if first_process() or isinstance(error, RuntimeError):  # every process ends alike, but
            print(line, file=sys.stderr)  # a lost peer may be the first process
        return status
    except KeyboardInterrupt as interrupted:
        signum = getattr(interrupted, "signum", signal.SIGINT)
        if first_process():
            print(f"interrupted by {signal.Signals(signum).name} before training started; nothing "
                  f"was saved", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def ending(error: BaseException) -> tuple[int, str]:
    """The exit status and the line of a run that ``error`` ended (one of ENDINGS, or a lost
    torchrun peer): each says what was kept and what to do."""
    kept = "stopped without saving that epoch: the last checkpoint and the rows up to it are kept"
    if isinstance(error, Diverged):
        return 1, f"error: {error}; {kept}. Start a new run (--save) with a lower --lr"
    if isinstance(error, StepCheckFailed):
        return 1, f"error: {error}; {kept}. Continue with --resume --no-cuda-graph --kernels aten, and please report this"
    if isinstance(error, Interrupted):
        return 128 + error.signum, str(error)
    if isinstance(error, UserError):  # datasets.DataError and files.RunError too
        return 2, f"error: {error}"
    return 1, f"error: {lost_peer(error)}; torchrun restarts the job where --max-restarts allows, and it resumes"


# ---------------------------------------------------------------- the run

def train(cfg: RunConfig, given: frozenset[str] = frozenset(), reschedule: bool = False,
          runtime: Runtime | None = None, seeds: list[int] | None = None) -> int:
    """Start the run ``cfg`` describes in its work directory, or resume the one there.
    ``given``: the flags of the command line, which a resume may apply to the saved run
    (workdir.plan_run); ``runtime``: the process's (default: from --device and torchrun).
    ``seeds`` (--seeds): a run per seed, each as --seed alone makes it, trained a step of each
    in turn (loop/turns.py); any refusal refuses all before a write; each run ends alone."""
    runtime = runtime or setup_runtime(cfg.device)
    configs = seed_configs(cfg, given, seeds, runtime)
    with contextlib.ExitStack() as held:
        plans = []
        for config in configs:  # every folder locked and planned before any run is built
            refuse_foreign_folder(Path(config.save), config.data_dir)
            lock = held.enter_context(WorkDirLock(Path(config.save), "choose another with --save"))
            on_main(runtime, lock.acquire_if_present)  # an existing one at once: busy is refused now
            plans.append((lock, workdir.plan_run(config, given, reschedule, runtime.jobs)))
        built, choice, images = [], None, {}
        for lock, plan in plans:
            run_runtime = replace(runtime, label=f"seed {plan.config.seed}") if seeds else runtime
            if plan.start_epoch >= plan.config.epochs:
                run_runtime.log(f"{plan.save} has finished its {plan.config.epochs} epochs; pass "
                                f"--epochs N to train longer")
                continue
            data = shared_images(plan.config, run_runtime, images) if seeds else None
            run = build_run(plan.config, run_runtime, run_runtime.log, plan.checkpoint, dataset=data,
                            kernel_choice=None if plan.checkpoint else choice)  # a resume: its own kernels
            built.append((lock, plan, run, rng_state()))  # its seed's generators, for its turns
            choice = run.kernel_choice
            log_start(plan, run)
            if seeds and runtime.device.type == "cuda" and len(built) == 1:
                refuse_unless_fit(run, sum(p.start_epoch < p.config.epochs for _, p in plans))
        files = [workdir.RunFiles(plan, writes=runtime.main) for _, plan, _, _ in built]
        for run_files, (lock, *_) in zip(files, built):  # every folder claimed before any is written
            on_main(runtime, run_files.claim, lock)
        for run_files, (lock, _, run, _) in zip(files, built):
            on_main(runtime, run_files.open, lock, run.record())
        stop = StopFlag()  # from here a signal saves every run (at its next step)
        epochs = [train_epochs(plan, run, run_files, stop) for run_files, (_, plan, run, _) in zip(files, built)]
        if seeds is None:
            return finish(epochs[0]) if epochs else 0
        turns = [Turn(steps, runtime.device, rng) for steps, (*_, rng) in zip(epochs, built)]
        take_turns(turns, ENDINGS)
        return group_ending(turns, [run for _, _, run, _ in built])


def log_start(plan: workdir.Plan, run: Run) -> None:
    """What the run says as it starts: its model and start-up, how it continues, and notices."""
    runtime = run.runtime
    runtime.log(f"model {run.model.name}: {run.parameters:,} parameters; "
                f"{runtime.world_size} process(es) on {runtime.device}; start-up "
                + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in run.startup.items())
                + ("; the step's CUDA graph is captured in epoch 1's first steps"
                   if run.graphed else ""))
    if plan.resuming and plan.checkpoint is None:
        runtime.log(f"starting {plan.save} over from epoch 1 with its settings: its last session "
                    f"stopped before its first checkpoint ({plan.continued_by})")
    if plan.checkpoint is not None:
        step = plan.progress["step"]
        runtime.log(f"resuming {plan.save} after epoch {plan.start_epoch}"
                    + (f", step {step}" if step else "")
                    + (f" ({plan.continued_by})" if plan.continued_by != "--resume" else ""))
    if plan.trained_on not in (None, runtime.world_size):
        plan.changes["processes"] = {"from": plan.trained_on, "to": runtime.world_size}
        runtime.log(f"notice: the run trained on {plan.trained_on} process(es) and goes on with "
                    f"{runtime.world_size}: the global batch ({plan.config.batch_size}) and the "
                    f"order of the images stay; each process's BatchNorm normalises its own "
                    f"share of a batch{' (not with --sync-bn)' if plan.config.sync_bn else ''}, "
                    f"so the numbers can differ slightly from going on with {plan.trained_on}")
    if plan.note:
        runtime.log(f"--epochs {plan.config.epochs}: {plan.note}")
    if notice := plan.config.schedule_notice():
        runtime.log(notice)


ENDINGS = (UserError, Diverged, StepCheckFailed, Interrupted)  # with --seeds, what ends one run alone


def group_ending(turns: list[Turn], runs: list[Run]) -> int:
    """--seeds: a line for each run that did not end normally; the exit status (a signal's
    where one stopped the runs, each saved; else the worst)."""
    endings = [ending(t.outcome) if isinstance(t.outcome, BaseException) else (t.outcome, "") for t in turns]
    for (_, line), run in zip(endings, runs):
        if line:
            print(f"[{run.runtime.label}] {line}", file=sys.stderr)
    if stopped := [t.outcome.signum for t in turns if isinstance(t.outcome, Interrupted)]:
        print("every run was saved: continue them all with the same command and --resume", file=sys.stderr)
        return 128 + stopped[0]
    return max((status for status, _ in endings), default=0)  # 0: every run had finished


def train_epochs(plan: workdir.Plan, run: Run, files: workdir.RunFiles,
                 stop: StopFlag) -> Generator[None, None, int]:
    """Each epoch from the plan's first: train it, check it, evaluate it, log it, save it.
    A generator of the run's steps (loop/turns.py), whose value is the exit status."""
    cfg, runtime = run.config, run.runtime
    progress, best, pace = EpochProgress(**plan.progress), plan.best, Pace(cfg.epochs)
    for epoch in range(plan.start_epoch + 1, cfg.epochs + 1):  # 1-based, as in files and lines
        lr = cfg.learning_rate(epoch - 1)
        run.lr.set(lr)
        data_rng = run.batches.state()  # plans this epoch: a checkpoint taken within it keeps it
        progress = yield from train_one_epoch(run, epoch, progress, stop)
        if progress.step < run.batches.steps:  # a stop was requested within the epoch
            training.ensure_finite(run.model, f"at epoch {epoch}, step {progress.step}")
            files.save_checkpoint(run.checkpoint_state(epoch - 1, progress, best, data_rng))
            raise Interrupted(stop.agreed, plan.save, epoch, progress.step)
        training.ensure_finite(run.model, f"after epoch {epoch}")
        files.update_record("step", run.step_status)
        results = yield from evaluate_splits(run, epoch)
        files.update_record("evaluation", run.evaluation_status)
        new_best_val = best.update(epoch, results["test"].error, results["val"].error if "val" in results else None)
        files.append(epoch, epoch_rows(lr, progress, results))
        line = epoch_line(cfg, epoch, lr, progress, results) + pace.after(epoch)
        if new_best_val:  # before the checkpoint that records it
            files.save_checkpoint(run.checkpoint_state(epoch, EpochProgress(), best,
                                                   run.batches.state()), best=True)
        files.save_checkpoint(run.checkpoint_state(epoch, EpochProgress(), best, run.batches.state()))
        runtime.log(line, flush=True)
        progress = EpochProgress()
        if signum := stop.requested(runtime):
            if epoch < cfg.epochs:
                raise Interrupted(signum, plan.save, epoch, run.batches.steps)
            runtime.log(f"({signal.Signals(signum).name} arrived as the last epoch ended: the run "
                        f"is finished and saved)")
        if epoch == cfg.stop_after and epoch < cfg.epochs:
            runtime.log(f"stopped after epoch {epoch} (--stop-after); continue with --resume "
                        f"--save {plan.save}")
            return 0
    chosen = (f"; lowest validation error {best.val_error:.2f}% at epoch {best.val_epoch}, "
              f"saved as {plan.save / BEST_CHECKPOINT}" if best.val_epoch is not None else "")
    runtime.log(f"done: final test error {results['test'].error:.2f}%, best {best.error:.2f}% at "
                f"epoch {best.epoch}{chosen}; logs and checkpoint in {plan.save}")
    return 0


def train_one_epoch(run: Run, epoch: int, progress: EpochProgress,
                    stop: StopFlag) -> Generator[None, None, EpochProgress]:
    """Train epoch ``epoch`` from ``progress.step`` on, its progress shown by the main process
    (a bar on a terminal, lines otherwise); it ends early where ``stop`` is requested."""
    display = None
    if run.runtime.main:
        display_type = ProgressBar if sys.stderr.isatty() and not run.runtime.label else ProgressLines
        display = display_type(epoch, run.config.epochs, run.batches.steps, progress.step,
                               run.runtime.label)
    try:
        return (yield from training.train_epoch(run.step, run.run_step, run.runtime, epoch,
                                                progress, stop, display))
    finally:
        if display is not None:
            display.close()


def evaluate_splits(run: Run, epoch: int) -> Generator[None, None, dict[str, evaluation.Evaluation]]:
    """The model after ``epoch`` on the test split and, with --val-size, the validation one;
    a loss that is not finite stops the run (Diverged)."""
    results = yield from run.evaluate_splits()
    for split, result in results.items():
        if not math.isfinite(result.loss):
            raise Diverged(f"the {split} loss is not finite after epoch {epoch}")
    return results


def epoch_rows(lr: float, progress: EpochProgress,
               results: dict[str, evaluation.Evaluation]) -> dict[str, dict]:
    """The epoch's row of each CSV file, by split."""
    train_row = {"lr": lr, "loss": progress.loss, "error": progress.error,
                 "top5_error": progress.top5_error, "seconds": progress.seconds,
                 "images_per_s": progress.images_per_s}
    return {"train": train_row, **{split: result.row() for split, result in results.items()}}


def epoch_line(cfg: RunConfig, epoch: int, lr: float, progress: EpochProgress,
               results: dict[str, evaluation.Evaluation]) -> str:
    """What the epoch's end prints."""
    test = results["test"]
    return (f"epoch {epoch}/{cfg.epochs}  lr {lr:.3g}  train loss {progress.loss:.4f} "
            f"error {progress.error:.2f}%  test loss {test.loss:.4f} error {test.error:.2f}%"
            + (f"  val error {results['val'].error:.2f}%" if "val" in results else "")
            + f"  {progress.images_per_s:.0f} img/s  {progress.seconds:.1f}s")


class Pace:
    """When the run will end, at this session's pace so far (evaluation included)."""

    def __init__(self, epochs: int) -> None:
        self.epochs, self.started, self.epochs_done = epochs, time.perf_counter(), 0

    def after(self, epoch: int) -> str:
        """The epoch line's ending once ``epoch`` is done (nothing after the last)."""
        self.epochs_done += 1
        if epoch >= self.epochs:
            return ""
        per_epoch = (time.perf_counter() - self.started) / self.epochs_done
        return f"  run ends in about {duration(per_epoch * (self.epochs - epoch))}"


def exit_worker(status: int) -> None:
    """Under torchrun, leave without the interpreter's teardown: gloo's threads can abort a
    finished worker (SIGABRT), which torchrun takes for a failed job. Every file is whole by then."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed terminal or pipe: nothing left to say there
            pass
    os._exit(status)


if __name__ == "__main__":
    status = main()
    if "LOCAL_RANK" in os.environ:
        exit_worker(status)
    sys.exit(status)
