"""Results across runs (results.py, plot.py --table and --group) on small synthetic work
directories: grouping by seed, the numbers, the paper's match, each format, the figure."""
from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

import pandas as pd
import pytest

import plot
from densenet_trainer.records import results
from densenet_trainer.settings.config import RunConfig
from helpers import check_refused, run_main

BC_100 = RunConfig(device="cuda").to_dict()  # the defaults: DenseNet-BC-100-12 on C10+, 300 epochs


def make_run(folder: Path, errors: list[float], planned: int | None = None,
             val: list[float] | None = None, **config) -> Path:
    """A work directory of a run that logged ``errors`` (test error per epoch) of ``planned``."""
    folder.mkdir(parents=True)
    epochs = len(errors)
    cfg = {**BC_100, **config, "epochs": planned or epochs, "save": str(folder)}
    (folder / "config.json").write_text(json.dumps({"config": cfg, "parameters": 769162,
                                                    "model": "densenet-bc-100-12"}))
    (folder / "train.csv").write_text("epoch,lr,loss,error,seconds,images_per_s\n" + "".join(
        f"{e},0.1,{2.0 / e:.4f},{50 / e:.3f},60,400\n" for e in range(1, epochs + 1)))
    (folder / "test.csv").write_text("epoch,loss,error,seconds\n" + "".join(
        f"{e},{2.2 / e:.4f},{error},0.2\n" for e, error in enumerate(errors, 1)))
    if val:
        (folder / "val.csv").write_text("epoch,loss,error,seconds\n" + "".join(
            f"{e},1,{error},0.1\n" for e, error in enumerate(val, 1)))
    return folder


def table_of(capsys, *argv) -> tuple[int, str, str]:
    return run_main(capsys, plot.main, "--table", *argv)


def test_seeds_make_one_row_with_mean_and_sample_std(tmp_path, capsys):
    finals = [4.70, 4.55, 4.61]
    runs = [make_run(tmp_path / f"seed{s}", [30.0, error], seed=s, device=("cpu", "cuda")[s % 2])
            for s, error in enumerate(finals)]
    status, out, err = table_of(capsys, *runs, "--table-format", "csv")
    assert status == 0, err
    frame = pd.read_csv(io.StringIO(out), dtype=str)
    assert len(frame) == 1  # the seed and the device do not split a group
    row = frame.iloc[0]
    assert row["test error (%)"] == f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert (row["n"], row["model"], row["epochs"], row["training time"]) == (
        "3", "densenet-bc-100-12", "2/2", "2.0 min")
    other = make_run(tmp_path / "lr", [30.0, 5.0], lr=0.05)  # another lr: another group
    status, out, _ = table_of(capsys, *runs, other, "--table-format", "csv")
    assert pd.read_csv(io.StringIO(out), dtype=str)["n"].tolist() == ["3", "1"]


def test_the_paper_column_matches_only_the_papers_configuration(tmp_path, capsys):
    paper_run = make_run(tmp_path / "paper", [10.0] * 300)  # BC-100-12, C10+, 300 epochs
    shorter = make_run(tmp_path / "short", [10.0] * 30)  # the same model, 30 epochs
    other = make_run(tmp_path / "other", [9.0] * 300, depth=40, growth_rate=12, bottleneck=False,
                     compression=1.0)  # DenseNet-40-12 C10+: 5.24
    svhn = make_run(tmp_path / "svhn", [3.0] * 300, dataset="svhn", augment=False)  # 300, not 40
    found = [results.read_result(folder, plot.load_run(folder).logs,
                                 json.loads((folder / "config.json").read_text()))
             for folder in (paper_run, shorter, other, svhn)]
    cells = [row.cells() for row in results.rows(found)]
    assert [c["paper (%)"] for c in cells] == ["4.51", "", "5.24", ""]
    assert cells[0]["difference"] == "+5.49" and cells[1]["difference"] == ""
    assert [c["data"] for c in cells] == ["C10+", "C10+", "C10+", "SVHN"]


def test_an_unfinished_run_is_a_row_of_its_own(tmp_path, capsys):
    done = [make_run(tmp_path / f"done{s}", [20.0, 10.0 + s], seed=s) for s in range(2)]
    running = make_run(tmp_path / "running", [25.0], planned=2, seed=5)
    status, out, err = table_of(capsys, *done, running, "--table-format", "csv")
    assert status == 0, err
    frame = pd.read_csv(io.StringIO(out), dtype=str)
    assert frame["epochs"].tolist() == ["2/2", "1/2 (unfinished)"]
    assert frame["n"].tolist() == ["2", "1"]
    assert frame["test error (%)"].tolist() == ["10.50 ± 0.71", "25.00"]


