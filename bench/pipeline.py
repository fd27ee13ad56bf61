#!/usr/bin/env python3
"""Share of a training epoch spent outside forward/backward/step, and evaluation speed.

Uses the trainer's own pieces on real data: the on-device batch path (gather, normalise,
crop, flip) for a whole epoch, the per-epoch CSV appends and atomic checkpoint, and the
training step, each timed on its own (median of --repeats). The share is
(data + logging) / (data + logging + steps) for one epoch. Takes train.py's data, model,
optimisation and speed flags.

  python bench/pipeline.py --data-dir ../shared/data
  python bench/pipeline.py --data-dir ../shared/data --depth 40 --steps 10
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from densenet_trainer.config import cli, run_config
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.loop.training import EpochProgress
from densenet_trainer.results.layout import EVAL_COLUMNS, TRAIN_COLUMNS
from densenet_trainer.run.build import build_run
from densenet_trainer.run.checkpoint import BestEpochs
from densenet_trainer.run.files import CsvLog, save_checkpoint
from densenet_trainer.runtime import keep_freed_memory_mapped, setup_runtime, synchronize
from densenet_trainer.speed.cuda_graph import GraphedStep

# train.py's settings that shape an epoch's work (not its length or schedule, not the files)
LEFT_OUT = {"lr", "schedule", "epochs", "sync_bn"}


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    run_config.add_flags(parser, run_config.flag_names("data", "model", "optimisation", "speed",
                                               leave_out=LEFT_OUT))
    parser.add_argument("--steps", type=cli.positive_int, default=5, help="training steps timed")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="repetitions of each timed part (the median is reported)")
    args = parser.parse_args(argv)
    cfg, _ = RunConfig.from_flags(args)
    keep_freed_memory_mapped()
    run = build_run(cfg, setup_runtime(cfg.device))
    device, batches, step, run_step = run.runtime.device, run.batches, run.step, run.run_step
    def data_epoch() -> None:
        for _ in batches.epoch():
            pass
        synchronize(device)

    data_s = median_time(data_epoch, args.repeats)
    step.start_epoch()
    step.model.train()
    for _ in range(GraphedStep.CALLS_BEFORE_REPLAYS):  # a graph is captured and checked by then
        run_step()

    def one_step() -> None:
        if step.batch_index.item() == batches.steps:
            step.start_epoch()
        run_step()
        synchronize(device)

    step_s = median_time(one_step, args.steps)
    with tempfile.TemporaryDirectory() as folder:
        logs = [CsvLog(Path(folder) / name, cols) for name, cols in
                (("train.csv", TRAIN_COLUMNS), ("test.csv", EVAL_COLUMNS))]
        for log in logs:
            log.create()

        def write_epoch() -> None:
            for log in logs:
                log.append({c: 1.0 for c in log.columns})
            save_checkpoint(Path(folder) / "checkpoint.pt",
                            run.checkpoint_state(1, EpochProgress(), BestEpochs(), batches.state()))

        log_s = median_time(write_epoch, args.repeats)
    eval_s = median_time(lambda: run.evaluate("test"), args.repeats)
    compute_s = step_s * batches.steps
    share = (data_s + log_s) / (data_s + log_s + compute_s)
    print(f"{run.model.name}, batch {cfg.batch_size}, {batches.steps} steps per epoch on {device}")
    print(f"per epoch: batches {data_s:.3f}s, CSV rows + checkpoint {log_s:.3f}s, "
          f"training steps {compute_s:.1f}s ({step_s:.3f}s each, {cfg.batch_size / step_s:.1f} images/s)")
    print(f"outside forward/backward/step: {100 * share:.2f}% of the epoch")
    print(f"evaluation: {len(run.test) / eval_s:.0f} images/s ({len(run.test)} images in {eval_s:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
