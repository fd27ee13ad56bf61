#!/usr/bin/env python3
"""Learning-rate finder: train with an exponentially growing learning rate and watch the loss.

From a fresh model (train.py's flags), the learning rate rises from --start-lr to --end-lr
over --steps steps while the smoothed training loss is recorded; the sweep stops early when
the loss explodes. The suggestion is the learning rate where the smoothed loss falls fastest
(per log step of lr) before its minimum. Writes lr_find.csv and lr_find.json into a folder
of its own (--save; default: train.py's folder for the same flags, with -lr-find; never a training
run's), where
./plot.py draws the sweep. Fewer than 100 steps give a rough suggestion, and it says so.

  attic/lr_find.py --depth 40 --data-dir ../shared/data --steps 200
"""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

from densenet_trainer.config import cli, run_config
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.run.build import Run, build_run
from densenet_trainer.run.files import WorkDirLock, holds_run, write_errors, write_json
from densenet_trainer.runtime import setup_runtime
from densenet_trainer.whole_files import refuse_unless_regular, write_text

SMOOTHING = 0.9  # exponential moving average of the loss; bias-corrected
STEADY_STEPS = 100  # fewer make the smoothed curve, and so the suggestion, noisy


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The lr of the steepest fall of the smoothed loss, before its minimum."""
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    start = max(1, len(smoothed) // 10)  # the first steps mostly reflect the moving average
    if lowest <= start:
        return lrs[lowest]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1])
              for i in range(start, lowest)]
    return lrs[start + min(range(len(slopes)), key=slopes.__getitem__)]


# train.py's settings that the sweep uses: it trains (no epochs, schedule or evaluation), its
# learning rate is its own, and it writes into a folder of its own (its own --save)
LEFT_OUT = {"test_subset", "lr", "schedule", "epochs", "sync_bn", "eval_batch_size"}


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    run_config.add_flags(parser, run_config.flag_names("data", "model", "optimisation", "speed",
                                               leave_out=LEFT_OUT))
    group = parser.add_argument_group("learning-rate finder")
    group.add_argument("--save", dest="folder", metavar="SAVE", default=None, type=cli.path,
                       help="folder for the sweep's files (default: the folder train.py would "
                            "use for these flags, with -lr-find; never a training run's)")
    group.add_argument("--steps", type=cli.int_range(3), default=200,
                       help="training steps of the sweep (100 or more for a steady suggestion)")
    group.add_argument("--start-lr", type=cli.positive_float, default=1e-5,
                       help="learning rate of the first step")
    group.add_argument("--end-lr", type=cli.positive_float, default=10.0,
                       help="learning rate of the last step")
    args = parser.parse_args(argv)
    cfg, _ = RunConfig.from_flags(args)
    if not args.start_lr < args.end_lr:
        raise cli.UserError(f"--start-lr {args.start_lr:g} must be below --end-lr {args.end_lr:g}")
    save = Path(args.folder or f"{cfg.default_save()}-lr-find")
    if holds_run(save):
        raise cli.UserError(f"{save} holds a training run; the sweep goes into a folder of its "
                            f"own: choose another --save (the default is train.py's folder for these flags, with -lr-find)")
    cfg = replace(cfg, save=str(save))
    run = build_run(cfg, setup_runtime(cfg.device))
    with WorkDirLock(save, "choose another with --save") as lock:
        lock.acquire()  # refused before the sweep, not after it
        if args.steps < STEADY_STEPS:
            print(f"note: {args.steps} steps are few; the suggestion will be rough "
                  f"(--steps {STEADY_STEPS} or more give a steadier one)")
        return sweep(args, run, save)


def sweep(args, run: Run, save: Path) -> int:
    """Train with the rising learning rate (train.py's own step), then write the sweep and
    the suggestion. Each step's loss is read as it ends, to stop when the loss explodes or
    stops being finite (that step is not written: every row holds numbers)."""
    step, run_step, learning_rate = run.step, run.run_step, run.lr
    ratio = args.end_lr / args.start_lr
    rows, lrs, smoothed, average, best = ["step,lr,raw_loss,loss"], [], [], 0.0, math.inf
    step.model.train()
    ended = ""
    while len(lrs) < args.steps and not ended:
        step.start_epoch()
        for index in range(step.batches.steps):
            lr = args.start_lr * ratio ** (len(lrs) / (args.steps - 1))
            learning_rate.set(lr)
            run_step()
            value = step.losses[index].item()
            if not math.isfinite(value):
                ended = f"the loss stopped being finite at lr {lr:.3g} (step {len(lrs) + 1})"
                break
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            current = average / (1 - SMOOTHING ** (len(lrs) + 1))
            lrs.append(lr)
            smoothed.append(current)
            rows.append(f"{len(lrs)},{lr:.6g},{value:.6g},{current:.6g}")
            best = min(best, current)
            if len(lrs) % max(1, args.steps // 10) == 0:  # ten progress lines in a whole sweep
                print(f"  step {len(lrs)}/{args.steps}  lr {lr:.3g}  loss {current:.4f}", flush=True)
            if current > 4 * best:
                ended = f"the loss rose past 4 times its lowest at lr {lr:.3g}"
            if len(lrs) >= args.steps or ended:
                break
    if not lrs:
        raise cli.UserError(f"{ended} already; lower --start-lr (now {args.start_lr:g})")
    if ended:
        print(f"the sweep ended early: {ended}")
    suggestion = suggest(lrs, smoothed)
    lowest_lr = min(zip(lrs, smoothed), key=lambda pair: pair[1])[0]
    with write_errors("free space or choose another --save"):
        for name in ("lr_find.csv", "lr_find.json"):  # both refused before either is written
            refuse_unless_regular(save / name)
        write_text(save / "lr_find.csv", "\n".join(rows) + "\n")
        write_json(save / "lr_find.json", {"suggested_lr": suggestion, "lowest_loss_lr": lowest_lr,
                                           "steps": len(lrs), "config": run.config.to_dict()})
    print(f"{len(lrs)} steps from lr {args.start_lr:g} to {lrs[-1]:.3g}: suggested lr "
          f"{suggestion:.3g} (steepest fall of the loss); lowest loss at lr {lowest_lr:.3g}")
    print(f"wrote {save / 'lr_find.csv'} and {save / 'lr_find.json'}; ./plot.py {save} draws it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
