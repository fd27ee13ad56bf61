"""Results across runs (results/groups.py, plot.py --table and --group) on small synthetic work
directories: grouping by seed, the numbers, the paper's match, each format, the figure."""
from __future__ import annotations

import io
import json
import shutil
import statistics
import uuid
from pathlib import Path

import pandas as pd
import pytest

import plot
import train
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.results import groups, table_formats
from helpers import check_refused, run_main, start_run

PAPER_IMAGES = {"train": 50_000, "test": 10_000}  # CIFAR's official splits


def make_run(folder: Path, errors: list[float], planned: int | None = None,
             val: list[float] | None = None, images: dict | None = None,
             fingerprint: str = "f0", **config) -> Path:
    """A work directory of a run that logged ``errors`` (test error per epoch) of ``planned``,
    on ``images`` (count by split; default: CIFAR's official splits) of ``fingerprint``."""
    folder.mkdir(parents=True)
    epochs = len(errors)
    cfg = RunConfig(**{"device": "cuda", **config, "epochs": planned or epochs, "save": str(folder)}).to_dict()
    schedule = RunConfig.from_dict(cfg, "test")  # train.csv's learning rates are the run's
    counts = images or {**PAPER_IMAGES, **({"val": cfg["val_size"]} if cfg["val_size"] else {})}
    data = {split: {"images": n, "fingerprint": f"{fingerprint}-{split}"} for split, n in counts.items()}
    (folder / "config.json").write_text(json.dumps({
        "config": cfg, "parameters": 769162, "model": "densenet-bc-100-12", "data": data,
        "run_id": uuid.uuid4().hex, "code": {"version": "0.2.0", "commit": "a" * 40, "modified": False}}))
    (folder / "train.csv").write_text("epoch,lr,loss,error,seconds,images_per_s\n" + "".join(
        f"{e},{schedule.learning_rate(e - 1):g},{2.0 / e:.4f},{50 / e:.3f},60,400\n"
        for e in range(1, epochs + 1)))
    (folder / "test.csv").write_text("epoch,loss,error,seconds\n" + "".join(
        f"{e},{2.2 / e:.4f},{error},0.2\n" for e, error in enumerate(errors, 1)))
    if val:
        (folder / "val.csv").write_text("epoch,loss,error,seconds\n" + "".join(
            f"{e},1,{error},0.1\n" for e, error in enumerate(val, 1)))
    return folder


def table_of(capsys, *argv) -> tuple[int, str, str]:
    return run_main(capsys, plot.main, "--table", *argv)


def csv_of(capsys, *runs) -> pd.DataFrame:
    status, out, err = table_of(capsys, *runs, "--table-format", "csv")
    assert status == 0, err
    return pd.read_csv(io.StringIO(out))


def test_seeds_make_one_row_with_mean_and_sample_std(tmp_path, capsys):
    finals = [4.70, 4.55, 4.61]
    runs = [make_run(tmp_path / f"seed{s}", [30.0, error], seed=s, device=("cpu", "cuda")[s % 2])
            for s, error in enumerate(finals)]
    frame = csv_of(capsys, *runs)
    assert len(frame) == 1  # the seed and the device do not split a group
    row = frame.iloc[0]
    assert row["test_error_mean"] == pytest.approx(statistics.mean(finals))
    assert row["test_error_std"] == pytest.approx(statistics.stdev(finals))
    assert (row["test_error_min"], row["test_error_max"], row["n"]) == (4.55, 4.70, 3)
    assert (row["model"], row["parameters"], row["seeds"], row["epochs"], row["planned_epochs"],
            row["training_seconds"], row["data"]) == (
        "densenet-bc-100-12", 769162, "0 1 2", 2, 2, 120, "C10+")
    for column in ("test_error_mean", "test_error_std", "n", "parameters", "train_images"):
        assert pd.api.types.is_numeric_dtype(frame[column]), column
    status, out, _ = table_of(capsys, *runs)
    assert f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f}" in out
    assert "0, 1, 2" in out  # the seeds of the row
    other = make_run(tmp_path / "lr", [30.0, 5.0], lr=0.05)  # another lr: another group
    assert csv_of(capsys, *runs, other)["n"].tolist() == [3, 1]


