"""Where a training step's time goes: one step of each path under torch.profiler, its
kernel time by group, as a table.

On a GPU the groups are the device's kernels: cuDNN's convolutions (forward, data gradient,
weight gradient), BatchNorm and elementwise kernels, the fused path's Triton kernels (the
main passes over the pixels, and the finish kernels that reduce their partial sums), the
optimiser, and the rest; the step runs eagerly here (the kernels a CUDA graph replays are
the same). On a CPU the groups are ATen's operations by their own (self) time, the fused C
kernels under their autograd functions, and the step's time outside any of them. Each
path's step is profiled in a fresh process (a second profile in one process ran several
times slower), after untimed warm-up steps, on random images, as train.py builds it.

  python bench/profile.py                                  # BC-100-12, batch 64, the device's paths
  python bench/profile.py --device cuda --paths aten,fused,aten_bf16,fused_bf16
"""
from __future__ import annotations

import argparse
import json
import sys

from densenet_trainer.config import cli, run_config
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.measuring import (
    add_device_flag,
    in_fresh_process,
    one_settings,
    print_table,
    synthetic_run,
)

if __name__ == "profile":
    # Any script run from bench/ has this folder first on the import path, where this file's
    # name hides the standard library's profile module, which cProfile imports (and through it
    # torch.compile's machinery, imported when an optimiser is built): imported under that
    # name, this module makes the standard one take its place.
    import importlib.util
    import sysconfig
    _spec = importlib.util.spec_from_file_location("profile", f"{sysconfig.get_paths()['stdlib']}/profile.py")
    _standard = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_standard)
    sys.modules["profile"] = _standard

# path: the settings of train.py's step it profiles
PATHS = {"aten": {"kernels": "aten"}, "fused": {"kernels": "fused"},
         "aten_bf16": {"kernels": "aten", "precision": "bf16"},
         "fused_bf16": {"kernels": "fused", "precision": "bf16"},
         "memory_efficient": {"kernels": "fused", "memory_efficient": True}}
DEFAULT_PATHS = {"cpu": "aten,fused,memory_efficient", "cuda": "aten,fused,aten_bf16,fused_bf16"}
TRITON_FINISH = ("_stats_finish_kernel", "_backward_finish_kernel")  # speed/triton_kernels.py
TRITON_MAIN = ("_norm_relu_kernel", "_norm_relu_backward_kernel", "_stats_kernel", "_finish_grad_kernel")
FUSED_FUNCTIONS = ("_NormReLU", "_Gather")  # speed/fused.py's autograd functions (C on a CPU)
OUTSIDE = "outside any operation (Python, waiting)"
GROUPS = ("convolution forward", "convolution data-gradient", "convolution weight-gradient",
          "convolution backward (data and weight)", "BatchNorm and elementwise",
          "Triton main passes", "Triton finish", "fused C kernels", "optimiser", "others", OUTSIDE)
ELEMENTWISE = ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "elementwise", "relu", "threshold",
               "add", "mul", "div", "copy", "fill", "reduce", "cat", "where", "clamp", "sum", "mean")


def group_of(name: str) -> str:
    """The group of a kernel (GPU) or an ATen operation (CPU), by its name."""
    lowered = name.lower()
    if any(kernel in name for kernel in TRITON_FINISH):
        return "Triton finish"
    if any(kernel in name for kernel in TRITON_MAIN):
        return "Triton main passes"
    if any(function in name for function in FUSED_FUNCTIONS):
        return "fused C kernels"
    if "dgrad" in lowered:
        return "convolution data-gradient"
    if "wgrad" in lowered:
        return "convolution weight-gradient"
    if "convolution_backward" in lowered:
        return "convolution backward (data and weight)"
    if any(word in lowered for word in ("conv", "fprop", "implicit_gemm", "xmma", "cutlass")):
        return "convolution forward"
    if any(word in lowered for word in ("sgd", "multi_tensor", "foreach", "optimizer")):
        return "optimiser"
    if any(word in lowered for word in ELEMENTWISE):
        return "BatchNorm and elementwise"
    return "others"


