"""Helpers the test files share (conftest.py holds the fixtures and the markers): the tiny
model's flags, generated datasets, the scripts run as a user runs them, what runs leave,
models with the same weights, a fault injected into a real run, and a tiny training step."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

import train
from densenet import DenseNet
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.data import datasets, loader
from densenet_trainer.loop.training import LearningRate, TrainStep, build_optimizer
from densenet_trainer.speed import apply_fused_kernels
from densenet_trainer.speed.precision import precision_of

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# A tiny model and few images keep every CLI run to a few seconds on 2 cores. The tests force
# the CPU: --device auto would pick a GPU where there is one, and these tests are about the
# CPU path (the cuda-marked ones name their device).
TINY_MODEL = ["--depth", "10", "--growth-rate", "4", "--batch-size", "32", "--device", "cpu"]
TINY = [*TINY_MODEL, "--eval-batch-size", "64"]  # train.py's, which evaluates


# ---------------------------------------------------------------- data

def write_cifar10(root: Path, train_per_batch: int = 32, test: int = 48, seed: int = 0) -> Path:
    """A CIFAR-10 folder in the official python layout with random images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, count: int) -> None:
        content = {"batch_label": name, "filenames": [f"{i}.png" for i in range(count)],
                   "labels": rng.integers(0, 10, count).tolist(),
                   "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", train_per_batch)
    dump("test_batch", test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"]}, f)
    return root


def write_cifar100(root: Path, train: int = 30, test: int = 10, seed: int = 0) -> Path:
    """A CIFAR-100 folder in the official python layout with random images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", train), ("test", test)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, count).tolist(),
                         "coarse_labels": rng.integers(0, 20, count).tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return root


# ---------------------------------------------------------------- running the scripts

def run_cli(script: str, *args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, in a fresh process."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def interrupt(command: list[str], after: str, signum: int) -> str:
    """Run ``command``, send ``signum`` once a stdout line starts with ``after``; return stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith(after):
            process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr
    return stderr


def run_main(capsys, main: Callable[[list[str]], int], *argv) -> tuple[int, str, str]:
    """A script's ``main`` in this process (its command's own code, without another start-up
    of torch): (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def config_of(*argv) -> tuple[RunConfig, frozenset[str]]:
    """The configuration train.py builds from ``argv``, and the flags given."""
    return RunConfig.from_flags(train.build_parser().parse_args([str(a) for a in argv]))


def start_run(capsys, work: Path, data_dir: Path, *flags) -> str:
    """train.py with the tiny model into ``work``; must succeed. Returns what it printed."""
    status, out, err = run_main(capsys, train.main, "--data-dir", data_dir, "--save", work, *TINY,
                                *flags)
    assert status == 0, err
    return out


def check_refused(code: int, stderr: str, message: str, status: int = 2) -> None:
    """A refusal as the project makes them: ``status``, one line on stderr, no traceback."""
    assert code == status, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


# ---------------------------------------------------------------- what runs leave

def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def metrics(work: Path) -> tuple[list, list]:
    """Per-epoch losses and errors of a run, the columns that must not depend on how it ran
    (interruptions, resumes, the version that wrote it); not its timings."""
    return ([(r["epoch"], r["lr"], r["loss"], r["error"]) for r in read_csv(work / "train.csv")],
            [(r["epoch"], r["loss"], r["error"]) for r in read_csv(work / "test.csv")])


def snapshot(folder: Path) -> dict[str, str]:
    """A hash of every file under ``folder``, to show that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Payload:
    """A pickled object that, when unpickled, would create ``marker``: what a tampered
    dataset or checkpoint could smuggle in."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- models and steps

def densenet(kernels: str = "aten", **kwargs) -> DenseNet:
    """``DenseNet(**kwargs)``, with the fused kernels applied (on the CPU) for "fused"."""
    model = DenseNet(**kwargs)
    if kernels == "fused":
        not_fused = apply_fused_kernels(model, "cpu") or ""
        assert "self-test" not in not_fused, not_fused  # a test of the fused path must not pass on ATen's
    return model


def padding_spied(monkeypatch) -> dict[str, list[int]]:
    """The zero channels each weight padded by conv_padding gets from here on: "inputs" (a
    padded BatchNorm-ReLU's) and "outputs" (a fused block's layers' last convolutions)."""
    from densenet_trainer.speed import conv_padding
    padded = {"inputs": [], "outputs": []}
    pad, weight_of = conv_padding.padded_input, conv_padding.compute_weight

    def padded_input(weight, channels):
        padded["inputs"].extend([channels - weight.shape[1]] if channels > weight.shape[1] else [])
        return pad(weight, channels)

    def compute_weight(conv):
        weight = weight_of(conv)
        padded["outputs"].extend([len(weight) - conv.out_channels] if len(weight) > conv.out_channels else [])
        return weight
    monkeypatch.setattr(conv_padding, "padded_input", padded_input)
    monkeypatch.setattr(conv_padding, "compute_weight", compute_weight)
    return padded


def same_weights(*kernels: str, **kwargs) -> list:
    """DenseNets with the same weights, one per kernel choice (``DenseNet(**kwargs)``)."""
    models = []
    for choice in kernels:
        torch.manual_seed(0)
        models.append(densenet(choice, **kwargs))
    return models


@contextlib.contextmanager
def on_forward(callback: Callable, training: bool) -> Iterator[None]:
    """Call ``callback(count, model, output)`` after every forward of a whole DenseNet in
    training (or evaluation) mode, ``count`` from 1; what it returns, if not None, replaces
    the output. A public PyTorch hook on every module: a test injects a fault into a real run
    without touching the trainer's code. The fused kernels' self-test's copies are not counted."""
    calls = 0

    def hook(module, args, output):
        nonlocal calls
        if isinstance(module, DenseNet) and module.training == training and not getattr(module, "self_test_copy", False):
            calls += 1
            return callback(calls, module, output)
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()



SGD = RunConfig()  # the paper's: lr 0.1, Nesterov momentum 0.9, weight decay 1e-4


def make_step(device: torch.device, precision: str = "fp32", memory_efficient: bool = False,
              dropout: float = 0.0, images: int = 96, seed: int = 0, opt: str = "sgd",
              lr: LearningRate | None = None) -> TrainStep:
    """A tiny model's step on random images: what train.py builds, minus the files; its
    optimiser (``opt``, the paper's settings) reads ``lr`` (default: a rate of 0.1)."""
    torch.manual_seed(seed)
    model = DenseNet(10, 4, dropout=dropout, memory_efficient=memory_efficient)
    model.to(device, memory_format=torch.channels_last)
    if device.type == "cpu":
        apply_fused_kernels(model)
    lr = lr or LearningRate(SGD.lr, device)
    optimizer = build_optimizer(dataclasses.replace(SGD, opt=opt), model, lr)
    generator = torch.Generator().manual_seed(1)
    split = datasets.Split(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator),
                       torch.randint(0, 10, (images,), generator=generator))
    normalizer = loader.Normalizer([0.5] * 3, [0.25] * 3, device)
    batches = loader.TrainBatches(split, 16, normalizer, True, 3, device, channels_last=True)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return TrainStep(model, optimizer, batches, precision_of(model, precision), scaler)


def train_steps(step: TrainStep, run_step, count: int) -> list[float]:
    """``count`` steps of a new epoch through ``run_step`` (the step, or its graph): their losses."""
    step.start_epoch()
    step.model.train()
    for _ in range(count):
        run_step()
    return step.losses[:count].tolist()


def faithful_capture(step):
    """A capture whose replay is the step."""
    return step


def static_grads_capture(step):
    """A capture as a CUDA graph's: the gradients are allocated inside it and belong to the
    graph (``replay.kept``, by parameter; ``p.grad`` points to them once captured, with no
    values yet); every replay writes them, whatever ``p.grad`` pointed to before."""
    parameters = [p for group in step.optimizer.param_groups for p in group["params"]]
    kept = {p: torch.full_like(p, float("nan")) for p in parameters}
    for p in parameters:
        p.grad = kept[p]

    def replay():
        step()
        for p in parameters:
            kept[p].copy_(p.grad)
            p.grad = kept[p]
    replay.kept = kept
    return replay


def stale_capture(step):
    """A capture whose replay trains on the batch it was captured at, over and over."""
    captured_at = int(step.batch_index)

    def replay():
        step.batch_index.fill_(captured_at)
        step()
    return replay


def capture_without_update(step):
    """A capture whose replay computes the loss but leaves the weights where they were."""
    def replay():
        weights = [p.detach().clone() for p in step.model.parameters()]
        step()
        with torch.no_grad():
            for p, w in zip(step.model.parameters(), weights):
                p.copy_(w)
    return replay


class Broken:
    """The CPU kernels with one fault: a wrong result (a channel tail's, or on aligned shapes
    only), or an error as a missing compiler or a failed launch would raise."""

    def __init__(self, fault: str) -> None:
        from densenet_trainer.speed import cpu_kernels
        self.kernels, self.fault, self.DTYPES = cpu_kernels, fault, cpu_kernels.DTYPES

    def __getattr__(self, name: str):  # what the fault leaves alone is the kernels' own
        return getattr(self.kernels, name)

    def norm_relu(self, x, x_stride, P, C, mean, var, weight, bias, eps, y, y_stride, *rest):
        if self.fault == "error":
            raise RuntimeError("Triton launcher: Python.h: No such file or directory")
        self.kernels.norm_relu(x, x_stride, P, C, mean, var, weight, bias, eps, y, y_stride, *rest)
        aligned = C % 8 == 0 and x_stride % 8 == 0  # a vectorised variant, miscompiled
        if self.fault == "aligned" and aligned or self.fault == "aligned, full tiles" and aligned and P >= 1024:
            y.mul_(1.5)  # full tiles: 32x32 maps, which only a run's own batches have

    def norm_relu_backward(self, *args):
        return self.kernels.norm_relu_backward(*args)

    def stats(self, f, f_stride, P, C, dst, dst_stride, mean, var, counters=None):
        self.kernels.stats(f, f_stride, P, C, dst, dst_stride, mean, var, counters)
        if self.fault == "tail" and C > 32:
            var[32:] *= 1.01  # a channel tail's variance a little off

    def finish_grad(self, *args):
        return self.kernels.finish_grad(*args)


def assert_step_matches_float64(reference, ours, x: torch.Tensor, labels: torch.Tensor) -> None:
    """One training step of ``ours`` on ``x`` (channels-last) against ``reference`` (the same
    weights in float64): output, input and parameter gradients and running statistics, within
    the fused path's tolerances against float64."""
    import torch.nn.functional as F
    results = []
    for model, inputs in ((reference, x.double()), (ours, x.contiguous(memory_format=torch.channels_last))):
        inputs = inputs.clone().requires_grad_()
        out = model(inputs)
        F.cross_entropy(out, labels).backward()
        results.append((out, inputs.grad, [p.grad for p in model.parameters()],
                        [b for b in model.buffers() if b.is_floating_point()]))
    (out_ref, grad_ref, params_ref, stats_ref), (out, grad, params, stats) = results
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-3, atol=1e-5)
    for a, b in zip(params, params_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-5)
    for a, b in zip(stats, stats_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