def test_runs_on_other_images_never_share_a_row_nor_the_papers_number(tmp_path, capsys):
    paper = make_run(tmp_path / "paper", [10.0] * 300)  # BC-100-12, C10+, 300 epochs, 50,000 images
    subsets = [make_run(tmp_path / f"subset{s}", [12.0 + s] * 300, seed=s,
                        images={"train": 2000, "test": 500}) for s in range(2)]
    smaller = make_run(tmp_path / "smaller", [14.0] * 300, images={"train": 1000, "test": 200})
    other_copy = make_run(tmp_path / "other-copy", [13.0] * 300, images={"train": 2000, "test": 500},
                          fingerprint="f1")  # the same counts, other images
    frame = csv_of(capsys, paper, *subsets, smaller, other_copy)
    assert frame["n"].tolist() == [1, 2, 1, 1]
    assert frame["data"].tolist() == ["C10+", "C10+ (2,000 train / 500 test)",
                                      "C10+ (1,000 train / 200 test)", "C10+ (2,000 train / 500 test)"]
    assert frame["paper_error"].tolist()[0] == 4.51 and frame["paper_error"][1:].isna().all()
    assert frame["difference"].tolist()[0] == pytest.approx(5.49)
    assert frame["train_images"].tolist() == [50_000, 2000, 1000, 2000]


def test_the_paper_column_matches_only_the_papers_configuration(tmp_path, capsys):
    paper_run = make_run(tmp_path / "paper", [10.0] * 300)  # BC-100-12, C10+, 300 epochs
    shorter = make_run(tmp_path / "short", [10.0] * 30)  # the same model, 30 epochs
    other = make_run(tmp_path / "other", [9.0] * 300, depth=40, growth_rate=12, bottleneck=False,
                     compression=1.0)  # DenseNet-40-12 C10+: 5.24
    svhn = make_run(tmp_path / "svhn", [3.0] * 300, dataset="svhn", augment=False,
                    images={"train": 598_388, "val": 6000, "test": 26_032})  # 300 epochs, not 40
    held_out = make_run(tmp_path / "val", [10.0] * 300, val=[11.0] * 300, val_size=5000,
                        images={"train": 45_000, "val": 5000, "test": 10_000})  # trained on 45,000
    svhn_paper = make_run(tmp_path / "svhn-paper", [3.0] + [2.0] * 39, val=[2.0] + [2.5] * 39,
                          dataset="svhn", augment=False, val_size=6000,
                          images={"train": 598_388, "val": 6000, "test": 26_032})  # 40 epochs
    # the paper's model, data and epochs, not its recipe: another optimiser, batch, dropout
    recipes = [make_run(tmp_path / f"recipe{index}", [10.0] * 300, **change) for index, change in
               enumerate([{"opt": "adam"}, {"batch_size": 128}, {"augment": False, "dropout": 0.0},
                          {"schedule": "cosine"}, {"weight_decay": 5e-4}])]
    extended = make_run(tmp_path / "extended", [10.0] * 300)  # 150 epochs, then --epochs 300
    lines = (extended / "train.csv").read_text().splitlines()
    (extended / "train.csv").write_text("\n".join(lines[:1] + [
        f"{e},{RunConfig(epochs=150).learning_rate(min(e, 150) - 1):g},{line.split(',', 2)[2]}"
        for e, line in enumerate(lines[1:], 1)]) + "\n")
    record = json.loads((extended / "config.json").read_text())
    (extended / "config.json").write_text(json.dumps({**record, "resumes": [{"changes": {"schedule": "..."}}]}))
    found = [groups.read_result(folder, plot.load_run(folder).logs,
                                 json.loads((folder / "config.json").read_text()))
             for folder in (paper_run, shorter, other, svhn, held_out, svhn_paper, *recipes, extended)]
    cells = [table_formats.row_texts(row) for row in groups.rows(found)]
    assert [c["paper (%)"] for c in cells] == ["4.51", "", "5.24", "", "", "1.76"] + [""] * 6
    assert cells[0]["difference"] == "+5.49" and cells[1]["difference"] == ""
    assert cells[5]["difference"] == "+1.24"  # SVHN: the paper reports the epoch validation chose
    assert [c["data"] for c in cells][:6] == ["C10+", "C10+", "C10+", "SVHN", "C10+ (45,000 train / "
                                              "5,000 val / 10,000 test)", "SVHN"]
    settings = pd.read_csv(io.StringIO(table_formats.table(groups.rows(found), "csv")))["settings"]
    assert settings.iloc[-1].endswith(" rescheduled at a resume")  # its own row, apart from paper_run
    assert "rescheduled" not in settings.iloc[0] and "schedule cosine" in settings.iloc[9]


