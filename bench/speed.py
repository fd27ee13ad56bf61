"""Training speed of DenseNet-BC on this machine: our modes against torchvision's DenseNet.

Every configuration runs train.py's own training step (loop.TrainStep: batch gathered
and augmented on the device, forward, loss, backward, fused SGD) in fresh processes, several
repetitions, and reports training images/s at the median step time with min-max over the
processes (with several runs at once, as train.py --seeds trains them: all runs' images per
second, a step of each in turn: loop/turns.py), the peak memory a step adds, CPU time spent in the kernel (page faults show up
there), on CUDA the kernels one step launches (torch.profiler), and what 300 epochs of
50,000 images would take at that speed, training alone. The reference is torchvision's
DenseNet built to the same CIFAR architecture (3x3 stem conv, no max-pool, three blocks of
equal size, same parameter count) in the same step, measured in the same run, so the ratios
hold even on a noisy machine.

  python bench/speed.py                         # BC-100-12, batch 64; modes for the device
  python bench/speed.py --device cuda --modes torchvision,ours,graph,graph_auto,graph_bf16
  python bench/speed.py --device cuda --modes graph,graph_fused,graph_gemm,graph_bf16,graph_fused_bf16,graph_gemm_bf16
  python bench/speed.py --modes ours,compile    # compile takes minutes on a CPU
  python bench/speed.py --device cuda --modes graph,graph_x2,graph_x3   # --seeds on one GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import replace

from densenet_trainer.config import cli, run_config
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

# mode: (what it is, settings); unset settings are those of "ours"
MODES = {
    "torchvision": ("torchvision.models.DenseNet, CIFAR stem, eager, contiguous (reference)",
                    {"model": "torchvision", "channels_last": False, "allocator": False}),
    "plain": ("ours, contiguous memory format, default glibc allocator",
              {"channels_last": False, "allocator": False}),
    "channels_last": ("ours, channels_last, default glibc allocator", {"allocator": False}),
    "aten": ("ours with --kernels aten: ATen's ops instead of fused.py's", {"kernels": "aten"}),
    "ours": ("ours as train.py runs it on a CPU: channels_last, freed memory kept mapped, eager", {}),
    "bf16": ("ours + bf16, eager", {"precision": "bf16"}),
    "memory_efficient": ("ours + --memory-efficient, eager", {"memory_efficient": True}),
    "compile": ("ours + torch.compile, eager", {"compile": True}),
    "graph": ("ours, the step as one CUDA graph, ATen's kernels pinned (the GPU baseline)", {"graph": True}),
    "graph_auto": ("graph as train.py runs it: --kernels auto times both sets first (once)",
                   {"graph": True, "autotune": True}),
    "graph_bf16": ("graph + bf16", {"graph": True, "precision": "bf16"}),
    "graph_memory_efficient": ("graph + --memory-efficient", {"graph": True, "memory_efficient": True}),
    "graph_compile": ("graph + torch.compile inside it (--kernels compile)",
                      {"graph": True, "compile": True}),
    "graph_fused": ("graph + --kernels fused (Triton on CUDA, float32)",
                    {"graph": True, "kernels": "fused"}),
    "graph_fused_bf16": ("graph_fused + bf16", {"graph": True, "kernels": "fused", "precision": "bf16"}),
    "graph_fused_bf16_unpadded": ("graph_fused_bf16, the convolutions' channels not padded to 8",
                                  {"graph": True, "kernels": "fused", "precision": "bf16", "unpadded": True}),
    "graph_gemm": ("graph + --kernels fused-gemm (the 1x1 convolutions as Triton GEMMs, float32)",
                   {"graph": True, "kernels": "fused-gemm"}),
    "graph_gemm_bf16": ("graph_gemm + bf16", {"graph": True, "kernels": "fused-gemm", "precision": "bf16"}),
    "graph_gemm_bf16_unpadded": ("graph_gemm_bf16, the 3x3 convolutions' outputs not padded to 8 channels",
                                 {"graph": True, "kernels": "fused-gemm", "precision": "bf16", "unpadded": True}),
    "graph_gemm_memory_efficient": ("graph_gemm + --memory-efficient",
                                    {"graph": True, "kernels": "fused-gemm", "memory_efficient": True}),
    "ours_x2": ("ours, 2 runs at once taking turns (train.py --seeds 0 1): images/s of both", {"runs": 2}),
    "ours_x3": ("ours, 3 runs at once taking turns (--seeds 0 1 2): images/s of all", {"runs": 3}),
    "graph_x2": ("graph, 2 runs at once, each on its CUDA stream: images/s of both", {"graph": True, "runs": 2}),
    "graph_x3": ("graph, 3 runs at once, each on its CUDA stream: images/s of all", {"graph": True, "runs": 3}),
}
# "auto" kernels are pinned to what RunConfig.kernels_on gives the device (fused on a CPU in
# float32, ATen on a GPU) unless "autotune": no mode but graph_auto times candidates
OURS = {"model": "ours", "channels_last": True, "allocator": True, "kernels": "auto",
        "precision": "fp32", "memory_efficient": False, "compile": False, "graph": False,
        "autotune": False, "unpadded": False, "runs": 1}
DEFAULT_MODES = {"cpu": "torchvision,plain,channels_last,aten,ours,bf16,memory_efficient",
                 "cuda": "torchvision,ours,graph,graph_bf16,graph_fused,graph_fused_bf16,graph_gemm,"
                         "graph_gemm_bf16,graph_fused_bf16_unpadded,graph_gemm_bf16_unpadded,graph_compile,memory_efficient,"
                         "graph_memory_efficient,graph_gemm_memory_efficient"}
# ratios printed under the table: (mode, against)
RATIOS = [("graph", "ours"), ("graph_auto", "graph"), ("graph_bf16", "graph"), ("bf16", "ours"),
          ("graph_fused", "graph"),
          ("graph_fused_bf16", "graph_bf16"), ("graph_fused_bf16", "graph_fused_bf16_unpadded"),
          ("graph_gemm", "graph_fused"), ("graph_gemm", "graph"), ("graph_gemm_bf16", "graph_fused_bf16"),
          ("graph_gemm_bf16", "graph_bf16"), ("graph_gemm_bf16", "graph_gemm_bf16_unpadded"), ("graph_gemm_memory_efficient", "graph_gemm"),
          ("graph_compile", "graph"), ("memory_efficient", "ours"),
          ("graph_memory_efficient", "graph"), ("ours_x2", "ours"), ("ours_x3", "ours"),
          ("graph_x2", "graph"), ("graph_x3", "graph")]


def torchvision_cifar_densenet(depth: int, growth_rate: int, num_classes: int = 10):
    """torchvision's DenseNet-BC with the paper's CIFAR stem instead of the ImageNet one."""
    import torch.nn as nn
    import torchvision
    layers = (depth - 4) // 6
    model = torchvision.models.DenseNet(growth_rate=growth_rate, block_config=(layers,) * 3,
                                        num_init_features=2 * growth_rate, bn_size=4,
                                        num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(3, 2 * growth_rate, 3, padding=1, bias=False)
    # the paper's CIFAR net goes from the stem straight into the first block
    model.features.norm0 = nn.Identity()
    model.features.relu0 = nn.Identity()
    model.features.pool0 = nn.Identity()
    return model


def measure(settings: dict) -> dict:
    import torch

    from densenet_trainer.runtime import keep_freed_memory_mapped

    mode = {**OURS, **MODES[settings["mode"]][1]}
    if mode["allocator"]:
        keep_freed_memory_mapped()
    if mode["unpadded"]:  # the A of an A/B: what conv_padding gains
        from densenet_trainer.speed import triton_kernels
        triton_kernels.CONV_CHANNEL_MULTIPLE = {}
    device = torch.device(settings["device"])
    kernels = "compile" if mode["compile"] else mode["kernels"]
    if kernels == "auto" and not mode["autotune"]:
        kernels = RunConfig(precision=mode["precision"]).kernels_on(device.type)
    cfg = RunConfig(depth=settings["depth"], growth_rate=settings["growth_rate"],
                    batch_size=settings["batch"], channels_last=mode["channels_last"],
                    kernels=kernels, precision=mode["precision"],
                    memory_efficient=mode["memory_efficient"], cuda_graph=mode["graph"])
    torch.manual_seed(0)
    model = (torchvision_cifar_densenet(cfg.depth, cfg.growth_rate)
             if mode["model"] == "torchvision" else None)
    runs = [synthetic_run(replace(cfg, seed=seed), device, settings["warmup"] + settings["steps"] + 1, model)
            for seed in range(mode["runs"])]
    run, run_step, parameters = runs[0], together(runs, device), runs[0].parameters
    for _ in range(settings["warmup"]):
        run_step()
    synchronize(device)
    times, system, peaks = [], [], []
    for _ in range(settings["steps"]):
        base = reset_peak(device)
        kernel = os.times().system
        start = time.perf_counter()
        run_step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        system.append(os.times().system - kernel)
        peaks.append(peak_since(base, device))
    launches = None
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as profiled:
            run_step()
            synchronize(device)
        launches = sum(1 for event in profiled.events()
                       if event.device_type == torch.autograd.DeviceType.CUDA)
    step_s = statistics.median(times)
    return {"images_per_s": settings["batch"] * len(runs) / step_s, "step_s": step_s, "system_s": statistics.median(system),
            # a graph keeps its memory in its own pool between replays: no peak to see
            "peak_mb": None if mode["graph"] else statistics.median(peaks) / 2**20,
            "parameters": parameters,
            "kernels": launches,
            # what really ran: the kernel set (and why) and the step (graphed, or eager and why)
            "kernels_used": run.kernel_choice.record(), "step": run.step_status}


def together(runs: list, device) -> Callable[[], None]:
    """A step of every run in ``runs``: the run's own step where there is one, else a step of
    each in turn as train.py --seeds takes them (each its random state and, on a GPU, its stream)."""
    if len(runs) == 1:
        return runs[0].run_step
    from densenet_trainer.loop.turns import Turn
    from densenet_trainer.random_state import rng_state

    def steps(run_step: Callable[[], None]) -> Generator[None, None, int]:
        while True:
            run_step()
            yield

    turns = [Turn(steps(run.run_step), device, rng_state()) for run in runs]  # timing: any state

    def round_of_steps() -> None:
        for turn in turns:
            turn.take(())
    return round_of_steps


def ran_as(runs: list[dict]) -> str:
    """How a mode's processes really stepped: kernel set and graph or eager ('mixed' where
    its processes differed); the reasons are in each process's JSON."""
    seen = {f"{r['kernels_used']['kernels']}, {r['step'].split(' ')[0].rstrip(':')}" for r in runs}
    return seen.pop() if len(seen) == 1 else "mixed: " + "; ".join(sorted(seen))


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    import torch
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", help=f"comma-separated, from: {', '.join(MODES)} (default: on a CPU "
                                   f"{DEFAULT_MODES['cpu']}; on CUDA {DEFAULT_MODES['cuda']})")
    run_config.add_flags(p, ["depth", "growth_rate"])  # of a DenseNet-BC
    p.add_argument("--batch", type=cli.positive_int, default=64, help="training batch size")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="fresh processes per mode")
    p.add_argument("--steps", type=cli.positive_int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=cli.count, default=2,
                   help="untimed steps per process first (a CUDA graph adds its own)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads per process")
    add_device_flag(p)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        like = {"mode": "ours", "depth": 100, "growth_rate": 12, "batch": 64, "device": "cpu",
                "steps": 5, "warmup": 0}
        settings = one_settings(args.one, like, {"mode": tuple(MODES), "device": ("cpu", "cuda")})
        RunConfig(depth=settings["depth"], growth_rate=settings["growth_rate"])  # refuses what cannot be built
        print(json.dumps(measure(settings)))
        return 0
    modes = (args.modes or DEFAULT_MODES[args.device]).split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    graphs = [m for m in modes if MODES[m][1].get("graph")]
    if graphs and args.device != "cuda":
        p.error(f"mode(s) {', '.join(graphs)} capture a CUDA graph and need --device cuda")
    cfg, _ = RunConfig.from_flags(args)
    print(f"DenseNet-BC-{cfg.depth}-{cfg.growth_rate}, batch {args.batch}, {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}; {args.repeats} processes x "
          f"{args.steps} steps per mode; median [min-max]")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # interleave modes so that machine noise falls on all alike
        for mode in modes:
            settings = {"mode": mode, "depth": cfg.depth, "growth_rate": cfg.growth_rate,
                        "batch": args.batch, "device": args.device, "steps": args.steps,
                        "warmup": args.warmup}
            results[mode].append(in_fresh_process(__file__, settings, args.threads))
    rows = [("mode", "images/s", "kernels/step", "300 epochs", "kernel s/step", "step peak MB",
             "parameters", "ran as", "what")]
    median = {mode: statistics.median(r["images_per_s"] for r in runs) for mode, runs in results.items()}
    for mode in modes:
        runs = results[mode]
        kernels = runs[0]["kernels"]
        rows.append((mode, spread([r["images_per_s"] for r in runs]),
                     "-" if kernels is None else f"{kernels:,}",
                     f"{300 * 50_000 / median[mode] / 3600:.2f} h",
                     spread([r["system_s"] for r in runs]),
                     "-" if runs[0]["peak_mb"] is None else spread([r["peak_mb"] for r in runs]),
                     f"{runs[0]['parameters']:,}", ran_as(runs), MODES[mode][0]))
    print_table(rows)
    pairs = [(mode, "torchvision") for mode in modes if mode != "torchvision"] + RATIOS
    for mode, against in pairs:
        if mode in median and against in median:
            print(f"{mode} / {against}: {median[mode] / median[against]:.2f}x images/s "
                  f"({median[against] / median[mode]:.2f}x the step time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
