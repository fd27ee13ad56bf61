#!/usr/bin/env python3
"""Training memory of the standard vs the memory-efficient DenseNet, and the step-time ratio.

For each model and mode, in fresh processes: the bytes autograd saves for backward (exact:
every saved tensor's storage counted once), the peak memory of one training step (CUDA:
max_memory_allocated; CPU: the growth of peak RSS), and the median step time.

  python bench/memory.py                       # BC-100-12 batch 64, BC-250-24 batch 16
  python bench/memory.py --repeats 5 --steps 5
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

from common import in_fresh_process, print_table, spread

MODELS = [("densenet-bc-100-12", 100, 12, 64), ("densenet-bc-250-24", 250, 24, 16)]


def measure(config: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from densenet import DenseNet

    device = torch.device(config["device"])
    torch.manual_seed(0)
    model = DenseNet(config["depth"], config["growth_rate"], True, 0.5,
                     memory_efficient=config["memory_efficient"]).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, nesterov=True)
    images = torch.randn(config["batch"], 3, 32, 32, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (config["batch"],), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(images), labels)
    del loss
    step()  # warm-up: optimizer state and allocator pools exist from here on
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"saved_mb": sum(saved.values()) / 2**20, "peak_mb": peak / 2**20,
            "step_s": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    print(f"device {args.device}, {args.threads} threads, {args.repeats} processes x "
          f"{args.steps} steps each; median [min-max]")
    rows = [("model", "batch", "mode", "saved for backward MB", "peak step MB", "step s")]
    summary = []
    for name, depth, k, batch in MODELS:
        results = {}
        for efficient in (False, True):
            config = {"depth": depth, "growth_rate": k, "batch": batch, "device": args.device,
                      "memory_efficient": efficient, "steps": args.steps}
            # alternate the modes so that machine noise falls on both alike
            results[efficient] = [in_fresh_process(__file__, config, args.threads)
                                  for _ in range(args.repeats)]
            runs = results[efficient]
            rows.append((name, batch, "memory-efficient" if efficient else "standard",
                         spread([r["saved_mb"] for r in runs]), spread([r["peak_mb"] for r in runs]),
                         spread([r["step_s"] for r in runs])))
        med = {e: {key: statistics.median(r[key] for r in results[e]) for key in results[e][0]}
               for e in results}
        summary.append(f"{name} batch {batch}: memory-efficient / standard = "
                       f"{med[True]['saved_mb'] / med[False]['saved_mb']:.3f}x saved activations, "
                       f"{med[True]['peak_mb'] / med[False]['peak_mb']:.3f}x peak step memory, "
                       f"{med[True]['step_s'] / med[False]['step_s']:.3f}x step time")
    print_table(rows)
    print("\n".join(summary))


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