def test_an_unfinished_run_is_a_row_of_its_own(tmp_path, capsys):
    done = [make_run(tmp_path / f"done{s}", [20.0, 10.0 + s], seed=s) for s in range(2)]
    running = make_run(tmp_path / "running", [25.0], planned=2, seed=5)
    status, out, err = table_of(capsys, *done, running)
    assert status == 0, err
    assert "1/2 (unfinished)" in out.splitlines()[2] and "25.00" in out.splitlines()[2]
    frame = csv_of(capsys, *done, running)
    assert frame["finished"].tolist() == [True, False] and frame["n"].tolist() == [2, 1]
    assert frame["test_error_mean"].tolist() == [10.5, 25.0]


def test_each_run_counts_once_and_a_repeated_seed_is_named(tmp_path, capsys):
    first = make_run(tmp_path / "a", [20.0, 10.0])
    copy = tmp_path / "copy-of-a"
    shutil.copytree(first, copy)
    status, out, err = table_of(capsys, first, first, copy, "--table-format", "csv")
    assert status == 0, err
    assert pd.read_csv(io.StringIO(out))["n"].tolist() == [1]
    assert f"note: {first} was named twice: counted once" in err
    assert f"note: {copy} is the run of {first}" in err
    again = make_run(tmp_path / "again", [20.0, 12.0])  # seed 0 once more: another run
    status, out, err = table_of(capsys, first, again, "--table-format", "csv")
    frame = pd.read_csv(io.StringIO(out))
    assert frame["n"].tolist() == [2] and frame["seeds"].tolist() == ["0 0"]
    assert f"note: seed 0 appears more than once in densenet-bc-100-12 C10+ (n=2): {first}, {again}" in err


def test_the_formats(tmp_path, capsys):
    run = make_run(tmp_path / "val", [30.0, 20.0, 25.0], val=[40.0, 15.0, 18.0], val_size=5000,
                   images={"train": 45_000, "val": 5000, "test": 10_000})
    runs = [run] + [make_run(tmp_path / f"s{s}", [30.0, 20.0 + s / 3], seed=s) for s in (1, 2)]
    status, out, _ = table_of(capsys, *runs, "--table-format", "markdown")
    assert status == 0
    header, rule, row, _ = out.splitlines()
    assert header.startswith("| model | parameters | data | epochs | n | seeds | test error (%) | "
                             "best-val test error (%) |")
    assert rule.startswith("|---|---:|---|---:|---:|---|---:|")  # numbers right-aligned
    assert "| 25.00 | 20.00 |" in row  # final 25.00; the epoch of lowest validation error had 20.00
    status, out, _ = table_of(capsys, *runs, "--table-format", "latex")
    lines = out.splitlines()
    assert lines[0] == r"\begin{tabular}{lrlrrlr@{}lr@{}lr}" and lines[-1] == r"\end{tabular}"
    assert [lines[1], lines[3], lines[-2]] == [r"\toprule", r"\midrule", r"\bottomrule"]
    assert r"\multicolumn{2}{c}{test error (\%)}" in lines[2]
    columns = len(lines[0].removeprefix(r"\begin{tabular}{").removesuffix("}").replace("@{}", ""))
    for line in lines[4:-2]:  # every body row fills every column, ± in the deviation's cell
        assert line.count(" & ") == columns - 1, line
    assert r" & ${}\pm{}$0.24 & " in lines[5]
    status, out, _ = table_of(capsys, *runs, "--table-format", "all")
    for suffix in ("md", "csv", "tex"):
        assert (tmp_path / f"results.{suffix}").is_file() and f"wrote {tmp_path / f'results.{suffix}'}" in out


