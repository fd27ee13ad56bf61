"""The one training step (step.py): no host sync, the CUDA-graph runner and its fallback,
low precision equal to autocast, fixed-shape evaluation; CUDA-only checks carry ``cuda``."""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from conftest import ROOT, TINY, metrics, read_csv, same_weights
from densenet import DenseNet
from densenet_trainer.engine import cuda_graph, data, datasets, training
from densenet_trainer.engine.runtime import Runtime, capture_cuda_graph
from densenet_trainer.engine.step import LearningRate, Precision, TrainStep
from densenet_trainer.run import build
from densenet_trainer.run.checkpoint import restore
from densenet_trainer.settings.config import RunConfig

SGD = RunConfig()  # the paper's: lr 0.1, Nesterov momentum 0.9, weight decay 1e-4


def make_step(device: torch.device, precision: str = "fp32", memory_efficient: bool = False,
              dropout: float = 0.0, images: int = 96, seed: int = 0, opt: str = "sgd",
              lr: LearningRate | None = None) -> TrainStep:
    """A tiny model's step on random images: what train.py builds, minus the files; its
    optimiser (``opt``, the paper's settings) reads ``lr`` (default: a rate of 0.1)."""
    torch.manual_seed(seed)
    model = DenseNet(10, 4, dropout=dropout, memory_efficient=memory_efficient)
    model.to(device, memory_format=torch.channels_last)
    lr = lr or LearningRate(SGD.lr, device)
    optimizer = build.build_optimizer(dataclasses.replace(SGD, opt=opt), model, lr)
    generator = torch.Generator().manual_seed(1)
    split = datasets.Split(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator),
                       torch.randint(0, 10, (images,), generator=generator))
    normalizer = data.Normalizer([0.5] * 3, [0.25] * 3, device)
    batches = data.TrainBatches(split, 16, normalizer, True, 3, device, channels_last=True)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return TrainStep(model, optimizer, batches, precision, scaler)


# ---------------------------------------------------------------- no host sync

@pytest.fixture
def meta_fused_sgd():
    """The fused SGD kernel has no meta implementation; a stand-in that does nothing (the real
    one is a single kernel with the learning rate as a tensor argument)."""
    library = torch.library.Library("aten", "IMPL")
    library.impl("_fused_sgd_.tensor_lr", lambda *args, **kwargs: None, "Meta")
    yield
    del library


def meta_step(**kwargs) -> TrainStep:
    """make_step on the meta device. Its learning rate stays on the CPU: SGD's constructor
    reads the rate once to check its sign, which a meta tensor cannot give (on a GPU: one
    read, before any step); the stand-in kernel ignores the rate."""
    step = make_step(torch.device("meta"), lr=LearningRate(SGD.lr, torch.device("cpu")), **kwargs)
    step.optimizer._need_device_dtype_check_for_fused = False  # it refuses meta tensors
    return step


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_the_step_never_waits_for_the_host(meta_fused_sgd, precision, memory_efficient):
    """On the meta device tensors have no values: .item(), bool(tensor) or a copy to the host
    raise, so a step that completes there cannot have synchronised."""
    step = meta_step(precision=precision, memory_efficient=memory_efficient, dropout=0.1)
    step.start_epoch()
    for _ in range(2):
        step()


def test_a_step_that_reads_a_value_fails_on_meta(meta_fused_sgd, monkeypatch):
    """The meta check has teeth: one .item() in the step and it fails."""
    step = meta_step()
    step.start_epoch()
    loss = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: loss(*a, **k) * (loss(*a, **k).item() > 0))
    with pytest.raises(RuntimeError, match="meta"):
        step()


# ---------------------------------------------------------------- the graph runner

def train_steps(step: TrainStep, run_step, count: int) -> list[float]:
    step.start_epoch()
    step.model.train()
    for _ in range(count):
        run_step()
    return step.losses[:count].tolist()


def test_graphed_step_warms_up_captures_once_and_replays(capsys):
    """The runner's order of calls, with a stand-in capture that returns the step itself: three
    eager steps, one capture, replays; the numbers are those of plain eager steps."""
    eager, graphed = make_step(torch.device("cpu")), make_step(torch.device("cpu"))
    captures = []

    def capture(step):
        captures.append(step)
        return step

    runner = cuda_graph.GraphedStep(graphed, print, capture=capture)
    reference = train_steps(eager, eager, 6)
    assert train_steps(graphed, runner, 6) == reference
    assert captures == [graphed] and runner.warmed == cuda_graph.GraphedStep.WARMUP
    for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert capsys.readouterr().out == ""


