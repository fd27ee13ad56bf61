"""A run's configuration: one typed, frozen description of a run, built from the flags.

``RunConfig`` holds every setting of a run. Each field declares, beside it, its type, its
default, the help of its command-line flag, and whether a resume may change it
(``resumable``: where the data is, how fast, how long; never what the numbers are). Defaults
that depend on other settings (300 epochs, or 40 for SVHN; dropout 0.2 without augmentation;
...) are derived in one place, ``__post_init__``. config.json and every checkpoint keep the
configuration flat (``to_dict``); ``from_dict`` reads what any version of train.py wrote.

Scripts offer the flags they use (``add_flags``) and read them back with ``from_flags``,
which also names the flags given on the command line: a resume must know which settings
the user asked to change. The learning-rate schedule, the kernel choice and the model's name
and validity are functions of the configuration.

This module imports no torch, so that plot.py can read a run's configuration too.
"""
from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import Decimal

from densenet_trainer.config import cli
from densenet_trainer.config.architecture import check_config, model_name
from densenet_trainer.config.cli import UserError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
DATASETS = tuple(NUM_CLASSES)
KERNELS = ("fused", "fused-gemm", "aten")  # how densenet.py computes dense blocks and BatchNorm-ReLU
TOP5_FROM = 10  # datasets with more classes than this (CIFAR-100) also log the top-5 error
GROUPS = ("data", "model", "optimisation", "speed", "run")  # in the order --help lists them
IN_MODEL_NAME = frozenset({"dataset", "depth", "growth_rate", "bottleneck", "compression"})  # a folder's first words
NAME_BYTES = 200  # a default folder's longest name: file systems take 255 bytes, some fewer
SHORT_NAMES = {"train_subset": "train", "test_subset": "test", "val_size": "val",
               "weight_decay": "wd", "batch_size": "batch"}  # words of a default folder's name


