"""attic/ scripts on tiny configurations: gradient check, dataset statistics, summary, lr finder."""
from __future__ import annotations

import csv
import json
import pickle
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import plot
import train
from attic import dataset_stats, gradcheck, lr_find, predict, summary
from bench import profile, speed
from densenet import DenseLayer, DenseNet
from densenet_trainer.config.cli import UserError
from helpers import ROOT, TINY, TINY_MODEL


class _ScaledGradient(torch.autograd.Function):
    """Identity forward, gradient times 1.01 backward: a planted bug."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


class _BuggyLayer(DenseLayer):
    def forward(self, features):
        return _ScaledGradient.apply(super().forward(features))


def test_tools_never_import_the_trainer():
    """attic/ and bench/ build runs from the modules train.py uses, never from train.py itself."""
    import ast
    for path in sorted((ROOT / "attic").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert "train" not in {alias.name for alias in node.names}, path
            elif isinstance(node, ast.ImportFrom):
                assert node.module != "train", path
        assert "train.py\"" not in path.read_text() and "'train.py'" not in path.read_text(), path


@pytest.mark.slow
def test_gradcheck_passes_on_the_model(capsys):
    assert gradcheck.main(["--growth-rate", "2"]) == 0
    out = capsys.readouterr().out
    for layout in ("contiguous   ", "channels_last"):  # the ATen path and the fused path
        assert f"ok    cpu   {layout}  memory-efficient  densenet" in out
    assert "all gradients agree" in out


@pytest.mark.slow
def test_gradcheck_catches_a_planted_wrong_gradient():
    torch.manual_seed(0)
    problems = gradcheck.check(_BuggyLayer(4, 2, True, 0.0, False), [torch.randn(2, 4, 6, 6)],
                               torch.device("cpu"), torch.contiguous_format)
    assert problems and problems[0].startswith("input: autograd")
    names = {p.split(":")[0] for p in problems}
    assert {"norm1.weight", "conv2.weight"} <= names
    correct = gradcheck.check(DenseLayer(4, 2, True, 0.0, False), [torch.randn(2, 4, 6, 6)],
                              torch.device("cpu"), torch.contiguous_format)
    assert correct == []


@pytest.mark.slow
def test_gradcheck_gradients_are_copies_that_stay_where_they_were_taken():
    """gradients() on the CPU, then the module moved: the CUDA run of attic/gradcheck.py moves
    it to the GPU; here a dtype change goes through the same conversion of every .grad."""
    torch.manual_seed(0)
    module = DenseNet(10, 2, num_classes=3)
    first = gradcheck.gradients(module, torch.randn(2, 3, 8, 8), torch.device("cpu"))
    module.float()
    assert all(g.dtype == torch.float64 and g.device.type == "cpu" for g in first)
    assert not any(g is p.grad for g, p in zip(first, module.parameters()))


@pytest.mark.cuda
def test_gradcheck_on_cuda(capsys):
    assert gradcheck.main(["--growth-rate", "2"]) == 0
    out = capsys.readouterr().out
    assert "ok    cpu vs cuda  densenet" in out and "all gradients agree" in out


def test_dataset_stats_are_the_subset_statistics(shared_data, capsys):
    assert dataset_stats.main(["--data-dir", str(shared_data), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    pixels = []
    for i in range(1, 6):
        with open(shared_data / "cifar-10-batches-py" / f"data_batch_{i}", "rb") as f:
            pixels.append(pickle.load(f, encoding="latin1")["data"].reshape(-1, 3, 1024))
    pixels = np.concatenate(pixels).astype(np.float64) / 255
    assert printed["images"] == 4660
    assert printed["mean"] == pytest.approx(pixels.mean(axis=(0, 2)).tolist(), abs=1e-9)
    assert printed["std"] == pytest.approx(pixels.std(axis=(0, 2)).tolist(), abs=1e-9)
    assert printed["mean"] == pytest.approx([0.4914, 0.4822, 0.4465], abs=0.003)  # near the full set


@pytest.mark.parametrize("flags", [["--depth", "22", "--growth-rate", "6"],
                                   ["--depth", "13", "--no-bottleneck", "--compression", "1"]])
def test_summary_totals_equal_the_model(tmp_path, capsys, flags):
    image = tmp_path / "arch.png"
    assert summary.main([*flags, "--image", str(image)]) == 0
    out = capsys.readouterr().out
    bottleneck = "--no-bottleneck" not in flags
    model = DenseNet(int(flags[1]), int(flags[3]) if bottleneck else 12, bottleneck=bottleneck,
                     compression=0.5 if bottleneck else 1.0)
    total = sum(p.numel() for p in model.parameters())
    assert f"total: {total:,} parameters" in out
    rows = summary.rows_of(model, 10)
    assert sum(r["parameters"] for r in rows) == total
    assert image.stat().st_size > 10_000


def test_summary_flops_of_bc_100_12():
    rows = summary.rows_of(DenseNet(100, 12, bottleneck=True, compression=0.5), 10)
    assert sum(r["flops"] for r in rows) / 1e9 == pytest.approx(0.5759, abs=1e-4)


def test_lr_finder_writes_csv_and_plot_marks_suggestion(tmp_path, cifar_dir, capsys):
    work = tmp_path / "sweep"
    assert lr_find.main(["--data-dir", str(cifar_dir), "--save", str(work), *TINY_MODEL,
                         "--steps", "12", "--start-lr", "1e-4", "--end-lr", "1"]) == 0
    assert "note: 12 steps are few; the suggestion will be rough" in capsys.readouterr().out
    with open(work / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-4) and lrs == sorted(lrs) and len(rows) <= 12
    suggestion = json.loads((work / "lr_find.json").read_text())["suggested_lr"]
    assert lrs[0] <= suggestion <= lrs[-1]
    assert plot.main([str(work)]) == 0
    assert (work / "lr_find.png").stat().st_size > 10_000
    assert sorted(p.name for p in work.iterdir()) == ["lr_find.csv", "lr_find.json", "lr_find.png"]


def test_lr_finder_stops_at_the_first_non_finite_loss(tmp_path, cifar_dir, capsys):
    """Absurd rates: the sweep ends where the loss stops being finite and says so; every row
    it writes holds numbers, so plot.py draws it."""
    work = tmp_path / "sweep"
    assert lr_find.main(["--data-dir", str(cifar_dir), "--save", str(work), *TINY_MODEL,
                         "--steps", "12", "--start-lr", "1e30", "--end-lr", "1e35"]) == 0
    out = capsys.readouterr().out
    assert "the sweep ended early: the loss stopped being finite at lr " in out
    with open(work / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert 1 <= len(rows) < 12
    assert all(np.isfinite(float(r[key])) for r in rows for key in ("lr", "raw_loss", "loss"))
    assert plot.main([str(work)]) == 0


@pytest.mark.slow
def test_confusion_matrix_and_per_class_errors_are_drawn(tmp_path, cifar_dir, capsys):
    work = tmp_path / "run"
    assert train.main(["--data-dir", str(cifar_dir), "--save", str(work), *TINY, "--epochs", "1"]) == 0
    assert train.main(["--evaluate", str(work / "checkpoint.pt"), "--data-dir", str(cifar_dir)]) == 0
    capsys.readouterr()
    assert plot.main([str(work)]) == 0
    drawn = capsys.readouterr().out
    for name in ("checkpoint-classes.png", "checkpoint-confusion.png", "curves.png"):
        assert f"wrote {work / name}" in drawn


def test_predict_classifies_own_images_with_the_runs_names(tmp_path, cifar_dir, capsys):
    """Any size and format: the central square, resized; probabilities from the run's model."""
    from PIL import Image
    work = tmp_path / "run"
    assert train.main(["--data-dir", str(cifar_dir), "--save", str(work), *TINY, "--epochs", "1"]) == 0
    wide = np.zeros((50, 90, 3), dtype=np.uint8)
    wide[:, :20] = (0, 255, 0)  # borders outside the central square
    wide[:, 20:70] = (200, 30, 10)
    wide[:, 70:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.full((500, 400, 3), 90, dtype=np.uint8)).save(tmp_path / "big.jpg")
    pixels = predict.read_image(tmp_path / "wide.png")
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, torch.tensor([200, 30, 10], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    capsys.readouterr()
    assert predict.main([str(work), str(tmp_path / "wide.png"), str(tmp_path / "big.jpg"), "--top", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(tmp_path / "wide.png"), str(tmp_path / "big.jpg")]
    for line in lines:
        shares = [part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", ")]
        percents = [float(p.rstrip("%")) for _, p in shares]
        assert {name for name, _ in shares} == {"airplane", "automobile", "bird", "cat", "deer", "dog",
                                               "frog", "horse", "ship", "truck"}
        assert percents == sorted(percents, reverse=True) and sum(percents) == pytest.approx(100, abs=0.6)
    assert predict.main([str(work / "checkpoint.pt"), str(ROOT / "train.py")]) == 2
    assert "train.py is not a readable PNG or JPEG image" in capsys.readouterr().err


def test_a_failing_measurement_process_ends_in_one_line(tmp_path):
    """bench/: a measuring child that fails gives its last error line, not a traceback."""
    from densenet_trainer import measuring
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('something', file=sys.stderr)\n"
                      "raise SystemExit('out of memory on the device')\n")
    with pytest.raises(UserError, match='the measuring process for {"mode": "x"} failed: out of '
                                        'memory on the device'):
        measuring.in_fresh_process(script, {"mode": "x"}, 1)