def test_a_failed_capture_goes_on_eagerly_with_one_notice(capsys):
    """Capture fails once (as an uncapturable op would): one notice naming the reason, no second
    attempt, and the run's numbers are the eager ones."""
    eager, graphed = make_step(torch.device("cpu")), make_step(torch.device("cpu"))
    attempts = []

    def failing_capture(step):
        attempts.append(1)
        for p in step.model.parameters():  # what a capture leaves behind: graph-pool gradients
            p.grad = torch.full_like(p, float("nan"))
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    runner = cuda_graph.GraphedStep(graphed, print, capture=failing_capture)
    assert train_steps(graphed, runner, 6) == train_steps(eager, eager, 6)
    assert attempts == [1]
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["notice: the training step could not be captured as a CUDA graph (CUDA error: "
                   "operation not permitted when stream is capturing); training goes on eagerly, "
                   "with the same results, slower"]


def test_train_py_reports_a_failed_capture_and_logs_what_eager_logs(tmp_path, cifar_dir, capsys):
    """train.py on a runtime whose capture fails (a stand-in: on the CPU there is no CUDA
    graph): the run says so once and writes the CSVs of the eager run, loss for loss."""
    argv = ["--data-dir", str(cifar_dir), *TINY, "--epochs", "2"]
    assert train.main([*argv, "--save", str(tmp_path / "eager")]) == 0

    def failing(step):
        raise RuntimeError("out of memory")

    cfg, _ = RunConfig.from_flags(train.build_parser().parse_args([*argv, "--save", str(tmp_path / "forced")]))
    capsys.readouterr()
    assert train.train(cfg, runtime=Runtime(torch.device("cpu"), capture=failing)) == 0
    assert capsys.readouterr().out.count("could not be captured as a CUDA graph (out of memory)") == 1
    assert metrics(tmp_path / "forced") == metrics(tmp_path / "eager")


@pytest.mark.parametrize("opt", ["sgd", "adam", "rmsprop"])
def test_each_optimiser_takes_its_learning_rate_from_the_device_tensor(opt):
    """Every parameter group reads the run's LearningRate: a rate of 0 leaves the weights as
    they are, a positive one moves them."""
    lr = LearningRate(0.01, torch.device("cpu"))
    step = make_step(torch.device("cpu"), opt=opt, lr=lr)
    assert all(group["lr"] is lr.tensor for group in step.optimizer.param_groups)
    before = copy.deepcopy(step.model.state_dict())
    lr.set(0.0)
    train_steps(step, step, 2)
    assert all(torch.equal(before[n], p) for n, p in step.model.named_parameters())
    lr.set(0.01)
    train_steps(step, step, 2)
    assert not any(torch.equal(before[n], p) for n, p in step.model.named_parameters())


def test_the_graph_is_for_one_gpu_process():
    """A graph where the process can capture one (Runtime.alone on CUDA) and the run asks for
    it; several processes step eagerly and say so."""
    step = make_step(torch.device("cpu"))
    notices = []
    runner, graph, no_graph = cuda_graph.step_runner, RunConfig(), RunConfig(cuda_graph=False)
    assert Runtime.alone(torch.device("cpu")).capture is None
    assert Runtime.alone(torch.device("cuda")).capture is capture_cuda_graph
    assert runner(step, graph, "aten", Runtime.alone(torch.device("cpu")), notices.append) is step
    assert runner(step, no_graph, "aten", Runtime.alone(torch.device("cuda")), notices.append) is step
    graphed = runner(step, graph, "aten", Runtime.alone(torch.device("cuda")), notices.append)
    assert isinstance(graphed, cuda_graph.GraphedStep) and graphed.capture is capture_cuda_graph
    assert notices == []
    assert runner(step, graph, "aten", Runtime(torch.device("cuda"), 0, 2), notices.append) is step
    assert notices == ["notice: the training step runs eagerly, not as a CUDA graph: several "
                       "processes: DistributedDataParallel's all-reduce is not captured"]