def setting(default, group: str, help: str, *, type=None, choices=None, metavar: str | None = None,
            resumable: bool = False, idle=None):
    """A field of RunConfig with its flag. ``default`` None: derived (see __post_init__).
    ``idle(config)``: why the setting does nothing in that configuration (None: it counts);
    a value other than its default is then refused.

    A bool setting is ``--flag/--no-flag``, or ``--flag`` alone where it defaults to False.
    """
    return field(default=default, metadata={"group": group, "help": help, "type": type,
                                            "choices": choices, "metavar": metavar,
                                            "resumable": resumable, "idle": idle})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; the defaults are the paper's recipe (DenseNet-BC-100-12)."""

    dataset: str = setting("cifar10", "data", "which dataset", choices=DATASETS)
    data_dir: str = setting("data", "data", "torchvision-style root: holds cifar-10-batches-py/, "
                            "cifar-100-python/ or svhn/", type=cli.path, resumable=True)
    download: bool = setting(True, "data", "download the dataset through torchvision when it is "
                             "absent", resumable=True)
    svhn_extra: bool = setting(True, "data", "SVHN: train on train+extra, as the paper does",
                               idle=lambda c: None if c.dataset == "svhn" else f"{c.dataset} has no extra images")
    val_size: int = setting(0, "data", "hold this many training images out as a validation set "
                            "(paper: 5000)", type=cli.count)
    train_subset: int = setting(0, "data", "train on the first N training images only (0: all), "
                                "for quick experiments", type=cli.count)
    test_subset: int = setting(0, "data", "test on the first N test images only (0: all)",
                               type=cli.count)
    augment: bool = setting(None, "data", "4-pixel padding, random 32x32 crop, random horizontal "
                            "flip (the paper's '+'; default on for CIFAR, off for SVHN as in the "
                            "paper)")

    depth: int = setting(100, "model", "L: layers with weights", type=int)
    growth_rate: int = setting(12, "model", "k: feature maps per layer", type=int)
    bottleneck: bool = setting(True, "model", "1x1 conv to 4k maps before each 3x3 conv (the B of "
                               "DenseNet-BC)")
    compression: float = setting(0.5, "model", "theta: transitions keep floor(theta*m) maps (1: no "
                                 "compression)", type=float)
    dropout: float = setting(None, "model", "dropout after each conv but the first (default 0, or "
                             "0.2 with --no-augment)", type=float)
    memory_efficient: bool = setting(False, "model", "store only conv outputs, recompute BN and "
                                     "ReLU in backward: memory linear in depth, the same "
                                     "function, slightly slower steps", resumable=True)

    opt: str = setting("sgd", "optimisation", "optimiser", choices=("sgd", "adam", "rmsprop"))
    lr: float = setting(None, "optimisation", "initial learning rate (default 0.1 for sgd, 0.001 "
                        "otherwise)", type=cli.positive_float)
    schedule: str = setting("step", "optimisation", "step: divide by 10 at 50%% and 75%% of the "
                            "epochs; cosine: anneal to 0", choices=("step", "cosine"))
    momentum: float = setting(0.9, "optimisation", "SGD Nesterov momentum, in [0, 1)",
                              type=cli.float_range(0, 1, high_open=True),
                              idle=lambda c: None if c.opt == "sgd" else f"--opt {c.opt} takes no momentum")
    weight_decay: float = setting(1e-4, "optimisation", "L2 penalty on all weights",
                                  type=cli.non_negative_float)
    epochs: int = setting(None, "optimisation", "default 300, or 40 for SVHN",
                          type=cli.positive_int, resumable=True)
    batch_size: int = setting(64, "optimisation", "global batch, over all processes",
                              type=cli.positive_int)
    seed: int = setting(0, "optimisation", "seeds initialisation, data order and augmentation "
                        "(0 to 2**32 - 1)", type=cli.seed)

    device: str = setting("auto", "speed", "auto: a GPU when there is one",
                          choices=("auto", "cpu", "cuda"), resumable=True)
    precision: str = setting("fp32", "speed", "autocast precision (bf16, fp16: the convolutions "
                             "and the classifier round to 8 or 11 significant bits); fp16 uses a "
                             "gradient scaler", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = setting(True, "speed", "NHWC memory layout (faster on tensor-core GPUs; "
                                  "on the CPU it enables the fused dense blocks of fused.py; the "
                                  "same function, other float rounding)", resumable=True)
    cuda_graph: bool = setting(True, "speed", "on CUDA, capture the whole training step as one "
                               "CUDA graph after 3 eager steps and replay it, and each split's "
                               "evaluation batch likewise, the same kernels as an eager step (one "
                               "process: under torchrun the steps run eagerly, DistributedData"
                               "Parallel's all-reduce not being captured; if capture fails, the "
                               "run goes on eagerly and says why)", resumable=True)
    kernels: str = setting("auto", "speed", "how dense blocks and BatchNorm-ReLU run: fused "
                           "(fused.py: C loops on the CPU in float32, Triton on CUDA in float32 "
                           "or bf16), fused-gemm (fused, and on CUDA DenseNet-BC's 1x1 convolutions "
                           "as Triton GEMMs that normalise as they load), aten (PyTorch's), compile "
                           "(torch.compile of the aten model); auto: fused on the CPU in float32; "
                           "on a GPU the fastest of aten, fused and fused-gemm in steps timed at the "
                           "start (fp16: aten); aten otherwise. The same function, other speed and rounding",
                           choices=("auto", *KERNELS, "compile"), resumable=True)
    compile: bool = setting(False, "speed", "the same as --kernels compile", resumable=True)
    sync_bn: bool = setting(False, "speed", "SyncBatchNorm across processes (torchrun)")
    eval_batch_size: int = setting(500, "speed", "batch size for evaluation", type=cli.positive_int, resumable=True)

    save: str = setting(None, "run", "work directory (default work/<dataset>-<model name>, "
                        "then each setting that changes the numbers and differs from its "
                        "default: work/cifar10-densenet-bc-16-8-epochs4-seed1)",
                        type=cli.path, resumable=True)
    resume: bool = setting(False, "run", "continue the run in --save from its checkpoint",
                           resumable=True)
    auto_resume: bool = setting(False, "run", "continue the run in --save if there is one, as "
                                "--resume does (flags not given keep the run's values; a given "
                                "one that would change its numbers is refused), else start it: "
                                "for a job script that may run again. A restart of the same "
                                "torchrun or SLURM job continues without it", resumable=True)
    stop_after: int = setting(0, "run", "end this session after EPOCH (0: run all epochs); "
                              "continue later with --resume", type=cli.count, metavar="EPOCH",
                              resumable=True, idle=lambda c: None if c.stop_after < c.epochs or c.resume
                              else f"the run ends after its {c.epochs} epoch(s) anyway")

    def __post_init__(self) -> None:
        """Fill in the defaults that depend on other settings; keep compile and kernels in step;
        then refuse, in one line (UserError), any value the command line would refuse: the
        Python API (``RunConfig(momentum=1.5)``) is checked as the flags are, once, here."""
        augment = self.dataset != "svhn" if self.augment is None else self.augment
        derived = {
            "augment": augment,
            "epochs": (40 if self.dataset == "svhn" else 300) if self.epochs is None else self.epochs,
            "lr": (0.1 if self.opt == "sgd" else 0.001) if self.lr is None else self.lr,
            "dropout": (0.0 if augment else 0.2) if self.dropout is None else self.dropout,
            "compile": self.compile or self.kernels == "compile",  # --compile is --kernels compile
            "kernels": "compile" if self.compile else self.kernels,
        }
        if self.compile and self.kernels not in ("auto", "compile"):
            raise UserError(f"--compile (compile=True) is --kernels compile, not --kernels {self.kernels}: give one")
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        for spec in fields(self):
            value = getattr(self, spec.name)
            problem = cli.value_problem(spec, value)
            if problem:
                raise UserError(f"{spec.name} (--{flag_name(spec.name)}) {problem}")
            if spec.type in ("int", "float") and value is not None:  # numpy's numbers as Python's;
                value = int(value) if spec.type == "int" else float(value) or 0.0  # -0.0 is 0.0
                object.__setattr__(self, spec.name, value)  # (one folder, group, resume check)
        try:
            check_config(self.depth, self.growth_rate, self.bottleneck, self.compression,
                         self.dropout, self.num_classes)
        except ValueError as error:  # the model cannot be built
            raise UserError(str(error)) from None
        self.refuse_idle(self.idle_settings())
        object.__setattr__(self, "save", self.save or self.default_save())

    def idle_settings(self) -> dict[str, str]:
        """The settings off their default that do nothing here, and why (their ``idle`` rule)."""
        return {spec.name: spec.metadata["idle"](self) for spec in fields(self)
                if spec.metadata["idle"] and getattr(self, spec.name) != spec.default
                and spec.metadata["idle"](self)}

    def refuse_idle(self, idle: dict[str, str]) -> None:
        """One UserError naming the first of ``idle`` (settings and why they do nothing)."""
        for name, why in idle.items():
            value = getattr(self, name)
            flag = (f"--{'' if value else 'no-'}{flag_name(name)}" if isinstance(value, bool)
                    else f"--{flag_name(name)} {value}")
            raise UserError(f"{flag} does nothing here ({why}); drop it")

    def default_save(self) -> str:
        """The work directory of a run not given --save: the dataset and the model's name, then
        a word for each setting that changes the numbers (not resumable, or --epochs) and differs
        from what it would be if not given (train5000, no-augment, lr0.05, epochs4, seed1): runs
        that differ in any such setting, the seed above all, never meet in one default folder,
        and the paper's recipe keeps its plain name (work/cifar10-densenet-bc-100-12)."""
        words = [self.dataset, self.model_name]
        for spec in fields(self):
            if spec.name in IN_MODEL_NAME | NUMBER_NEUTRAL or (spec.name == "svhn_extra" and self.dataset != "svhn"):
                continue
            value = getattr(self, spec.name)
            if value == getattr(replace(self, save="unused", **{spec.name: spec.default}), spec.name):
                continue
            if isinstance(value, bool):
                words.append(("" if value else "no-") + flag_name(spec.name))
            elif isinstance(value, str):
                words.append(value)
            else:  # plain decimals: lr0.00001, never an exponent's minus inside a name of -words
                number = format(Decimal(repr(value)).normalize(), "f")
                words.append(f"{SHORT_NAMES.get(spec.name, flag_name(spec.name))}{number}")
        name = "-".join(words)
        if len(name.encode()) > NAME_BYTES:  # the words kept, the rest said by a hash of them all
            name = f"{name.encode()[:NAME_BYTES - 13].decode(errors='ignore')}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
        return "work/" + name

    # ------------------------------------------------------------ what follows from it

    @property
    def model_name(self) -> str:
        return model_name(self.depth, self.growth_rate, self.bottleneck, self.compression)

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.dataset]

    @property
    def top5(self) -> bool:
        """Whether the top-5 error is logged (datasets with many classes)."""
        return self.num_classes > TOP5_FROM

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch``: a pure function, so resuming needs no
        scheduler state."""
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))
        drops = sum(epoch >= int(self.epochs * share) for share in (0.5, 0.75))
        return self.lr * 0.1 ** drops

    def schedule_notice(self) -> str:
        """A line to print when the step schedule's two drops fall on one epoch ('' if not)."""
        if self.schedule == "cosine":
            return ""
        first, second = (int(self.epochs * share) for share in (0.5, 0.75))
        if first != second:
            return ""
        before = f"right after {self.lr:g}" if first else f"not {self.lr:g}"
        return (f"notice: --epochs {self.epochs} is too short to keep the step schedule's two "
                f"learning-rate drops apart: both fall before epoch {first + 1}, which trains at "
                f"{self.learning_rate(first):g}, {before}")

    def kernels_on(self, device_type: str) -> str:
        """The DenseNet kernels (one of KERNELS) that --kernels means on a device without
        measuring: auto is fused.py's on the CPU in float32 (measured faster there, see
        README) and ATen's elsewhere (a training run on a GPU times both instead:
        kernel_choice.choose_kernels); compile compiles the ATen model."""
        if self.kernels == "auto":
            return "fused" if device_type == "cpu" and self.precision == "fp32" else "aten"
        return "aten" if self.kernels == "compile" else self.kernels

    # ------------------------------------------------------------ the flat form

    def to_dict(self) -> dict:
        """The flat form kept in config.json and in every checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict, source: str) -> RunConfig:
        """The configuration that ``source`` (a checkpoint or config.json) recorded.

        A run written before a setting existed lacks it and gets its default; every setting
        added since the first version is resumable, and a missing setting that decides the
        numbers means the file was not written by train.py. Settings this version does not
        know, or values of the wrong type, are refused rather than guessed.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(saved) - set(known))
        if unknown:
            raise UserError(f"{source} has the setting {unknown[0]!r}, which this version of "
                            f"train.py does not know; use the version that wrote it")
        lacking = sorted(name for name, f in known.items()
                         if name not in saved and not f.metadata["resumable"])
        if lacking:
            raise UserError(f"{source} was saved without --{flag_name(lacking[0])}: it is not a "
                            f"run of this trainer; start a new run with another --save")
        values = {}
        for name, value in saved.items():
            if cli.value_problem(known[name], value):
                raise UserError(f"{source} records --{flag_name(name)} as {value!r}, which is "
                                f"not a valid value; it is damaged: use another checkpoint")
            values[name] = float(value) if known[name].type == "float" else value
        if "kernels" not in saved:  # runs from before --kernels: --compile said it
            values["kernels"] = "compile" if saved.get("compile") else "auto"
        seen = argparse.Namespace(**{**{name: spec.default for name, spec in known.items()}, **values})
        for name, spec in known.items():  # what an older version took and did nothing with
            if spec.metadata["idle"] and name in values and spec.metadata["idle"](seen):
                values[name] = spec.default
        try:
            return cls(**values)
        except UserError as error:  # each value fits, but not together: the model
            raise UserError(f"{source} records a model that cannot be built ({error}); it is "
                            f"damaged: use another checkpoint") from None

    @classmethod
    def from_flags(cls, namespace: argparse.Namespace) -> tuple[RunConfig, frozenset[str]]:
        """The configuration from a namespace that ``add_flags`` filled, and the names of the
        settings given on the command line (--compile and --kernels count as one)."""
        given = {f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)}
        if given.get("resume") and given.get("auto_resume"):
            raise UserError("--resume and --auto-resume: give one (--auto-resume starts the run where there is none)")
        names = set(given) | ({"compile", "kernels"} if {"compile", "kernels"} & set(vars(namespace)) else set())
        cfg = cls(**given)
        specs = {spec.name: spec for spec in fields(cls)}  # a flag given as its default counts too
        cfg.refuse_idle({name: why for name in sorted(names) if specs[name].metadata["idle"]
                         and (why := specs[name].metadata["idle"](cfg))})
        return cfg, frozenset(names)