def test_predict_reads_images_as_a_person_sees_them(tmp_path):
    """A 16-bit greyscale PNG's mid-grey is mid-grey (not 255), and a photo whose EXIF says
    it is upside down is turned the right way up before it is classified."""
    from PIL import Image
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(grey)
    assert Image.open(grey).mode.startswith("I")  # the file is what the test means it to be
    assert predict.read_image(grey).unique().tolist() == [128]
    upright = np.zeros((64, 64, 3), dtype=np.uint8)
    upright[:32] = 255  # white above, black below, as the camera should show it
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    Image.fromarray(upright[::-1].copy()).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    pixels = predict.read_image(tmp_path / "photo.jpg")
    assert pixels[:, :12].float().mean() > 240 and pixels[:, 20:].float().mean() < 15


def test_bench_speed_says_how_each_mode_really_ran():
    """Each mode's JSON names the kernel set and how the step ran (a graph, or eager and why),
    and auto kernels are pinned to the device's without timing candidates in the process."""
    result = speed.measure({"mode": "plain", "depth": 10, "growth_rate": 4, "batch": 8,
                            "device": "cpu", "steps": 1, "warmup": 0})
    assert result["kernels_used"] == {"kernels": "fused", "why": "--kernels fused on cpu"}
    assert result["step"] == "eager (--no-cuda-graph)"  # the mode asks for none
    assert speed.ran_as([result, result]) == "fused, eager"
    assert speed.ran_as([result, {**result, "step": "graphed (captured in 1 s; ...)"}]) == (
        "mixed: fused, eager; fused, graphed")