def test_a_restored_optimizer_keeps_its_fused_implementation(tmp_path):
    """A checkpoint of an earlier version (foreach SGD) resumes with the fused kernel, its
    momentum buffers and the run's own learning-rate tensor."""
    step = make_step(torch.device("cpu"))
    earlier = torch.optim.SGD(step.model.parameters(), 0.1, momentum=0.9, nesterov=True,
                              weight_decay=1e-4, foreach=True)
    train_steps(step, step, 1)
    earlier.step()  # momentum buffers from the gradients the step left
    lr = step.optimizer.param_groups[0]["lr"]
    restore(step.optimizer, earlier.state_dict(), tmp_path / "checkpoint.pt")
    group = step.optimizer.param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    assert group["lr"] is lr  # the run's LearningRate, which the schedule sets
    for p in step.model.parameters():
        assert torch.equal(step.optimizer.state[p]["momentum_buffer"], earlier.state[p]["momentum_buffer"])


# ---------------------------------------------------------------- precision and evaluation

@pytest.mark.parametrize("memory_efficient", [False, True])
def test_bf16_casts_once_and_computes_what_autocast_computes(memory_efficient):
    """Weights cast in one copy give autocast's outputs and float32 gradients."""
    model, twin = (m.to(memory_format=torch.channels_last) for m in
                   same_weights("fused", "fused", depth=10, growth_rate=4, memory_efficient=memory_efficient))
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(x).float()
    F.cross_entropy(reference, labels).backward()
    precision = Precision(twin, "bf16")
    with precision.computing():
        ours = twin(precision.inputs(x)).float()
        F.cross_entropy(ours, labels).backward()
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert b.dtype == torch.float32 and b.grad.dtype == torch.float32
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-2, atol=1e-4)


def test_evaluation_pads_to_one_shape_and_counts_only_real_images():
    """Any evaluation batch size gives the same loss, error and confusion matrix."""
    torch.manual_seed(0)
    model = DenseNet(10, 4)
    split = datasets.Split(torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8),
                       torch.randint(0, 10, (37,)))
    normalizer = data.Normalizer([0.5] * 3, [0.25] * 3, torch.device("cpu"))
    runtime = Runtime(torch.device("cpu"))
    shapes = {tuple(images.shape) for images, _, _ in data.eval_batches(split, 16, normalizer, runtime.device)}
    assert shapes == {(16, 3, 32, 32)}
    results = [training.evaluate(model, data.eval_batches(split, size, normalizer, runtime.device),
                                 "fp32", runtime, 10) for size in (1, 16, 37, 500)]
    first = results[0]
    for result in results[1:]:
        assert result.top5_error is None  # ten classes
        assert result.loss == pytest.approx(first.loss, rel=1e-5) and result.error == first.error
        assert torch.equal(result.confusion, first.confusion) and result.images == 37


# ---------------------------------------------------------------- on a GPU

CUDA = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_cuda_graph_replays_the_eager_steps(precision, memory_efficient):
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        eager = make_step(CUDA, precision, memory_efficient)
        graphed = make_step(CUDA, precision, memory_efficient)
        runner = cuda_graph.GraphedStep(graphed, pytest.fail)
        expected, got = train_steps(eager, eager, 6), train_steps(graphed, runner, 6)
        assert runner.replay is not None
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    finally:
        torch.backends.cudnn.deterministic = False


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_no_sync_inside_the_cuda_step(precision, memory_efficient):
    step = make_step(CUDA, precision, memory_efficient)
    step.start_epoch()
    step()  # first step: lazy state, cuDNN's choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_resume_continues_the_run(tmp_path, cifar_dir):
    """Two epochs at once against one, then a resume; cuDNN may pick other algorithms in the
    second process, so the losses agree closely rather than bit for bit."""
    flags = ["--data-dir", str(cifar_dir), *TINY, "--epochs", "2", "--device", "cuda"]
    assert train.main([*flags, "--save", str(tmp_path / "whole")]) == 0
    assert train.main([*flags, "--save", str(tmp_path / "parts"), "--stop-after", "1"]) == 0
    assert train.main(["--resume", "--save", str(tmp_path / "parts"), "--data-dir", str(cifar_dir)]) == 0
    for name in ("train.csv", "test.csv"):
        whole, parts = (read_csv(tmp_path / run / name) for run in ("whole", "parts"))
        assert [r["epoch"] for r in parts] == ["1", "2"]
        for a, b in zip(whole, parts):
            assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-3)


@pytest.mark.cuda
def test_an_uncapturable_step_falls_back_on_cuda():
    """A real capture failure (a host read inside the step), in a process of its own: on older
    torch a failed capture leaves the caching allocator unusable (pytorch#180395), and its
    memory pool stays until the process exits."""
    tests = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, str(tests / "uncapturable_step.py")], capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tests)])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not be captured as a CUDA graph" in result.stdout
    assert result.stdout.strip().endswith("eager")
