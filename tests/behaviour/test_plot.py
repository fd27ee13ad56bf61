"""plot.py: figures hold the logged data, growing CSVs are read safely, bad input is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest

import plot
from helpers import run_cli, run_main


def draw(capsys, *argv) -> tuple[int, str, str]:
    """plot.py's main in this process: (exit status, stdout, stderr)."""
    return run_main(capsys, plot.main, *argv)

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


@pytest.mark.slow
def test_one_run_files_and_plotted_data(tmp_path, capsys):
    run_dir = make_run(tmp_path / "bc-40", 8)
    status, out, err = draw(capsys, run_dir)
    assert status == 0, err
    for name in ("loss", "error", "curves"):
        path = run_dir / f"{name}.png"
        assert f"wrote {path}" in out
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
    assert "1,234" in out and "bc-40" in out


def test_three_runs_overlaid_with_summary(tmp_path, capsys):
    runs = [make_run(tmp_path / f"run{i}", 4 + i, offset=i) for i in range(3)]
    status, out, err = draw(capsys, *runs, "--format", "svg")
    assert status == 0, err
    figure = tmp_path / "comparison.svg"
    assert f"wrote {figure}" in out and figure.stat().st_size > 1000
    table = out.splitlines()
    assert table[0].split() == ["run", "epochs", "final", "test", "error", "best", "test", "error",
                                "parameters"]
    assert table[3].split()[:4] == ["run2", "6", f"{65 / 6 + 2:.2f}%", f"{65 / 6 + 2:.2f}%"]
    fig = plot.make_figure([plot.load_run(r) for r in runs], ["loss", "error"], options())
    test_lines = {line.get_color(): line for line in fig.axes[1].get_lines()
                  if line.get_linestyle() == "--" and len(line.get_xdata())}
    assert len(test_lines) == 3  # a colour per run
    assert list(test_lines[plot.COLOURS[1]].get_ydata()) == pytest.approx([65 / e + 1 for e in range(1, 6)], abs=1e-3)
    # one legend beneath the panels: each run once by its colour, the splits by their style
    assert [fig.axes[0].get_legend(), fig.axes[1].get_legend()] == [None, None]
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["run0", "run1", "run2", "train", "test"]