def test_the_code_column_appears_where_rows_differ_in_it(tmp_path, capsys):
    runs = [make_run(tmp_path / f"s{s}", [30.0, 20.0], seed=s) for s in range(2)]
    other = make_run(tmp_path / "lr", [30.0, 20.0], lr=0.05)
    status, out, _ = table_of(capsys, *runs, other)
    assert "code" not in out.splitlines()[0]
    record = json.loads((other / "config.json").read_text())
    record["code"] = {"version": "0.2.0", "commit": "b" * 40, "modified": True}
    (other / "config.json").write_text(json.dumps(record))
    status, out, _ = table_of(capsys, *runs, other)
    assert out.splitlines()[0].endswith("code") and out.splitlines()[2].endswith("bbbbbbbbbb+modified")


def test_group_curves_say_what_sets_each_group_apart(tmp_path, capsys):
    runs = [make_run(tmp_path / f"s{s}", [30.0, 20.0 + s], seed=s) for s in range(3)]
    alone = make_run(tmp_path / "lr", [28.0, 18.0], lr=0.05)
    opts = plot.parse_args([*map(str, runs), str(alone), "--group"])
    fig, _ = plot.group_figure(opts)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "error"]  # as in curves.png
    loss, error = fig.axes
    assert fig._suptitle.get_text().startswith("densenet-bc-100-12 C10+\n")  # what every group shares
    labels = [text.get_text() for text in fig.legends[0].get_texts()]  # one legend, beneath
    assert labels == ["lr 0.1 (n=3)", "lr 0.05 (n=1)", "train", "test"]  # what sets groups apart
    test_mean = [line for line in error.get_lines() if line.get_label() == labels[0]
                 and line.get_linestyle() == "--"][0]
    assert list(test_mean.get_ydata()) == pytest.approx([30.0, 21.0])
    assert len(error.collections) == 2  # the group of three's train and test bands; none for one run
    drops = [line for line in error.get_lines() if line.get_linestyle() == "-."]
    assert len(drops) == 1  # both groups drop at 1.5, to 0.001 and 0.0005: one line, with the factor
    assert [text.get_text() for text in error.texts] == ["lr ÷100"]  # two drops at once
    assert all("10^" not in label.get_text() and "times" not in label.get_text()
               for label in loss.get_yticklabels())  # plain numbers on the log axis
    status, out, err = run_main(capsys, plot.main, *runs, alone, "--group")
    assert status == 0 and (tmp_path / "groups.png").stat().st_size > 10_000, err


@pytest.mark.slow
def test_a_glob_over_the_runs_folder_passes_over_what_plot_wrote_there(tmp_path, capsys):
    runs = [make_run(tmp_path / f"s{s}", [30.0, 20.0 + s], seed=s) for s in range(2)]
    for argv in (["--table", "--table-format", "all"], ["--group"], []):
        status, _, err = run_main(capsys, plot.main, *runs, *argv)
        assert status == 0, err
    written = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert written == ["comparison.png", "groups.png", "results.csv", "results.md", "results.tex"]
    everything = sorted(tmp_path.iterdir())
    for argv in (["--table"], ["--group"], []):
        status, out, err = run_main(capsys, plot.main, *everything, *argv)
        assert status == 0 and err == "", err
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "lr_find.csv").write_text("step,lr,loss\n1,0.001,2.3\n2,0.01,2.2\n")
    status, out, err = table_of(capsys, *sorted(tmp_path.iterdir()))
    assert status == 0 and len(err.splitlines()) == 1, err
    assert err.startswith("warning: skipped 3 of 5 path(s): ")
    assert f"{tmp_path / 'notes.txt'} (is a file, not a train.py work directory)" in err
    assert f"{sweep} (is a learning-rate sweep (attic/lr_find.py), not a training run)" in err
    assert f"{tmp_path / 'empty'} (holds no train.csv: it is not a train.py work directory)" in err