CONV_BACKWARD = ["aten::convolution_backward", "ConvolutionBackward0",
                 "autograd::engine::evaluate_function: ConvolutionBackward0"]


@pytest.mark.parametrize("calls, group", [
    (["aten::cudnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"], "convolution forward"),
    (CONV_BACKWARD, "convolution backward (data and weight)"),
    (["aten::add_", *CONV_BACKWARD], "convolution backward (data and weight)"),  # cuDNN's split-K sum
    (["aten::mkldnn_convolution", "aten::convolution", "_NormReLUConv"], "convolution forward"),
    (["_NormReLUConv"], "BatchNorm-ReLU forward"),  # the Triton kernels it launches itself
    (["_NormReLUBackward", "autograd::engine::evaluate_function: _NormReLUBackward"], "BatchNorm-ReLU backward"),
    (["aten::native_batch_norm", "aten::batch_norm"], "BatchNorm-ReLU forward"),
    (["aten::fill_", "aten::zero_", "Optimizer.zero_grad#SGD.zero_grad"], "optimiser"),
    (["aten::_foreach_add_", "Optimizer.step#SGD.step"], "optimiser"),
    (["aten::copy_", "aten::cat"], "concatenation"),
    (["aten::index_select"], "others"),
    (["aten::zeros", "_NormReLUMatmul"], "1x1 GEMM with BatchNorm-ReLU forward (fused-gemm)"),
    (["aten::sum", "_NormReLUMatmulBackward", "autograd::engine::evaluate_function: _NormReLUMatmulBackward"],
     "1x1 GEMM with BatchNorm-ReLU backward (fused-gemm)")])
def test_bench_profile_files_time_under_the_call_that_spent_it(calls, group):
    """A kernel is filed by the calls it was launched from, not by its name: cuDNN's GEMMs
    and reductions in a convolution's backward are that backward's, whatever they are called."""
    assert profile.group_of(calls) == group
    event = None
    for name in reversed(calls):
        event = SimpleNamespace(name=name, cpu_parent=event)
    assert profile.calls_of(event) == calls


@pytest.mark.slow
def test_bench_profile_tables_a_step_of_each_path_on_the_cpu(capsys):
    assert profile.main(["--paths", "aten,fused", "--depth", "10", "--growth-rate", "4", "--batch", "8",
                         "--warmup", "1", "--threads", "1", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()[1:]
    assert table[0].split() == ["group", "aten", "fused"]
    cell = r"-(?=\s|$)|[0-9.]+(?: \([0-9]+%\))?(?: x[0-9]+)?"
    rows = {line[:40].strip(): re.findall(cell, line[40:]) for line in table[1:]}
    assert {"convolution forward", "convolution backward (data and weight)", "BatchNorm-ReLU forward",
            "BatchNorm-ReLU backward", "optimiser", "step"} <= set(rows)
    assert all(len(cells) == 2 for cells in rows.values()), rows
    assert rows["concatenation"][1] == "-" and float(rows["concatenation"][0].split()[0]) > 0  # ATen only
    steps = [float(ms) for ms in rows["step"]]
    for group, cells in rows.items():  # every group's time within its step's
        for text, step in zip(cells, steps):
            assert text == "-" or float(text.split()[0]) <= step * 1.05, (group, cells)
