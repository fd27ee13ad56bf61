"""Where a training step's time goes: one step of each path under torch.profiler, its
time by the call that spent it, as a table.

Every kernel a GPU runs is filed under the call that launched it, found by walking up from
the PyTorch operation the profiler links it to, through the operations and autograd nodes
around it, to the first that names a part of the step: a convolution forward, a
convolution's backward (its data and weight gradients, whatever cuDNN names its GEMMs and
split-K reductions), a BatchNorm-ReLU forward or backward (ATen's operations, or the fused
path's autograd functions and the Triton kernels they launch), pooling, the loss and the
classifier, the optimiser; the rest is "others". On a CPU each operation's own (self) time is
filed the same way, and the step's time outside any operation apart. The step runs eagerly
(the kernels a CUDA graph replays are the same). Each path's step is profiled in a fresh
process (a second profile in one process ran several times slower), after untimed warm-up
steps, on random images, as train.py builds it.

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
         "memory_efficient": {"kernels": "fused", "memory_efficient": True},
         "fused_gemm": {"kernels": "fused-gemm"}, "fused_gemm_bf16": {"kernels": "fused-gemm", "precision": "bf16"}}
DEFAULT_PATHS = {"cpu": "aten,fused,memory_efficient",
                 "cuda": "aten,fused,fused_gemm,aten_bf16,fused_bf16,fused_gemm_bf16"}
OUTSIDE = "outside any operation (Python, waiting)"
UNLINKED = "kernels linked to no call"
# The parts of a step, each with the names of the calls that make it (PyTorch operations,
# autograd nodes, profiler ranges such as the optimisers' own); a kernel or an operation is
# filed under the first part that the innermost of its calls names.
CALLS = (
    ("optimiser", ("Optimizer.", "_foreach_", "_fused_sgd", "_fused_adam")),
    ("1x1 GEMM with BatchNorm-ReLU backward (fused-gemm)", ("NormReLUMatmulBackward",)),
    ("1x1 GEMM with BatchNorm-ReLU forward (fused-gemm)", ("_NormReLUMatmul",)),
    ("convolution backward (data and weight)", ("ConvolutionBackward", "convolution_backward")),
    ("convolution forward", ("convolution",)),
    ("BatchNorm-ReLU backward", ("NormReLUBackward", "NormReLUConvBackward", "GatherBackward",
                                 "BatchNormBackward", "batch_norm_backward", "ThresholdBackward",
                                 "threshold_backward", "ReluBackward")),
    ("BatchNorm-ReLU forward", ("_NormReLU", "_Gather", "batch_norm", "relu", "threshold")),
    ("concatenation", ("aten::cat", "CatBackward")),
    ("pooling", ("pool", "Pool")),
    ("loss and classifier", ("cross_entropy", "nll_loss", "log_softmax", "NllLoss", "LogSoftmax",
                             "addmm", "Addmm", "linear")),
)
GROUPS = (*(group for group, _ in CALLS), "others", UNLINKED, OUTSIDE)


def group_of(calls: list[str]) -> str:
    """The part of the step that ``calls`` (innermost first: an operation and the calls
    around it) belong to."""
    for name in calls:
        for group, names in CALLS:
            if any(part in name for part in names):
                return group
    return "others"


def calls_of(event) -> list[str]:
    """A profiler event's name and those of the calls around it, innermost first."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def profile_step(cfg: RunConfig, device_type: str, warmup: int) -> dict[str, tuple[float, int]]:
    """One step of ``cfg``'s training: milliseconds and count of kernels (or operations) by
    the part of the step that launched them, and the step's own milliseconds under "step"."""
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
    on_device = 0.0  # every kernel's microseconds, linked to a call or not
    for event in profiled.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            on_device += event.time_range.elapsed_us()
            continue  # a GPU's kernels are counted with the operation that launched them
        spent = ([kernel.duration for kernel in event.kernels] if device.type == "cuda"
                 else [event.self_cpu_time_total])
        if spent:
            entry = totals.setdefault(group_of(calls_of(event)), [0.0, 0])
            entry[0] += sum(spent) / 1e3
            entry[1] += len(spent)
    unlinked = on_device / 1e3 - sum(ms for ms, _ in totals.values())
    if device.type == "cuda" and unlinked > 0.01 * step_ms:  # kernels the profiler tied to no call
        totals[UNLINKED] = [unlinked, 0]
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