def test_unreadable_folders_are_skipped_or_refused(tmp_path, capsys):
    good = make_run(tmp_path / "good", [20.0, 10.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    status, out, err = table_of(capsys, good, empty)
    assert status == 0 and f"warning: skipped 1 of 2 path(s): {empty} (" in err and "10.00" in out
    before = sorted(p.name for p in tmp_path.iterdir())
    status, _, err = table_of(capsys, good, empty, "--strict", "--table-format", "all")
    check_refused(status, err, f"{empty} holds no train.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    status, _, err = table_of(capsys, empty)
    assert status == 2 and err.strip().splitlines()[-1] == (  # one path: its own reason
        f"error: {empty} holds no train.csv: it is not a train.py work directory")


@pytest.mark.parametrize("setting, value", [("epochs", None), ("dataset", ["cifar10"]), ("lr", "0.1")])
def test_a_config_json_with_a_value_of_the_wrong_type_is_skipped_naming_it(tmp_path, capsys, setting, value):
    """Checked as a resume checks it: never a traceback, never grouped under a guess."""
    good = make_run(tmp_path / "good", [20.0, 10.0])
    bad = make_run(tmp_path / "bad", [20.0, 10.0])
    record = json.loads((bad / "config.json").read_text())
    record["config"][setting] = value
    (bad / "config.json").write_text(json.dumps(record))
    status, out, err = table_of(capsys, good, bad)
    assert status == 0 and f"{bad} (its config.json records --{setting.replace('_', '-')} as {value!r}" in err
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


def test_rows_that_would_read_alike_say_what_sets_them_apart(tmp_path, capsys):
    subset = {"train": 4660, "test": 846}
    base = make_run(tmp_path / "base", [20.0, 10.0], images=subset)
    lower = make_run(tmp_path / "lower", [20.0, 11.0], images=subset, lr=0.05)
    capped = make_run(tmp_path / "capped", [20.0, 12.0], images=subset, train_subset=5000, seed=1)
    other = make_run(tmp_path / "other", [20.0, 13.0], images=subset, fingerprint="f9")  # other images
    frame = csv_of(capsys, base, lower, capped, other)
    # --train-subset 5000 of 4,660 images trained on base's images: one group
    assert frame["n"].tolist() == [2, 1, 1] and frame["seeds"][0] == "0 1"
    assert frame["data"].nunique() == 1  # C10+ (4,660 train / 846 test): the data column cannot tell
    settings = frame["settings"].tolist()  # words only where a row would read like another
    assert settings[1] == "lr 0.05"
    assert settings[0] == "lr 0.1 train images f0-train test images f0-test"  # their images'
    assert settings[2] == "lr 0.1 train images f9-train test images f9-test"  # fingerprints
    status, out, _ = table_of(capsys, base, lower)
    assert out.splitlines()[0].split()[:5] == ["model", "parameters", "data", "settings", "epochs"]
    assert "lr 0.05" in out.splitlines()[2] and "images" not in out  # lr alone tells them apart
    unrecorded = {"train": {"images": 4660, "fingerprint": None}, "test": {"images": 846, "fingerprint": None}}
    for run in (base, capped):  # runs from before fingerprints: their settings must tell
        record = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**record, "data": unrecorded}))
    fig, _ = plot.group_figure(plot.parse_args([str(base), str(capped), "--group"]))
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[:2] == ["train-subset 0 (n=1)", "train-subset 5000 (n=1)"]