def test_the_validation_choice_and_the_formats(tmp_path, capsys):
    run = make_run(tmp_path / "val", [30.0, 20.0, 25.0], val=[40.0, 15.0, 18.0], val_size=5000)
    status, out, _ = table_of(capsys, run, "--table-format", "markdown")
    assert status == 0
    header, rule, row = out.splitlines()
    assert header.startswith("| model | parameters | data | epochs | n | test error (%) | "
                             "best-val test error (%) |") and rule.startswith("|---|")
    assert "| 25.00 | 20.00 |" in row  # final 25.00; the epoch of lowest validation error had 20.00
    status, out, _ = table_of(capsys, run, "--table-format", "latex")
    assert out.startswith("\\begin{tabular}") and "test error (\\%)" in out and out.rstrip().endswith("\\end{tabular}")
    status, out, _ = table_of(capsys, run, "--table-format", "all")
    for suffix in ("md", "csv", "tex"):
        assert (tmp_path / f"results.{suffix}").is_file() and f"wrote {tmp_path / f'results.{suffix}'}" in out


def test_group_curves_name_each_group_and_its_size(tmp_path, capsys):
    runs = [make_run(tmp_path / f"s{s}", [30.0, 20.0 + s], seed=s) for s in range(3)]
    alone = make_run(tmp_path / "deeper", [28.0, 18.0], depth=190, growth_rate=40)
    opts = plot.parse_args([*map(str, runs), str(alone), "--group"])
    fig, _ = plot.group_figure(opts)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["densenet-bc-100-12 C10+ (n=3)", "densenet-bc-100-12 C10+ (n=1)"]
    mean_line = fig.axes[0].get_lines()[0]
    assert list(mean_line.get_ydata()) == pytest.approx([30.0, 21.0])
    status, out, err = run_main(capsys, plot.main, *runs, alone, "--group")
    assert status == 0 and (tmp_path / "groups.png").stat().st_size > 10_000, err


def test_unreadable_folders_are_skipped_or_refused(tmp_path, capsys):
    good = make_run(tmp_path / "good", [20.0, 10.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    status, out, err = table_of(capsys, good, empty)
    assert status == 0 and f"warning: skipped {empty}: " in err and "10.00" in out
    before = sorted(p.name for p in tmp_path.iterdir())
    status, _, err = table_of(capsys, good, empty, "--strict", "--table-format", "all")
    check_refused(status, err, f"{empty}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    status, _, err = table_of(capsys, empty)
    assert status == 2 and err.strip().splitlines()[-1].startswith(
        "error: none of the 1 folder(s) holds a run with a logged epoch")


@pytest.mark.parametrize("setting, value", [("epochs", None), ("dataset", ["cifar10"]), ("lr", "0.1")])
def test_a_config_json_with_a_value_of_the_wrong_type_is_skipped_naming_it(tmp_path, capsys, setting, value):
    """Checked as a resume checks it: never a traceback, never grouped under a guess."""
    good = make_run(tmp_path / "good", [20.0, 10.0])
    bad = make_run(tmp_path / "bad", [20.0, 10.0])
    record = json.loads((bad / "config.json").read_text())
    record["config"][setting] = value
    (bad / "config.json").write_text(json.dumps(record))
    status, out, err = table_of(capsys, good, bad)
    assert status == 0 and f"warning: skipped {bad}: its config.json records --{setting.replace('_', '-')} as {value!r}" in err
    assert " 1 " in out.splitlines()[1]  # one run in the row


@pytest.mark.parametrize("change, message", [
    ("error -5", "line 3: error is -5, where it is from 0 to 100"),
    ("seconds -1", "line 2: seconds is -1, where it is at least 0"),
    ("an extra test row", "logs 3 epochs where train.csv logs 2: they are not one run's")])
def test_numbers_a_run_cannot_have_are_refused_not_averaged(tmp_path, capsys, change, message):
    run = make_run(tmp_path / "run", [20.0, 10.0])
    if change == "error -5":
        (run / "test.csv").write_text("epoch,loss,error,seconds\n1,2.2,20.0,0.2\n2,1.1,-5,0.2\n")
    elif change == "seconds -1":
        (run / "train.csv").write_text("epoch,lr,loss,error,seconds,images_per_s\n1,0.1,2,50,-1,400\n2,0.1,1,25,60,400\n")
    else:
        with open(run / "test.csv", "a") as f:
            f.write("3,0.5,12.5,0.2\n")
    status, _, err = table_of(capsys, run, "--strict")
    check_refused(status, err, message)


def test_an_epoch_being_written_counts_once_whole(tmp_path, capsys):
    """train.csv has epoch 2's row, test.csv not yet: the table shows epoch 1 of 2, unfinished."""
    run = make_run(tmp_path / "run", [20.0, 10.0])
    (run / "test.csv").write_text("epoch,loss,error,seconds\n1,2.2,20.0,0.2\n")
    status, out, err = table_of(capsys, run)
    assert status == 0, err
    assert "1/2" in out and "20.00" in out and "(unfinished)" in out