@pytest.mark.slow
def test_half_written_last_line_is_ignored(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run", 3)
    with open(run_dir / "train.csv", "a") as f:
        f.write("4,0.001,0.5")  # training is appending this row right now
    run = plot.load_run(run_dir)
    assert run.logs["train"]["epoch"].tolist() == [1, 2, 3]
    assert draw(capsys, run_dir)[0] == 0


def test_header_only_says_no_epochs_yet(tmp_path, capsys):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    (run_dir / "train.csv").write_text(TRAIN_HEADER)
    (run_dir / "test.csv").write_text(TEST_HEADER)
    status, out, _ = draw(capsys, run_dir)
    assert status == 0
    assert f"{run_dir}: no epochs logged yet" in out
    assert not list(run_dir.glob("*.png"))


def test_a_refused_redraw_keeps_the_last_figures(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run", 3)
    assert draw(capsys, run_dir)[0] == 0
    figures = {p.name: p.read_bytes() for p in run_dir.glob("*.png")}
    assert len(figures) == 3
    (run_dir / "checkpoint-confusion.csv").write_text("true\\predicted,a\na,x\n")
    with open(run_dir / "train.csv", "a") as f:
        f.write("4,0.001,0.5,30,1,400\n")
    status, _, err = draw(capsys, run_dir, "--dpi", "90")
    assert status == 2 and "is not a square confusion matrix" in err
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.png")} == figures


def test_epoch_range_and_columns_read_by_name(tmp_path):
    run_dir = make_run(tmp_path / "run", 10)
    (run_dir / "test.csv").write_text("error,extra,epoch,loss\n" + "".join(
        f"{50 - e},7,{e},{1 / e}\n" for e in range(1, 11)))
    fig = plot.make_figure([plot.load_run(run_dir)], ["error"], options("--epochs", "3:5"))
    assert line_data(fig.axes[0])["test"] == [47, 46, 45]


@pytest.mark.slow
def test_runs_where_torch_cannot_be_imported(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    run_dir = make_run(tmp_path / "run", 3)
    result = run_cli("plot.py", run_dir, env={"PYTHONPATH": str(blocker)})
    assert result.returncode == 0, result.stderr
    assert (run_dir / "curves.png").is_file()


def test_one_epoch_shows_its_points_on_a_whole_epoch_axis(tmp_path):
    run = plot.load_run(make_run(tmp_path / "run", 1))
    fig = plot.make_figure([run], ["loss", "error"], options())
    for ax in fig.axes:
        drawn = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert all(line.get_marker() == "o" for line in drawn)
        assert list(ax.get_xticks()) == [1] and ax.get_xlim() == (0.5, 1.5)
    long = plot.load_run(make_run(tmp_path / "long", 60))
    line = plot.make_figure([long], ["loss"], options()).axes[0].get_lines()[0]
    assert line.get_marker() in (None, "None", "")


def test_an_epoch_range_without_data_is_refused_and_keeps_the_figures(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run", 3)
    assert draw(capsys, run_dir)[0] == 0
    figures = {p.name: p.read_bytes() for p in run_dir.glob("*.png")}
    status, _, err = draw(capsys, run_dir, "--epochs", "10:20")
    assert status == 2 and "--epochs 10:20 holds no logged epoch (logged: run 1-3)" in err
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.png")} == figures
    with pytest.raises(SystemExit):
        plot.parse_args([str(run_dir), "--epochs", "5:2"])


def test_a_comparison_names_its_runs_and_shows_each_runs_drops(tmp_path):
    runs = [plot.load_run(make_run(tmp_path / name, epochs)) for name, epochs in
            (("short", 4), ("long", 8))]
    fig = plot.make_figure(runs, ["loss", "error"], options())
    assert fig._suptitle.get_text() == "short vs long"
    drops = {(line.get_xdata()[0], line.get_color()) for line in fig.axes[1].get_lines()
             if line.get_linestyle() == "-."}
    assert drops == {(2.5, plot.COLOURS[0]), (3.5, plot.COLOURS[0]),
                     (4.5, plot.COLOURS[1]), (6.5, plot.COLOURS[1])}


def test_a_log_loss_axis_labels_several_plain_values(tmp_path):
    run_dir = make_run(tmp_path / "run", 20)
    (run_dir / "train.csv").write_text(TRAIN_HEADER + "".join(
        f"{e},0.1,{2.3 - 0.07 * e:.3f},{50 - e},1,400\n" for e in range(1, 21)))  # 2.23 to 0.9
    ax = plot.make_figure([plot.load_run(run_dir)], ["loss"], options()).axes[0]
    fig = ax.figure
    fig.canvas.draw()
    low, high = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    assert len(labels) >= 4 and all(float(label) > 0 for label in labels), labels


def test_confusion_matrix_in_percent_of_each_class_with_the_error(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run", 2)
    counts = "true\\predicted,cat,dog\ncat,3,1\ndog,2,6\n"
    (run_dir / "checkpoint-confusion.csv").write_text(counts)
    (run_dir / "checkpoint-confusion-tta.csv").write_text(counts)
    run = plot.load_run(run_dir)
    figures = {path.name: fig for fig, path in plot.evaluation_figures(run, options())}
    ax, tta = figures["checkpoint-confusion"].axes[0], figures["checkpoint-confusion-tta"]
    assert [t.get_text() for t in ax.texts] == ["75", "25", "25", "75"]  # rows: 4 and 8 images
    assert ax.get_title() == "run: confusion (checkpoint), test error 25.00% of 12 images"
    assert tta.axes[0].get_title().startswith("run: confusion (checkpoint, flip TTA)")


@pytest.mark.slow
def test_math_text_in_titles_and_run_names_is_drawn_as_written(tmp_path, capsys):
    """A title or a folder name with matplotlib's math markup ($...$) is text, not markup:
    an unbalanced one would otherwise end in a traceback."""
    run_dir = make_run(tmp_path / "x$\\alpha_$", 4)
    status, out, err = draw(capsys, run_dir, "--title", "$\\alpha_$ 50% of $5")
    assert status == 0, err
    fig = plot.make_figure([plot.load_run(run_dir)], ["loss"], options("--title", "$\\alpha_$"))
    fig.canvas.draw()  # would parse math text here
    assert "$\\alpha_$" in fig._suptitle.get_text() or any(
        "$\\alpha_$" in ax.get_title() for ax in fig.axes)


@pytest.mark.slow
def test_values_that_cannot_be_drawn_are_named(tmp_path, capsys):
    """A loss of 0 on the log axis leaves a gap, named once; an infinite loss, which train.py
    never writes, is refused naming its line."""
    run_dir = make_run(tmp_path / "gaps", 4)
    lines = (run_dir / "train.csv").read_text().splitlines()
    lines[3] = "3,0.1,0,20,1.5,400"
    (run_dir / "train.csv").write_text("\n".join(lines) + "\n")
    status, out, err = draw(capsys, run_dir)
    assert status == 0, err
    assert f"note: {run_dir} train loss: 1 value(s) not positive, on a log axis left out (epoch 3)" in out
    status, out, _ = draw(capsys, run_dir, "--loss-scale", "linear")
    assert "not positive" not in out
    lines[2] = "2,0.1,inf,30,1.5,400"
    (run_dir / "train.csv").write_text("\n".join(lines) + "\n")
    status, out, err = draw(capsys, run_dir)
    assert status == 2 and f"{run_dir / 'train.csv'}, line 3: loss is 'inf', not a finite number" in err


def test_a_suffix_the_user_wrote_is_kept(tmp_path, capsys):
    runs = [make_run(tmp_path / name, 3) for name in ("a", "b")]
    status, out, err = draw(capsys, *runs, "--out", tmp_path / "cmp.PNG")
    assert status == 0, err
    assert (tmp_path / "cmp.PNG").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "cmp.png").exists()


def test_out_of_an_existing_folder_writes_inside_it(tmp_path, capsys):
    runs = [make_run(tmp_path / name, 3) for name in ("a", "b")]
    figures = tmp_path / "figures"
    figures.mkdir()
    status, out, err = draw(capsys, *runs, "--out", figures)
    assert status == 0, err
    assert (figures / "comparison.png").is_file() and not (tmp_path / "figures.png").exists()


def test_runs_in_several_folders_put_their_comparison_in_the_current_one(tmp_path, capsys, monkeypatch):
    """Runs under two parents: never their common ancestor (for /home and /scratch, /)."""
    runs = [make_run(tmp_path / parent / "run", 3) for parent in ("home", "scratch")]
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    status, out, err = draw(capsys, *runs)
    assert status == 0, err
    assert (here / "comparison.png").is_file() and not (tmp_path / "comparison.png").exists()


@pytest.mark.parametrize("argv, says", [
    (["--table", "--epochs", "1:2"], "--epochs does nothing with --table"),
    (["--table", "--style", "ggplot"], "--style does nothing with --table"),
    (["--group", "--watch", "5"], "--watch does nothing with --group"),
    (["--band", "std"], "--band does nothing with one run's figures"),
    (["--table-format", "csv"], "--table-format does nothing with one run's figures"),
    (["--table", "--table-format", "csv", "--out", "elsewhere"], "--out does nothing with --table")])
def test_a_flag_that_does_nothing_with_the_others_is_refused(tmp_path, capsys, argv, says):
    run = make_run(tmp_path / "a", 3)
    before = sorted(p.name for p in run.iterdir())
    status, out, err = draw(capsys, run, *argv)
    assert status == 2 and err.startswith(f"error: {says}") and "; drop it" in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_an_epoch_range_outside_the_runs_is_one_line_for_groups_too(tmp_path, capsys, finished_run):
    runs = [shutil.copytree(finished_run, tmp_path / name) for name in ("a", "b")]
    status, out, err = draw(capsys, *runs, "--group", "--epochs", "5:9")
    assert status == 2 and err.splitlines()[-1].startswith("error: --epochs 5:9 holds no logged epoch"), err


@pytest.mark.slow
def test_non_ascii_names_are_drawn_under_an_ascii_locale(tmp_path):
    """A run folder and a --title with non-ASCII letters, under LC_ALL=C without Python's
    UTF-8 mode: drawn, not a traceback."""
    run_dir = make_run(tmp_path / "rün", 3)
    result = run_cli("plot.py", run_dir, "--title", "Größe ✓",
                     env={"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"})
    assert result.returncode == 0, result.stderr
    assert (run_dir / "curves.png").is_file()


@pytest.mark.slow
def test_many_runs_are_told_apart_and_each_drawn_once(tmp_path, capsys):
    """Past the palette's eight colours runs differ in their markers; a folder named twice is
    drawn once; the legend gives what each name adds to the part all share (in the title)."""
    runs = [make_run(tmp_path / f"cifar10-bc-seed{i}", 4, offset=i) for i in range(10)]
    status, _, err = draw(capsys, *runs, runs[0])
    assert status == 0 and f"note: {runs[0]} was named twice: counted once" in err
    fig = plot.make_figure([plot.load_run(r) for r in runs], ["error"], options())
    assert fig._suptitle.get_text() == "cifar10-bc-… (10 runs)"
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[:10] == [f"seed{i}" for i in range(10)]
    styles = {(line.get_color(), line.get_marker()) for line in fig.axes[0].get_lines()
              if line.get_linestyle() == "--" and len(line.get_xdata())}
    assert len(styles) == 10  # the 9th and 10th share colours with the 1st and 2nd, not markers
