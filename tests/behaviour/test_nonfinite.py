"""A NaN or an infinity anywhere reaches the loss on every path, and the trainer stops on it."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import train
from densenet import DenseNet
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.loop import training
from densenet_trainer.loop.training import non_finite
from densenet_trainer.run.files import load_checkpoint
from densenet_trainer.speed import apply_fused_kernels, fused
from helpers import TINY, densenet, on_forward, run_main

CHANNELS_LAST = torch.channels_last
# (memory format, autocast dtype, memory-efficient): the fused CPU path takes channels-last
# float without autocast; contiguous inputs and autocast take the ATen path.
PATHS = {
    "fused": (CHANNELS_LAST, None, False),
    "fused memory-efficient": (CHANNELS_LAST, None, True),
    "aten": (torch.contiguous_format, None, False),
    "aten memory-efficient": (torch.contiguous_format, None, True),
    "bf16": (CHANNELS_LAST, torch.bfloat16, False),
    "fp16": (CHANNELS_LAST, torch.float16, False),
}
needs_fused = pytest.mark.skipif(fused.backend("cpu") is None, reason="no C compiler: no fused path")


def poison(model: DenseNet, x: torch.Tensor, where: str) -> torch.Tensor:
    """Put a NaN (or +inf) into a BatchNorm weight, a conv weight, or one input pixel."""
    layer = model.features[0].layers[1]
    with torch.no_grad():
        if where == "norm weight":
            layer.norm1.weight[3] = math.nan
        elif where == "conv weight":
            layer.conv1.weight[0, 0, 0, 0] = math.nan
        else:
            x = x.clone()
            x[1, 0, 2, 5] = math.inf if where == "input inf" else math.nan
    return x


def forward_backward(model: DenseNet, x: torch.Tensor, labels: torch.Tensor, path: str):
    layout, dtype, _ = PATHS[path]
    x = x.detach().contiguous(memory_format=layout).requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model.train()(x)
        loss = F.cross_entropy(out, labels)
    loss.backward()
    return out.float(), loss, x.grad


@pytest.mark.parametrize("where", ["norm weight", "conv weight", "input nan", "input inf"])
@pytest.mark.parametrize("path", list(PATHS))
def test_a_nan_reaches_the_loss_on_every_path(path, where):
    if PATHS[path][0] is CHANNELS_LAST and PATHS[path][1] is None and fused.backend("cpu") is None:
        pytest.skip("no C compiler: no fused path")
    torch.manual_seed(0)
    model = densenet("fused", depth=16, growth_rate=4, memory_efficient=PATHS[path][2]).to(memory_format=PATHS[path][0])
    x = poison(model, torch.randn(4, 3, 16, 16), where)
    out, loss, grad = forward_backward(model, x, torch.tensor([0, 1, 2, 3]), path)
    assert not torch.isfinite(loss), f"{path}: a {where} gave the finite loss {loss.item()}"
    assert not torch.isfinite(out).all()
    assert non_finite(dict(model.named_parameters(), input_grad=grad))


@needs_fused
@pytest.mark.parametrize("where", ["norm weight", "conv weight", "input nan", "input inf"])
def test_fused_kernels_propagate_exactly_where_aten_does(where):
    """float64, element by element: the same NaN/inf pattern in outputs and every gradient."""
    torch.manual_seed(0)
    aten = DenseNet(16, 4).double()
    fast = copy.deepcopy(aten)
    apply_fused_kernels(fast)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    results = [forward_backward(model, poison(model, x, where), labels, path)
               for model, path in ((aten, "aten"), (fast, "fused"))]
    (out_a, _, grad_a), (out_f, _, grad_f) = results
    assert torch.equal(torch.isfinite(out_a), torch.isfinite(out_f))
    assert torch.equal(torch.isnan(grad_a), torch.isnan(grad_f))
    for (name, a), b in zip(aten.named_parameters(), fast.parameters()):
        assert torch.equal(torch.isnan(a.grad), torch.isnan(b.grad)), name


@needs_fused
def test_fused_relu_and_statistics_keep_nan_and_inf():
    x = torch.tensor([math.nan, -1.0, 2.0, math.inf, -math.inf], dtype=torch.float64)
    x = x.view(1, 5, 1, 1).expand(2, 5, 1, 1).contiguous(memory_format=CHANNELS_LAST)
    norm = torch.nn.BatchNorm2d(5).double().eval()
    out = fused.batch_norm_relu(norm, x)
    reference = torch.relu(norm(x))
    assert torch.equal(torch.isnan(out), torch.isnan(reference)), (out, reference)
    assert torch.equal(torch.isinf(out), torch.isinf(reference)) and torch.isinf(out).any()
    finite = torch.isfinite(reference)
    assert torch.equal(out[finite], reference[finite])
    shared = fused.SharedFeatures.holding(x, batch_stats=True)
    assert torch.isnan(shared.mean[0]) and torch.isnan(shared.var[0]) and torch.isnan(shared.var[3:]).all()


# ---------------------------------------------------------------- the trainer stops

def three_epochs(data_dir, work):
    return ["--data-dir", str(data_dir), "--save", str(work), *TINY, "--epochs", "3"]


def assert_stopped(status: int, stderr: str, message: str) -> None:
    assert status == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr
    assert "the last checkpoint and the rows up to it are kept" in lines[0]


class DivergesInEpoch2(RunConfig):
    """The run's configuration with a schedule that explodes in its second epoch."""

    def learning_rate(self, epoch: int) -> float:
        return 1e6 if epoch == 1 else super().learning_rate(epoch)