def test_other_process_counts_are_other_groups_and_the_csv_keeps_its_columns(tmp_path, capsys):
    """The number of processes changes the numbers (each normalises its own share of a
    batch): runs on 1 and on 2 are separate rows that say so. The CSV has the same columns
    whatever its rows hold, and the commit stays text."""
    runs = []
    for name, processes in (("one", [1]), ("two", [2]), ("two-then-one", [2, 1])):
        run = make_run(tmp_path / name, [20.0, 10.0])
        record = json.loads((run / "config.json").read_text())
        record["environment"] = {"world_size": processes[0]}
        record["resumes"] = [{"environment": {"world_size": count}} for count in processes[1:]]
        record["code"]["commit"] = "0012345e89" + "a" * 30  # its first ten would read as a number
        (run / "config.json").write_text(json.dumps(record))
        runs.append(run)
    frame = csv_of(capsys, *runs)
    assert frame["n"].tolist() == [1, 1, 1]
    assert frame["settings"].tolist() == ["1 process(es)", "2 process(es)", "2 then 1 process(es)"]
    assert frame["code"].tolist() == ["0012345e89" + "a" * 30] * 3  # the whole commit, as text
    assert {"test_error_std", "best_val_test_error_mean", "top5_error_mean", "paper_error"} <= set(frame.columns)
    assert frame["test_error_std"].isna().all()  # one run a row: no spread, the column kept


def test_a_run_with_a_damaged_csv_line_is_skipped_naming_the_line(tmp_path, capsys):
    good = make_run(tmp_path / "good", [20.0, 10.0])
    bad = make_run(tmp_path / "bad", [20.0, 12.0])
    lines = (bad / "train.csv").read_text().splitlines()
    (bad / "train.csv").write_text("\n".join(lines[:2] + ["2,abc,1.0,25.0,60,400"]) + "\n")
    status, out, err = table_of(capsys, good, bad)
    assert status == 0 and f"{bad}/train.csv, line 3: lr is 'abc'" in err and "10.00" in out


def test_seeds_with_a_validation_set_make_one_row(tmp_path, cifar_dir, capsys):
    """Each seed draws its own validation images from the same pool: what the seed decides
    never splits a row; the held-out size, which the user chose, does."""
    for seed, val_size in ((0, 32), (1, 32), (0, 48)):
        start_run(capsys, tmp_path / f"seed{seed}-val{val_size}", cifar_dir, "--epochs", "1",
                  "--val-size", str(val_size), "--seed", str(seed))
    table = csv_of(capsys, *sorted(tmp_path.glob("seed*")))
    assert sorted(table["n"]) == [1, 2]
    assert sorted(table["val_images"]) == [32, 48]
    assert table.loc[table["n"] == 2, "seeds"].item() == "0 1"


def test_a_statistic_is_of_every_run_its_n_counts(tmp_path, capsys):
    """A top-5 error logged by one run of two: no mean of one beside n=2. A val.csv left in a
    run without a validation set: no best-validation error from it."""
    runs = [make_run(tmp_path / f"seed{s}", [30.0, 20.0 + s], seed=s, dataset="cifar100") for s in (0, 1)]
    test_csv = runs[0] / "test.csv"
    lines = test_csv.read_text().splitlines()
    test_csv.write_text("\n".join([lines[0] + ",top5_error"] + [line + ",9.5" for line in lines[1:]]) + "\n")
    stale = make_run(tmp_path / "stale", [30.0, 25.0], val=[40.0, 10.0])
    table = csv_of(capsys, *runs, stale)
    assert table["n"].tolist() == [2, 1]
    assert table["top5_error_mean"].isna().all() and table["best_val_test_error_mean"].isna().all()


