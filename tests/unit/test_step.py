"""The one training step (loop/training.py): no host sync, the CUDA-graph runner and its fallback,
low precision equal to autocast, fixed-shape evaluation; CUDA-only checks carry ``cuda``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import train
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.loop.training import LearningRate, TrainStep
from densenet_trainer.runtime import Runtime
from densenet_trainer.speed.precision import CastWeights
from helpers import SGD, TINY, make_step, metrics, read_csv, same_weights, train_steps

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
    precision = CastWeights(twin, "bf16")
    with precision.computing():
        ours = twin(precision.inputs(x)).float()
        F.cross_entropy(ours, labels).backward()
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert b.dtype == torch.float32 and b.grad.dtype == torch.float32
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------- on a GPU


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
