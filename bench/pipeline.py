#!/usr/bin/env python3
"""Share of a training epoch spent outside forward/backward/step, and evaluation speed.

Uses the trainer's own pieces on real data: the on-device batch path (gather, normalise,
crop, flip) for a whole epoch, the per-epoch CSV appends and atomic checkpoint, and the
training step, each timed on its own (median of --repeats). The share is
(data + logging) / (data + logging + steps) for one epoch. Takes train.py's flags.

  python bench/pipeline.py --data-dir ../shared/data
  python bench/pipeline.py --data-dir ../shared/data --depth 40 --steps 10
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT  # noqa: F401  (puts the project on sys.path)
import cli  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import training  # noqa: E402
from runlog import CsvLog, save_checkpoint  # noqa: E402


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = train.build_parser(tool=True)
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--steps", type=cli.positive_int, default=5, help="training steps timed")
    parser.add_argument("--repeats", type=cli.positive_int, default=3,
                        help="repetitions of each timed part (the median is reported)")
    args, _ = train.parse_args(argv, parser)
    train.check_args(args)
    training.keep_freed_memory_mapped()
    cfg = train.run_config(args)
    runtime = training.setup_runtime(args.device)
    device = runtime.device
    dataset, _ = train.prepare_data(cfg, runtime, print)
    mean, std = data.channel_stats(dataset.train.images)
    normalizer = data.Normalizer(mean, std, device)
    model, optimizer, scaler, batches = training.build_training(
        cfg, dataset.train, normalizer, runtime, data.NUM_CLASSES[args.dataset])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def data_epoch() -> None:
        for _ in batches.epoch():
            pass
        sync()

    data_s = median_time(data_epoch, args.repeats)
    step = training.TrainStep(model, optimizer, batches, cfg["precision"], scaler)
    run_step = training.step_runner(step, cfg["cuda_graph"], runtime, print)
    step.start_epoch()
    model.train()
    for _ in range(training.GraphedStep.WARMUP + 1):  # a graph is captured by then
        run_step()

    def one_step() -> None:
        if step.step.item() == batches.steps:
            step.start_epoch()
        run_step()
        sync()

    step_s = median_time(one_step, args.steps)
    with tempfile.TemporaryDirectory() as folder:
        logs = [CsvLog(Path(folder) / name, cols) for name, cols in
                (("train.csv", train.TRAIN_COLUMNS), ("test.csv", train.EVAL_COLUMNS))]
        for log in logs:
            log.create()

        def write_epoch() -> None:
            for log in logs:
                log.append({c: 1.0 for c in log.columns})
            save_checkpoint(Path(folder) / "checkpoint.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "data_rng": batches.state(), "rng": training.rng_state()})

        log_s = median_time(write_epoch, args.repeats)
    test = dataset.test.to(device)
    eval_s = median_time(lambda: training.evaluate(model, data.eval_batches(
        test, args.eval_batch_size, normalizer, device, channels_last=cfg["channels_last"]),
        cfg["precision"], runtime, data.NUM_CLASSES[args.dataset]), args.repeats)
    compute_s = step_s * batches.steps
    share = (data_s + log_s) / (data_s + log_s + compute_s)
    print(f"{model.name}, batch {args.batch_size}, {batches.steps} steps per epoch on {device}")
    print(f"per epoch: batches {data_s:.3f}s, CSV rows + checkpoint {log_s:.3f}s, "
          f"training steps {compute_s:.1f}s ({step_s:.3f}s each, {args.batch_size / step_s:.1f} images/s)")
    print(f"outside forward/backward/step: {100 * share:.2f}% of the epoch")
    print(f"evaluation: {len(test) / eval_s:.0f} images/s ({len(test)} images in {eval_s:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