def test_a_row_of_two_commits_shows_its_code_in_every_format(tmp_path, capsys):
    runs = [make_run(tmp_path / f"seed{s}", [30.0, 20.0], seed=s) for s in (0, 1)]
    record = json.loads((runs[1] / "config.json").read_text())
    record["code"]["commit"] = "b" * 40
    (runs[1] / "config.json").write_text(json.dumps(record))
    for style in ("text", "markdown", "latex"):
        status, out, err = table_of(capsys, *runs, "--table-format", style)
        assert status == 0 and "aaaaaaaaaa" in out and "bbbbbbbbbb" in out, (style, out)
    assert csv_of(capsys, *runs)["code"].item() == f"{'a' * 40} {'b' * 40}"


def test_a_row_mixing_a_run_of_unrecorded_code_says_so(tmp_path, capsys):
    """A run from before config.json recorded the code, beside one that did: the row mixes."""
    runs = [make_run(tmp_path / f"seed{s}", [30.0, 20.0], seed=s) for s in (0, 1)]
    record = json.loads((runs[1] / "config.json").read_text())
    del record["code"]
    (runs[1] / "config.json").write_text(json.dumps(record))
    status, out, err = table_of(capsys, *runs)
    assert status == 0 and out.splitlines()[0].endswith("code"), out
    assert out.splitlines()[1].endswith("aaaaaaaaaa unrecorded"), out


def test_a_hand_edited_configuration_is_named_never_counted(tmp_path, cifar_dir, capsys):
    """A copy of a run with its seed changed by hand (run_id kept): the table names it, alone
    it is refused, and the real run is counted once, whichever order they are named in."""
    real = tmp_path / "real"
    start_run(capsys, real, cifar_dir, "--epochs", "1")
    edited = tmp_path / "edited"
    shutil.copytree(real, edited)
    record = json.loads((edited / "config.json").read_text())
    record["config"]["seed"] = 7
    (edited / "config.json").write_text(json.dumps(record))
    for order in ([real, edited], [edited, real]):
        status, out, err = table_of(capsys, *order)
        assert status == 0 and "settings or run_id were changed after train.py wrote them" in err, err
        assert f"{edited} (its config.json" in err and "  1  0 " in out.splitlines()[1], out
    status, out, err = table_of(capsys, edited)
    check_refused(status, err, f"{edited}: its config.json's settings or run_id were changed")


def test_a_copy_continued_is_a_run_of_its_own_and_the_table_counts_both(tmp_path, cifar_dir, capsys):
    """A copy of a run, as it is, is the run (counted once); once continued it diverges, gets
    an identity of its own, and both count, whichever order they are named in."""
    original = tmp_path / "original"
    start_run(capsys, original, cifar_dir, "--epochs", "2", "--stop-after", "1")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert csv_of(capsys, original, copy)["n"].tolist() == [1]
    out = start_run(capsys, copy, cifar_dir, "--epochs", "2", "--resume")
    assert f"a copy of {original}, from here a run of its own" in out
    record = json.loads((copy / "config.json").read_text())
    assert record["copied_from"] == [json.loads((original / "config.json").read_text())["run_id"]]
    assert record["run_id"] != record["copied_from"][0]
    for order in ((original, copy), (copy, original)):
        status, out, err = table_of(capsys, *order, "--table-format", "csv")
        assert status == 0 and "counted once" not in err, err
    status, out, err = run_main(capsys, train.main, "--evaluate", copy / "checkpoint.pt", "--data-dir", cifar_dir)
    assert status == 0, err


def test_a_hand_edited_learning_rate_is_named_never_taken_for_a_resume(tmp_path, capsys):
    runs = [make_run(tmp_path / f"seed{s}", [30.0, 20.0], seed=s) for s in (0, 1)]
    record = json.loads((runs[1] / "config.json").read_text())
    record["config"]["lr"] = 0.05  # its train.csv says 0.1
    (runs[1] / "config.json").write_text(json.dumps(record))
    settings = csv_of(capsys, *runs)["settings"].tolist()
    assert any("rates unlike its config.json's" in str(s) for s in settings)
    assert not any("rescheduled at a resume" in str(s) for s in settings)