RESUMABLE = frozenset(f.name for f in fields(RunConfig) if f.metadata["resumable"])
# Settings that decide where, how fast and for how long a run computes, never what: those a
# resume may change (``resumable``), less --epochs, which sets the schedule.
NUMBER_NEUTRAL = RESUMABLE - {"epochs"}


def flag_name(setting_name: str) -> str:
    return setting_name.replace("_", "-")


def flag_names(*groups: str, leave_out: Iterable[str] = ()) -> list[str]:
    """The settings of ``groups``, in --help order, without ``leave_out``."""
    left_out = set(leave_out)
    return [f.name for f in fields(RunConfig)
            if f.metadata["group"] in groups and f.name not in left_out]


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> dict[str, argparse._ArgumentGroup]:
    """Give ``parser`` the flags of the settings ``names``, in their groups; returns the
    groups by title, for a script to add flags of its own to them.

    The flags have no argparse default (a flag not given is absent from the namespace, which
    is how ``from_flags`` tells the given ones); --help shows each setting's own default.
    """
    wanted = set(names)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in fields(RunConfig):
        if spec.name not in wanted:
            continue
        meta = spec.metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], parser.add_argument_group(meta["group"]))
        shown = spec.default is not None and spec.default is not False
        options = {"default": argparse.SUPPRESS,
                   "help": meta["help"] + (f" (default: {spec.default})" if shown else "")}
        if spec.type == "bool":
            options["action"] = "store_true" if spec.default is False else argparse.BooleanOptionalAction
        else:
            options.update(type=meta["type"], choices=meta["choices"], metavar=meta["metavar"])
        group.add_argument(f"--{flag_name(spec.name)}", **options)
    return groups
