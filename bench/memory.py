#!/usr/bin/env python3
"""Training memory of the standard vs the memory-efficient DenseNet, and the step-time ratio.

For each model and mode, in fresh processes: the memory a training step adds at its peak
over what is held between steps (activations, gradients, temporaries; CUDA:
max_memory_allocated, CPU: peak resident size from /proc), and the median step time.
The CPU figure uses glibc's default allocator, which returns large blocks to the system
when freed, so resident size follows the live tensors.

  python bench/memory.py                       # BC-100-12 batch 64, BC-250-24 batch 16
  python bench/memory.py --repeats 5 --steps 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from densenet_trainer.config import cli
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.measuring import (
    add_device_flag,
    in_fresh_process,
    one_settings,
    peak_since,
    print_table,
    reset_peak,
    spread,
    synthetic_run,
)
from densenet_trainer.runtime import synchronize

MODELS = [("densenet-bc-100-12", 100, 12, 64), ("densenet-bc-250-24", 250, 24, 16)]


def measure(settings: dict) -> dict:
    import torch

    from densenet_trainer.config.run_config import RunConfig

    device = torch.device(settings["device"])
    # eager, also on CUDA: a graph holds its memory in its own pool between replays, so its
    # peak would not show (bench/speed.py times the memory-efficient graph)
    cfg = RunConfig(depth=settings["depth"], growth_rate=settings["growth_rate"],
                    batch_size=settings["batch"], memory_efficient=settings["memory_efficient"],
                    cuda_graph=False)
    run_step = synthetic_run(cfg, device, settings["steps"] + 1).run_step
    run_step()  # warm-up: optimizer state and allocator pools exist from here on
    times, peaks = [], []
    for _ in range(settings["steps"]):
        base = reset_peak(device)
        start = time.perf_counter()
        run_step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        peaks.append(peak_since(base, device))
    return {"peak_mb": statistics.median(peaks) / 2**20, "step_s": statistics.median(times)}


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="fresh processes per configuration")
    p.add_argument("--steps", type=cli.positive_int, default=3, help="timed steps per process")
    add_device_flag(p)
    p.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads per process")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        like = {"depth": 100, "growth_rate": 12, "batch": 64, "device": "cpu",
                "memory_efficient": False, "steps": 3}
        settings = one_settings(args.one, like, {"device": ("cpu", "cuda")})
        RunConfig(depth=settings["depth"], growth_rate=settings["growth_rate"])  # refuses what cannot be built
        print(json.dumps(measure(settings)))
        return 0
    print(f"device {args.device}, {args.threads} threads, {args.repeats} processes x "
          f"{args.steps} steps each; median [min-max]")
    rows = [("model", "batch", "mode", "step peak MB", "step s")]
    summary = []
    for name, depth, k, batch in MODELS:
        results = {False: [], True: []}
        for _ in range(args.repeats):  # alternate the modes so that machine noise falls on both alike
            for efficient in results:
                settings = {"depth": depth, "growth_rate": k, "batch": batch, "device": args.device,
                            "memory_efficient": efficient, "steps": args.steps}
                results[efficient].append(in_fresh_process(__file__, settings, args.threads))
        for efficient, runs in results.items():
            rows.append((name, batch, "memory-efficient" if efficient else "standard",
                         spread([r["peak_mb"] for r in runs]),
                         spread([r["step_s"] for r in runs])))
        med = {e: {key: statistics.median(r[key] for r in results[e]) for key in results[e][0]}
               for e in results}
        summary.append(f"{name} batch {batch}: memory-efficient / standard = "
                       f"{med[True]['peak_mb'] / med[False]['peak_mb']:.3f}x step peak memory, "
                       f"{med[True]['step_s'] / med[False]['step_s']:.3f}x step time")
    print_table(rows)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