def profile_step(cfg: RunConfig, device_type: str, warmup: int) -> dict[str, tuple[float, int]]:
    """One step of ``cfg``'s training: milliseconds and count of kernels (or operations) by
    group, and the step's own milliseconds under "step"."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from densenet_trainer.runtime import synchronize
    device = torch.device(device_type)
    run = synthetic_run(cfg, device, warmup + 1)
    for _ in range(warmup):
        run.run_step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiled:
        began = time.perf_counter()
        run.run_step()
        synchronize(device)
        step_ms = 1e3 * (time.perf_counter() - began)
    totals: dict[str, list] = {}
    for event in profiled.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if on_device != (device.type == "cuda"):
            continue
        us = event.device_time if on_device else event.self_cpu_time_total
        entry = totals.setdefault(group_of(event.name), [0.0, 0])
        entry[0] += us / 1e3
        entry[1] += 1
    if device.type == "cpu":  # the step's time that no operation's own time covers
        totals[OUTSIDE] = [max(0.0, step_ms - sum(ms for ms, _ in totals.values())), 0]
    return {**{group: (ms, count) for group, (ms, count) in totals.items()}, "step": (step_ms, 0)}


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    import torch
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paths", help=f"comma-separated, from: {', '.join(PATHS)} (default: on a CPU "
                                   f"{DEFAULT_PATHS['cpu']}; on CUDA {DEFAULT_PATHS['cuda']})")
    run_config.add_flags(p, ["depth", "growth_rate"])  # of a DenseNet-BC
    p.add_argument("--batch", type=cli.positive_int, default=64, help="training batch size")
    p.add_argument("--warmup", type=cli.count, default=3, help="untimed steps before the profiled one")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="CPU threads per process")
    add_device_flag(p)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        like = {"path": "aten", "depth": 100, "growth_rate": 12, "batch": 64, "device": "cpu", "warmup": 0}
        one = one_settings(args.one, like, {"path": tuple(PATHS), "device": ("cpu", "cuda")})
        cfg = RunConfig(depth=one["depth"], growth_rate=one["growth_rate"], batch_size=one["batch"],
                        cuda_graph=False, **PATHS[one["path"]])
        print(json.dumps(profile_step(cfg, one["device"], one["warmup"])))
        return 0
    paths = list(dict.fromkeys((args.paths or DEFAULT_PATHS[args.device]).split(",")))
    unknown = [path for path in paths if path not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    cfg, _ = RunConfig.from_flags(args)
    print(f"DenseNet-BC-{cfg.depth}-{cfg.growth_rate}, batch {args.batch}, {args.device}, torch "
          f"{torch.__version__}: one eager step per path after {args.warmup} untimed; "
          f"{'kernel' if args.device == 'cuda' else 'operation self'} time in ms (% of the step)")
    profiles = {path: in_fresh_process(__file__, {"path": path, "depth": cfg.depth, "growth_rate": cfg.growth_rate,
                                                  "batch": args.batch, "device": args.device,
                                                  "warmup": args.warmup}, args.threads)
                for path in paths}
    rows = [("group", *paths)]
    for group in (*GROUPS, "step"):
        if any(group in profile for profile in profiles.values()):
            rows.append((group, *(cell(profile, group) for profile in profiles.values())))
    print_table(rows)
    return 0


def cell(profile: dict[str, list], group: str) -> str:
    """A group's milliseconds, its share of the step and how many kernels or operations."""
    if group not in profile:
        return "-"
    ms, count = profile[group]
    if group == "step":
        return f"{ms:.2f}"
    return f"{ms:.2f} ({100 * ms / profile['step'][0]:.0f}%)" + (f" x{count}" if count else "")


if __name__ == "__main__":
    sys.exit(main())