def test_diverging_learning_rate_stops_and_keeps_the_finite_checkpoint(tmp_path, cifar_dir):
    """Epoch 1 trains normally, epoch 2 at lr 1e6 on the default (fused) path: the schedule is
    the configuration's, so the run is given one that diverges."""
    work = tmp_path / "run"
    cfg, _ = RunConfig.from_flags(train.build_parser().parse_args(three_epochs(cifar_dir, work)))
    with pytest.raises(training.Diverged, match="the training loss is not finite at epoch 2"):
        train.train(DivergesInEpoch2(**cfg.to_dict()))
    state = load_checkpoint(work / "checkpoint.pt")  # refuses non-finite weights itself
    assert state["epoch"] == 1
    for name in ("train.csv", "test.csv"):
        assert [line.split(",")[0] for line in (work / name).read_text().splitlines()] == ["epoch", "1"]


def test_a_nan_test_loss_is_never_written(tmp_path, cifar_dir, capsys):
    """The model's output turns NaN in the second evaluation (epoch 2's test set; one batch
    each), its weights and training loss finite."""
    work = tmp_path / "run"
    with on_forward(lambda count, model, out: out * math.nan if count == 2 else None, training=False):
        status, _, err = run_main(capsys, train.main, *three_epochs(cifar_dir, work))
    assert_stopped(status, err, "the test loss is not finite after epoch 2")
    assert len((work / "test.csv").read_text().splitlines()) == 2  # header and epoch 1
    assert load_checkpoint(work / "checkpoint.pt")["epoch"] == 1


def test_weights_gone_non_finite_with_a_finite_loss_are_not_saved(tmp_path, cifar_dir, capsys):
    """The last step of epoch 2 (the 10th of 5-step epochs) leaves a NaN weight after its
    loss was computed: caught by the weights' check, before evaluation, rows and checkpoint."""

    def nan_bias_after_step_10(count, model, out):
        if count == 10:
            with torch.no_grad():
                model.classifier.bias[0] = math.nan

    work = tmp_path / "run"
    with on_forward(nan_bias_after_step_10, training=True):
        status, _, err = run_main(capsys, train.main, *three_epochs(cifar_dir, work))
    assert_stopped(status, err, "the weights are not finite after epoch 2 (classifier.bias)")
    assert load_checkpoint(work / "checkpoint.pt")["epoch"] == 1
    assert len((work / "train.csv").read_text().splitlines()) == 2


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, cifar_dir, capsys):
    work = tmp_path / "run"
    assert train.main([*three_epochs(cifar_dir, work)[:-1], "1"]) == 0
    state = torch.load(work / "checkpoint.pt", weights_only=True)
    state["model"]["norm.weight"][0] = math.nan
    torch.save(state, work / "checkpoint.pt")
    capsys.readouterr()
    for command in (["--evaluate", work / "checkpoint.pt"], ["--resume", "--save", work, "--epochs", "2"]):
        assert train.main([*map(str, command), "--data-dir", str(cifar_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds non-finite weights (norm.weight)" in err[0], err


def test_a_model_whose_outputs_overflow_is_not_evaluated(tmp_path, cifar_dir, capsys):
    """Finite weights whose outputs are not (a classifier near float32's largest number):
    --evaluate refuses in one line instead of reporting an error rate, and writes nothing."""
    work = tmp_path / "run"
    assert train.main([*three_epochs(cifar_dir, work)[:-1], "1"]) == 0
    state = torch.load(work / "checkpoint.pt", weights_only=True)
    state["model"]["classifier.weight"].fill_(3e38)
    torch.save(state, work / "checkpoint.pt")
    capsys.readouterr()
    assert train.main(["--evaluate", str(work), "--data-dir", str(cifar_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gives outputs that are not finite on the 48 test images" in err[0], err
    assert not (work / "checkpoint-classes.csv").exists()
