"""plot.py: figures hold the logged data, growing CSVs are read safely, bad input is refused."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

import plot
from conftest import run_cli

TRAIN_HEADER = "epoch,lr,loss,error,seconds,images_per_s\n"
TEST_HEADER = "epoch,loss,error,seconds\n"


def make_run(folder: Path, epochs: int, offset: float = 0.0, parameters: int = 1234) -> Path:
    """A work directory as train.py leaves it, with a step schedule over ``epochs``."""
    folder.mkdir(parents=True)
    train = [TRAIN_HEADER]
    test = [TEST_HEADER]
    for e in range(1, epochs + 1):
        lr = 0.1 * 0.1 ** sum(e - 1 >= int(epochs * s) for s in (0.5, 0.75))
        train.append(f"{e},{lr:g},{2.0 / e + offset:.4f},{60 / e + offset:.3f},1.5,400\n")
        test.append(f"{e},{2.2 / e + offset:.4f},{65 / e + offset:.3f},0.2\n")
    (folder / "train.csv").write_text("".join(train))
    (folder / "test.csv").write_text("".join(test))
    (folder / "config.json").write_text(json.dumps({"parameters": parameters}))
    return folder


def options(*argv: str):
    return plot.parse_args(["unused", *argv])


def line_data(ax) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_one_run_files_and_plotted_data(tmp_path):
    run_dir = make_run(tmp_path / "bc-40", 8)
    result = run_cli("plot.py", run_dir)
    assert result.returncode == 0, result.stderr
    for name in ("loss", "error", "curves"):
        path = run_dir / f"{name}.png"
        assert f"wrote {path}" in result.stdout
        height, width, _ = matplotlib.image.imread(path).shape
        assert width > 500 and height > 300
    run = plot.load_run(run_dir)
    fig = plot.make_figure([run], ["loss", "error"], options())
    loss_ax, error_ax = fig.axes
    assert line_data(loss_ax)["train"] == pytest.approx(run.logs["train"]["loss"].tolist())
    assert line_data(loss_ax)["test"] == pytest.approx(run.logs["test"]["loss"].tolist())
    assert line_data(error_ax)["test"] == pytest.approx([65 / e for e in range(1, 9)], abs=1e-3)
    assert loss_ax.get_yscale() == "log" and error_ax.get_yscale() == "linear"
    drops = [line.get_xdata()[0] for line in error_ax.get_lines() if line.get_label().startswith("_")]
    assert drops == [4.5, 6.5]  # lr drops before epochs 5 and 7: 50% and 75% of 8
    assert "1,234" in result.stdout and "bc-40" in result.stdout


def test_three_runs_overlaid_with_summary(tmp_path):
    runs = [make_run(tmp_path / f"run{i}", 4 + i, offset=i) for i in range(3)]
    result = run_cli("plot.py", *runs, "--format", "svg")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "comparison.svg"
    assert f"wrote {out}" in result.stdout and out.stat().st_size > 1000
    table = result.stdout.splitlines()
    assert table[0].split() == ["run", "epochs", "final", "test", "error", "best", "test", "error",
                                "parameters"]
    assert table[3].split()[:4] == ["run2", "6", f"{65 / 6 + 2:.2f}%", f"{65 / 6 + 2:.2f}%"]
    fig = plot.make_figure([plot.load_run(r) for r in runs], ["loss", "error"], options())
    data = line_data(fig.axes[1])
    assert data["run1 test"] == pytest.approx([65 / e + 1 for e in range(1, 6)], abs=1e-3)
    colours = {line.get_color() for line in fig.axes[1].get_lines() if "test" in line.get_label()}
    assert len(colours) == 3


def test_half_written_last_line_is_ignored(tmp_path):
    run_dir = make_run(tmp_path / "run", 3)
    with open(run_dir / "train.csv", "a") as f:
        f.write("4,0.001,0.5")  # training is appending this row right now
    run = plot.load_run(run_dir)
    assert run.logs["train"]["epoch"].tolist() == [1, 2, 3]
    assert run_cli("plot.py", run_dir).returncode == 0


def test_header_only_says_no_epochs_yet(tmp_path):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    (run_dir / "train.csv").write_text(TRAIN_HEADER)
    (run_dir / "test.csv").write_text(TEST_HEADER)
    result = run_cli("plot.py", run_dir)
    assert result.returncode == 0
    assert f"{run_dir}: no epochs logged yet" in result.stdout
    assert not list(run_dir.glob("*.png"))


def test_epoch_range_and_columns_read_by_name(tmp_path):
    run_dir = make_run(tmp_path / "run", 10)
    (run_dir / "test.csv").write_text("error,extra,epoch,loss\n" + "".join(
        f"{50 - e},x,{e},{1 / e}\n" for e in range(1, 11)))
    fig = plot.make_figure([plot.load_run(run_dir)], ["error"], options("--epochs", "3:5"))
    assert line_data(fig.axes[0])["test"] == [47, 46, 45]


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("not_a_run", "is not a train.py work directory"),
    ("no_loss_column", "lacks the column(s) loss"),
    ("not_numbers", "non-numeric values in loss"),
])
def test_bad_input_one_line_and_non_zero_exit(tmp_path, case, message):
    folder = tmp_path / case
    if case == "not_a_run":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
    elif case == "no_loss_column":
        folder.mkdir()
        (folder / "train.csv").write_text("epoch,error\n1,50\n")
    elif case == "not_numbers":
        make_run(folder, 2)
        (folder / "train.csv").write_text(TRAIN_HEADER + "1,0.1,abc,50,1,1\n")
    result = run_cli("plot.py", folder)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_runs_where_torch_cannot_be_imported(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    run_dir = make_run(tmp_path / "run", 3)
    result = run_cli("plot.py", run_dir, env={"PYTHONPATH": str(blocker)})
    assert result.returncode == 0, result.stderr
    assert (run_dir / "curves.png").is_file()
