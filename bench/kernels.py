"""What one training step (and one evaluation batch) launches on a GPU, counted on any machine
without one.

Inside a CUDA graph a step's kernels run one after another and each costs about 2 µs
however little it does, so their number bounds the step's speed: 1,000 kernels are 2 ms
before any real work. This script runs one training step of train.py (the same
``build.build_synthetic_run``) on the CPU and counts:

- every ATen operation that launches work on a GPU, seen by a TorchDispatchMode: views,
  metadata and allocations (``empty``) excluded;
- every Triton launch of the fused path: triton_kernels.py's wrappers run as on a GPU,
  their jitted kernels replaced by counters;
- how many of those touch at most TINY elements (the launch-bound ones), and an estimate of
  the bytes they move (every tensor each reads or writes, once);
- the floor a GPU cannot beat for that step: its bytes at the GPU's memory bandwidth, and its
  launches one after another at LAUNCH_US each (a floor, not a prediction: convolutions'
  arithmetic, caches and overlap are left out);
- per Triton kernel, its grid (programs per launch, fewest to most) and the loop each
  program runs: pixel tiles per program for the partial-sum passes, partial-sum rows added
  by a sum of rows (the last program of a partial-sum pass adds its rows too, unlisted);
- with ``--ptx``, per Triton kernel, its global loads and stores as an H100 would run them:
  every variant the step launches, specialised as Triton's JIT would specialise it, compiled
  for sm_90 by the bundled Triton (no GPU needed), its PTX counted as 16-byte, 8-byte and
  single-element instructions. A memory-bound pass that loads one element at a time issues
  four (float32) or eight (bfloat16) times the instructions for the same bytes.

The counts depend on the model, the batch and the code, never on the machine: the table is
the same everywhere.

Below the table, the same count for one evaluation batch of as many images (the model in
evaluation mode, its sums as the run keeps them).

  python bench/kernels.py                              # BC-100-12, batch 64
  python bench/kernels.py --depth 250 --growth-rate 24 --batch 16
  python bench/kernels.py --paths fused,"fused bf16" --ptx  # compiles ~40 variants: a minute or two
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from collections import Counter
from collections.abc import Iterator

from densenet_trainer.config import cli, run_config
from densenet_trainer.measuring import print_table

TINY = 1024  # elements: a kernel this small costs its launch, not its work
LAUNCH_US = 2.0  # a kernel's cost inside a CUDA graph when it does almost nothing
BANDWIDTH_TB_S = {"H100": 3.35, "H200": 4.8}  # HBM bandwidth (SXM), terabytes a second
SMS = 132  # streaming multiprocessors of an H100 or H200: a pass wants at least this many programs
# Operations that allocate without writing, or only describe memory: no kernel on a GPU.
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "lift_fresh", "set_", "resize_", "is_same_size", "_local_scalar_dense",
             "_has_compatible_shallow_copy_type", "record_stream", "as_strided_",
             "_record_function_enter_new", "_record_function_exit"}
PATHS = [  # (name, settings)
    ("aten", {"kernels": "aten"}),
    ("fused", {"kernels": "fused"}),
    ("aten bf16", {"kernels": "aten", "precision": "bf16"}),
    ("fused bf16", {"kernels": "fused", "precision": "bf16"}),
    ("aten memory-efficient", {"kernels": "aten", "memory_efficient": True}),
    ("fused memory-efficient", {"kernels": "fused", "memory_efficient": True}),
    ("fused-gemm", {"kernels": "fused-gemm"}),
    ("fused-gemm bf16", {"kernels": "fused-gemm", "precision": "bf16"}),
    ("fused-gemm memory-efficient", {"kernels": "fused-gemm", "memory_efficient": True}),
]


@dataclasses.dataclass
class Grid:
    """The launches of one Triton kernel in a step: how many, their programs and loops."""
    launches: int = 0
    programs: tuple[int, int] = (0, 0)  # fewest, most
    loop: int = 0  # the most a program loops: pixel tiles (main passes) or partial-sum rows (finish)
    elements: tuple[int, int] = (0, 0)  # pixels x channels per launch: fewest, most

    def add(self, programs: int, loop: int, elements: int) -> None:
        first = not self.launches
        self.launches += 1
        self.programs = (programs, programs) if first else (min(self.programs[0], programs),
                                                            max(self.programs[1], programs))
        self.elements = (elements, elements) if first else (min(self.elements[0], elements),
                                                            max(self.elements[1], elements))
        self.loop = max(self.loop, loop)


@dataclasses.dataclass
class Count:
    """What one step (or one evaluation batch) launched."""
    aten: int = 0
    triton: int = 0
    tiny: int = 0
    bytes: int = 0
    names: Counter = dataclasses.field(default_factory=Counter)
    grids: dict[str, Grid] = dataclasses.field(default_factory=dict)
    variants: set[Variant] = dataclasses.field(default_factory=set)  # the Triton kernels' specialisations
    evaluation: Count | None = None  # one evaluation batch's, beside a training step's

    def floor_ms(self, gpu: str) -> float:
        """The step's floor on ``gpu``: its bytes at the bandwidth or its launches one after
        another, whichever takes longer."""
        return max(self.bytes / (BANDWIDTH_TB_S[gpu] * 1e12), self.total * LAUNCH_US * 1e-6) * 1e3

    @property
    def total(self) -> int:
        return self.aten + self.triton

    def add(self, name: str, tensors: list, triton: bool = False) -> None:
        if triton:
            self.triton += 1
        else:
            self.aten += 1
        self.names[name] += 1
        largest = max((t.numel() for t in tensors), default=0)
        self.tiny += largest <= TINY
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)


def _tensors(value) -> list:
    import torch
    from torch.utils._pytree import tree_leaves
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


@contextlib.contextmanager
def counting(count: Count) -> Iterator[None]:
    """Count the ATen operations run inside, as ``count.add`` does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not func.is_view and name not in NO_KERNEL:
                count.add(f"aten.{name}", _tensors((args, kwargs, out)))
            return out

    with Mode():
        yield


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled variant of a Triton kernel, as Triton's JIT specialises a launch: the
    arguments' types, the constexprs (and integers equal to 1), and the pointers and integers
    known to be multiples of 16 (bytes for pointers, a value for integers)."""
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, object], ...]
    divisible: tuple[int, ...]

    @classmethod
    def of_launch(cls, name: str, kernel, named: dict) -> Variant:
        import torch
        types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}
        signature, constants, divisible = [], [], []
        for index, param in enumerate(_jit_function(kernel).params):
            value = named[param.name]
            if param.is_constexpr or (isinstance(value, int) and value == 1 and not param.do_not_specialize):
                signature.append((param.name, "constexpr"))
                constants.append((param.name, value))
            elif isinstance(value, torch.Tensor):
                signature.append((param.name, "*" + types[value.dtype]))
                divisible += [index] if value.data_ptr() % 16 == 0 else []
            elif isinstance(value, bool):
                signature.append((param.name, "i1"))
            elif isinstance(value, int):
                signature.append((param.name, "i32" if -2**31 <= value < 2**31 else "i64"))
                divisible += [index] if value % 16 == 0 and not param.do_not_specialize else []
            else:
                signature.append((param.name, "fp32"))
        return cls(name, tuple(signature), tuple(constants), tuple(divisible))

    def memory_instructions(self) -> Counter:
        """This variant compiled for an H100 (sm_90): its PTX's global loads and stores, by
        width ('16-byte load', '4-byte store', ...)."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = _kernel(self.kernel)
        if not hasattr(kernel, "params"):
            raise RuntimeError("TRITON_INTERPRET=1 is set: Triton interprets kernels instead of compiling them")
        source = ASTSource(fn=kernel, signature=dict(self.signature),
                           constexprs=dict(self.constants),
                           attrs={(index,): [["tt.divisibility", 16]] for index in self.divisible})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        found = Counter()
        for kind, vector, bits in re.findall(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
            found[f"{int(vector or 1) * int(bits) // 8}-byte {'load' if kind == 'ld' else 'store'}"] += 1
        return found


def _jit_function(kernel):
    """A Triton kernel as its JIT sees it (its parameters), also where TRITON_INTERPRET made
    it an interpreted function."""
    if hasattr(kernel, "params"):
        return kernel
    from triton.runtime.jit import JITFunction
    return JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"))


class _CountedLaunch:
    """Stands for a jitted Triton kernel: ``kernel[grid](*args)`` counts one launch, with its
    grid and its loop (read from the arguments named as the kernel names them) and the
    variant Triton would compile for it."""

    def __init__(self, name: str, kernel, count_of) -> None:
        self.name, self.kernel, self.count_of = name, kernel, count_of

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            count = self.count_of()
            count.add(f"triton.{self.name}", _tensors((args, kwargs)), triton=True)
            named = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
            count.variants.add(Variant.of_launch(self.name, self.kernel, named))
            programs = 1
            for size in grid:
                programs *= size
            if "blocks" in named:  # a sum of rows adds every row of partial sums
                loop = named["blocks"]
            elif "tiles" in named:  # a partial-sum pass: each row of programs takes every rows-th tile
                loop = -(-named["tiles"] // grid[-1])  # rows of programs: the grid's last axis
            else:
                loop = 1
            if "size" in named:  # a sum of rows of ``size`` elements each
                elements = named["size"]
            else:
                elements = named["P"] * (named["C"] if "C" in named else named["C_units"] * named["ALIGN"])
            count.grids.setdefault(self.name, Grid()).add(programs, loop, elements)
        return launch


def _kernel_modules() -> tuple:
    """The modules of Triton kernels: fused.py's and fused_gemm.py's."""
    from densenet_trainer.speed import gemm_kernels, triton_kernels
    return triton_kernels, gemm_kernels


def _kernel(name: str):
    """The jitted Triton kernel ``_name`` of whichever module defines it."""
    return next(getattr(module, f"_{name}") for module in _kernel_modules() if hasattr(module, f"_{name}"))


@contextlib.contextmanager
def triton_counted(count_of) -> Iterator[None]:
    """fused.py's and fused_gemm.py's kernels as on CUDA: their Triton wrappers, with every
    jitted kernel counted instead of launched, on any device (``count_of()`` is the Count to
    add to)."""
    from densenet_trainer.speed import fused, fused_gemm, kernel_check, triton_kernels
    triton_module, gemm_module = _kernel_modules()
    kernels = {(module, name): getattr(module, name) for module in (triton_module, gemm_module)
               for name in dir(module) if name.startswith("_") and name.endswith("_kernel")}
    saved = fused.backend, fused_gemm.backend, kernel_check.failure, kernel_check.gemm_failure
    try:
        for (module, name), kernel in kernels.items():
            setattr(module, name, _CountedLaunch(name.strip("_"), kernel, count_of))
        fused.backend = lambda device_type: triton_kernels
        fused_gemm.backend = lambda device_type: gemm_module
        # nothing to check: nothing computes
        kernel_check.failure = kernel_check.gemm_failure = lambda device_type: None
        yield
    finally:
        fused.backend, fused_gemm.backend, kernel_check.failure, kernel_check.gemm_failure = saved
        for (module, name), kernel in kernels.items():
            setattr(module, name, kernel)


def count_step(cfg: run_config.RunConfig) -> Count:
    """What one training step of ``cfg`` launches (its second: the optimiser has its state).

    The step runs on the CPU, but with the fused path's Triton wrappers, whose kernels only
    count: what they would write is left as it was, so the numbers mean nothing, the count
    everything (the step never branches on a value)."""
    import torch

    from densenet_trainer.data import loader
    from densenet_trainer.loop.evaluation import EvaluationSums
    from densenet_trainer.run import build
    from densenet_trainer.runtime import Runtime
    count, evaluation = Count(), Count()
    current = [Count()]  # the step before the counted one counts into a Count of its own
    with triton_counted(lambda: current[0]):
        cfg = dataclasses.replace(cfg, cuda_graph=False, device="cpu")
        run = build.build_synthetic_run(cfg, Runtime(torch.device("cpu")), 2,
                                        log=lambda *a, **k: None, self_test=False)
        run.step()
        current[0] = count
        with counting(count):
            run.step()
        run.step.model.eval()
        batch = loader.EvalBatches(run.test, cfg.batch_size, run.normalizer, run.runtime.device,
                                   channels_last=cfg.channels_last).batch(torch.zeros(1, dtype=torch.int64))
        sums = EvaluationSums(run.step.model, run.step.precision, cfg.num_classes, run.runtime.device)
        with torch.no_grad():
            current[0] = Count()
            sums.add(*batch)  # the first: lazy state, as for the step
            current[0] = evaluation
            with counting(evaluation):
                sums.add(*batch)
    count.evaluation = evaluation
    return count


def _loop_kind(kernel: str) -> str:
    """What a kernel's programs loop over, by the argument that says how many: "tiles" (pixel
    tiles), "blocks" (rows of partial sums, a sum of rows), or "" (nothing)."""
    names = _kernel(kernel).arg_names
    return "tiles" if "tiles" in names else "blocks" if "blocks" in names else ""


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    parser = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    run_config.add_flags(parser, run_config.flag_names("model", leave_out={"dropout", "memory_efficient"}))
    parser.add_argument("--batch", type=cli.positive_int, default=64, help="images per step")
    parser.add_argument("--paths", default=",".join(name for name, _ in PATHS),
                        help="which of: " + ", ".join(name for name, _ in PATHS))
    parser.add_argument("--top", type=cli.positive_int, default=0, metavar="N",
                        help="also list each path's N most frequent operations")
    parser.add_argument("--ptx", action="store_true",
                        help="also compile each Triton kernel as the step launches it for an H100 "
                             "(sm_90) and count its PTX's global loads and stores by width")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.paths.split(",")]
    unknown = [name for name in chosen if name not in dict(PATHS)]
    if unknown:
        parser.error(f"--paths: unknown {', '.join(unknown)}; choose from {', '.join(dict(PATHS))}")
    try:
        cfg, _ = run_config.RunConfig.from_flags(args)
    except cli.UserError as error:
        parser.error(str(error))
    cfg = dataclasses.replace(cfg, batch_size=args.batch)
    print(f"one training step of {cfg.model_name}, batch {args.batch}: kernels a GPU would "
          f"launch (ATen operations + Triton launches); tiny: at most {TINY:,} elements")
    rows = [("path", "ATen ops", "Triton", "total", "tiny", "MB moved (estimate)",
             *(f"floor ms, {gpu}" for gpu in BANDWIDTH_TB_S))]
    counts = {}
    for name in chosen:
        counts[name] = count = count_step(dataclasses.replace(cfg, **dict(PATHS)[name]))
        rows.append((name, f"{count.aten:,}", f"{count.triton:,}", f"{count.total:,}",
                     f"{count.tiny:,}", f"{count.bytes / 1e6:,.0f}",
                     *(f"{count.floor_ms(gpu):.2f}" for gpu in BANDWIDTH_TB_S)))
    print_table(rows)
    print(f"floor: the step's bytes at the GPU's bandwidth ({', '.join(f'{g} {b} TB/s' for g, b in BANDWIDTH_TB_S.items())}) "
          f"or its launches one after another at {LAUNCH_US:g} µs, whichever is longer; no GPU beats it")
    print(f"\none evaluation batch of {args.batch}:")
    print_table([("path", "ATen ops", "Triton", "total", "tiny", "MB moved (estimate)")]
                + [(name, f"{e.aten:,}", f"{e.triton:,}", f"{e.total:,}", f"{e.tiny:,}", f"{e.bytes / 1e6:,.0f}")
                   for name, e in ((name, count.evaluation) for name, count in counts.items())])
    grids = [(name, kernel, grid) for name, count in counts.items() for kernel, grid in count.grids.items()]
    if grids:
        print()
        table = [("path", "Triton kernel", "launches", "programs per launch", "loop per program",
                  "elements per launch")]
        for name, kernel, grid in grids:
            loop = {"blocks": f"{grid.loop} partial-sum rows", "tiles": f"{grid.loop} pixel tile(s)"}.get(
                _loop_kind(kernel), "1 tile")
            table.append((name, kernel, f"{grid.launches:,}", f"{grid.programs[0]:,}-{grid.programs[1]:,}",
                          loop, f"{grid.elements[0]:,}-{grid.elements[1]:,}"))
        print_table(table)
        print(f"programs: a pass on fewer than a GPU's {SMS} multiprocessors leaves some idle; "
              f"loop: what each program works through one after another")
    for name, count in counts.items() if args.top else ():
        print(f"\n{name}: " + ", ".join(f"{op} {n}" for op, n in count.names.most_common(args.top)))
    if args.ptx:
        print()
        print_table(ptx_table(counts))
        print("PTX global memory instructions of every variant the step launches, compiled for sm_90: "
              "a 16-byte instruction moves 4 float32 or 8 bfloat16 elements at once")
    return 0


def ptx_table(counts: dict[str, Count]) -> list[tuple]:
    """Per path and Triton kernel: its variants and their loads and stores, 16/8/4/2 bytes wide."""
    widths = (16, 8, 4, 2)
    rows = [("path", "Triton kernel", "variants", *(f"{kind}s {'/'.join(map(str, widths))} bytes"
                                                    for kind in ("load", "store")))]
    for name, count in counts.items():
        for kernel in sorted({variant.kernel for variant in count.variants}):
            variants = [v for v in count.variants if v.kernel == kernel]
            found = sum((v.memory_instructions() for v in variants), Counter())
            rows.append((name, kernel, str(len(variants)),
                         *("/".join(str(found[f"{width}-byte {kind}"]) for width in widths)
                           for kind in ("load", "store"))))
    return rows


if __name__ == "__main__":
    sys.exit(main())
