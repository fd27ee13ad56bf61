#!/usr/bin/env python3
"""Training speed of DenseNet-BC on this machine: our modes against torchvision's DenseNet.

Every configuration runs in fresh processes (several repetitions) and reports training
images/s at the median step time, with min-max over the processes, the peak memory a step
adds, and CPU time spent in the kernel (page faults show up there). The reference is
torchvision's DenseNet built to the same CIFAR architecture (3x3 stem conv, no max-pool,
three blocks of equal size, same parameter count), measured in the same run, so the ratio
holds even on a noisy machine.

  python bench/speed.py                         # BC-100-12, batch 64, 2 threads
  python bench/speed.py --modes torchvision,ours --repeats 5
  python bench/speed.py --modes ours,compile    # compile takes minutes on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from common import add_device_flag, in_fresh_process, peak_since, print_table, reset_peak, spread
import cli  # noqa: E402  (common puts the project on sys.path)
from densenet import check_config  # noqa: E402

MODES = {
    "torchvision": "torchvision.models.DenseNet, CIFAR stem, eager, contiguous (reference)",
    "plain": "ours, contiguous memory format, default glibc allocator",
    "channels_last": "ours, channels_last, default glibc allocator",
    "aten": "ours, channels_last, freed memory kept mapped, ATen ops instead of fused.py",
    "ours": "ours as train.py runs it: channels_last, freed memory kept mapped",
    "bf16": "ours + bf16 autocast",
    "memory_efficient": "ours + --memory-efficient",
    "compile": "ours + torch.compile",
}
DEFAULT_MODES = "torchvision,plain,channels_last,aten,ours,bf16,memory_efficient"


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


def measure(config: dict) -> dict:
    import torch
    import torch.nn.functional as F

    import fused
    import train
    from densenet import DenseNet

    mode = config["mode"]
    if mode == "aten":
        fused.available = lambda x: False
    if mode not in ("torchvision", "plain", "channels_last"):
        train.keep_freed_memory_mapped()
    torch.manual_seed(0)
    device = torch.device(config["device"])
    if mode == "torchvision":
        model = torchvision_cifar_densenet(config["depth"], config["growth_rate"])
    else:
        model = DenseNet(config["depth"], config["growth_rate"], True, 0.5,
                         memory_efficient=mode == "memory_efficient")
    parameters = sum(p.numel() for p in model.parameters())
    channels_last = mode not in ("torchvision", "plain")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4, foreach=mode != "torchvision")
    step_model = torch.compile(model) if mode == "compile" else model
    batch = config["batch"]
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), device=device)
    dtype = torch.bfloat16 if mode == "bf16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(step_model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(config["warmup"]):
        step()
    times, system, peaks = [], [], []
    for _ in range(config["steps"]):
        base = reset_peak(device)
        kernel = os.times().system
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        system.append(os.times().system - kernel)
        peaks.append(peak_since(base, device))
    step_s = statistics.median(times)
    return {"images_per_s": batch / step_s, "step_s": step_s, "system_s": statistics.median(system),
            "peak_mb": statistics.median(peaks) / 2**20, "parameters": parameters}


def main(argv: list[str] | None = None) -> int:
    import torch
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--depth", type=int, default=100)
    p.add_argument("--growth-rate", type=int, default=12)
    p.add_argument("--batch", type=cli.positive_int, default=64)
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="fresh processes per mode")
    p.add_argument("--steps", type=cli.positive_int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=cli.count, default=2)
    p.add_argument("--threads", type=cli.positive_int, default=2)
    add_device_flag(p)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    try:
        check_config(args.depth, args.growth_rate, True, 0.5)
    except ValueError as error:
        p.error(str(error))
    print(f"DenseNet-BC-{args.depth}-{args.growth_rate}, batch {args.batch}, {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}; {args.repeats} processes x "
          f"{args.steps} steps per mode; median [min-max]")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):  # interleave modes so that machine noise falls on all alike
        for mode in modes:
            config = {"mode": mode, "depth": args.depth, "growth_rate": args.growth_rate,
                      "batch": args.batch, "device": args.device, "steps": args.steps,
                      "warmup": args.warmup}
            results[mode].append(in_fresh_process(__file__, config, args.threads))
    rows = [("mode", "images/s", "kernel s/step", "step peak MB", "parameters", "what")]
    for mode in modes:
        runs = results[mode]
        rows.append((mode, spread([r["images_per_s"] for r in runs]),
                     spread([r["system_s"] for r in runs]), spread([r["peak_mb"] for r in runs]),
                     f"{runs[0]['parameters']:,}", MODES[mode]))
    print_table(rows)
    if "torchvision" in results:
        reference = statistics.median(r["images_per_s"] for r in results["torchvision"])
        for mode in modes:
            if mode != "torchvision":
                ours = statistics.median(r["images_per_s"] for r in results[mode])
                print(f"{mode} / torchvision: {ours / reference:.2f}x images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
