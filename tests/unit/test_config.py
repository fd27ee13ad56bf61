"""The typed configuration (config/run_config.py): one description of a run, its flags, its flat form."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest

from densenet_trainer.config import architecture, run_config
from densenet_trainer.config.cli import OneLineParser, UserError
from densenet_trainer.config.run_config import RESUMABLE, RunConfig
from helpers import config_of


def test_every_setting_declares_its_flag_and_whether_a_resume_may_change_it():
    for spec in fields(RunConfig):
        assert spec.metadata["group"] in run_config.GROUPS and spec.metadata["help"], spec.name
        assert isinstance(spec.metadata["resumable"], bool), spec.name
    # where the data is, how fast, how long, where the files go: never what the numbers are
    assert RESUMABLE == {"epochs", "device", "channels_last", "compile", "kernels", "cuda_graph",
                         "memory_efficient", "data_dir", "download", "eval_batch_size", "save",
                         "resume", "auto_resume", "stop_after"}
    kernels = next(f for f in fields(RunConfig) if f.name == "kernels")
    assert set(run_config.KERNELS) <= set(kernels.metadata["choices"])


def test_defaults_that_depend_on_other_settings():
    assert (RunConfig().epochs, RunConfig().augment, RunConfig().dropout, RunConfig().lr) == (300, True, 0.0, 0.1)
    svhn = RunConfig(dataset="svhn")
    assert (svhn.epochs, svhn.augment, svhn.dropout, svhn.num_classes) == (40, False, 0.2, 10)
    assert RunConfig(augment=False).dropout == 0.2 and RunConfig(opt="adam").lr == 0.001
    assert RunConfig(dataset="svhn", epochs=7, augment=True, dropout=0.1).epochs == 7
    assert RunConfig().save == "work/cifar10-densenet-bc-100-12"
    assert RunConfig(depth=40, bottleneck=False, compression=1).save == "work/cifar10-densenet-40-12"
    assert RunConfig(dataset="cifar100").top5 and not RunConfig().top5
    assert RunConfig(kernels="compile").compile and not RunConfig(kernels="aten").compile


def test_default_folders_name_every_setting_that_changes_the_numbers():
    assert RunConfig(depth=16, growth_rate=8, epochs=4, seed=1).save == "work/cifar10-densenet-bc-16-8-epochs4-seed1"
    assert RunConfig(dataset="svhn").save == "work/svhn-densenet-bc-100-12"  # its derived defaults
    assert RunConfig(augment=False, lr=0.05, weight_decay=5e-4, train_subset=5000).save == (
        "work/cifar10-densenet-bc-100-12-train5000-no-augment-lr0.05-wd0.0005")
    # one setting changed at a time, each to a value other than its own: every folder differs
    changed = {"dataset": "cifar100", "val_size": 10, "train_subset": 10,
               "test_subset": 10, "augment": False, "depth": 40, "growth_rate": 6,
               "bottleneck": False, "compression": 1.0, "dropout": 0.1, "epochs": 4,
               "batch_size": 32, "lr": 0.05, "momentum": 0.8, "weight_decay": 5e-4,
               "opt": "rmsprop", "schedule": "cosine", "seed": 1,
               "precision": "bf16", "sync_bn": True}
    assert set(changed) == {f.name for f in fields(RunConfig)} - run_config.NUMBER_NEUTRAL - {"svhn_extra"}
    folders = [RunConfig(**{name: value}).save for name, value in changed.items()]
    assert len(set(folders) | {RunConfig().save}) == len(changed) + 1, folders
    # --no-svhn-extra names SVHN's folders only; -0.0 is 0; decimals without an exponent's minus
    assert RunConfig(dataset="svhn", svhn_extra=False).save == "work/svhn-densenet-bc-100-12-no-svhn-extra"
    assert RunConfig(weight_decay=-0.0) == RunConfig(weight_decay=0.0)
    assert RunConfig(weight_decay=-0.0).save == "work/cifar10-densenet-bc-100-12-wd0"
    assert RunConfig(lr=1e-5).save == "work/cifar10-densenet-bc-100-12-lr0.00001"
    # what cannot change the numbers never changes the folder
    neutral = {"device": "cpu", "kernels": "aten", "cuda_graph": False, "channels_last": False,
               "memory_efficient": True, "data_dir": "elsewhere", "eval_batch_size": 7, "stop_after": 2,
               "auto_resume": True}
    assert {RunConfig(**{name: value}).save for name, value in neutral.items()} == {RunConfig().save}
    assert RunConfig(seed=1, save="mine").save == "mine"  # --save always wins


def test_the_kernels_are_a_function_of_the_configuration_and_the_device():
    assert RunConfig().kernels_on("cpu") == "fused" and RunConfig().kernels_on("cuda") == "aten"
    assert RunConfig(precision="bf16").kernels_on("cpu") == "aten"
    assert RunConfig(kernels="compile").kernels_on("cpu") == "aten"
    assert RunConfig(kernels="fused").kernels_on("cuda") == "fused"


def test_a_configuration_is_its_flat_form_and_back():
    cfg = RunConfig(dataset="cifar100", depth=40, growth_rate=6, compression=1, opt="rmsprop",
                    val_size=10, precision="bf16", save="work/x")
    flat = json.loads(json.dumps(cfg.to_dict()))  # as config.json keeps it
    assert len(flat) == 34 and flat["compile"] is False and flat["kernels"] == "auto"
    assert RunConfig.from_dict(flat, "config.json") == cfg


def test_runs_of_earlier_versions_take_the_defaults_of_the_settings_added_since():
    saved = RunConfig(depth=40, save="work/x").to_dict()
    for later in ("kernels", "cuda_graph", "stop_after"):
        del saved[later]
    cfg = RunConfig.from_dict(saved, "old/checkpoint.pt")
    assert (cfg.kernels, cfg.cuda_graph, cfg.stop_after, cfg.depth) == ("auto", True, 0, 40)
    assert RunConfig.from_dict({**saved, "compile": True}, "old").kernels == "compile"


@pytest.mark.parametrize("change,message", [
    ({"depth": None}, "was saved without --depth: it is not a run of this trainer"),
    ({"wings": 2}, "has the setting 'wings', which this version of train.py does not know"),
    ({"depth": "ten"}, "records --depth as 'ten', which is not a valid value"),
    ({"dataset": "mnist"}, "records --dataset as 'mnist'"),
    ({"augment": 1}, "records --augment as 1"),
    ({"lr": float("nan")}, "records --lr as nan"),
])
def test_a_damaged_or_foreign_configuration_is_refused(change, message):
    saved = {**RunConfig(save="work/x").to_dict(), **change}
    saved = {k: v for k, v in saved.items() if v is not None}
    with pytest.raises(UserError, match=message):
        RunConfig.from_dict(saved, "work/x/checkpoint.pt")


def test_flags_name_what_was_given_and_compile_is_a_kernel_choice():
    parser = OneLineParser()
    run_config.add_flags(parser, run_config.flag_names("model", "speed"))
    cfg, given = RunConfig.from_flags(parser.parse_args(["--depth", "100", "--compile"]))
    assert given == {"depth", "compile", "kernels"}  # --depth 100 is the default, and given
    assert cfg == RunConfig(kernels="compile")
    with pytest.raises(UserError, match="--compile .* is --kernels compile, not --kernels aten"):
        RunConfig.from_flags(parser.parse_args(["--kernels", "aten", "--compile"]))  # one would be dropped
    assert RunConfig.from_flags(parser.parse_args(["--kernels", "compile", "--compile"]))[0].kernels == "compile"
    assert RunConfig.from_flags(parser.parse_args([])) == (RunConfig(), frozenset())
    with pytest.raises(SystemExit):
        parser.parse_args(["--epochs", "5"])  # a group that was not asked for


def test_impossible_models_are_refused_in_one_line():
    with pytest.raises(UserError, match="depth 41 is impossible for DenseNet-BC"):
        RunConfig(depth=41)
    with pytest.raises(UserError, match="compression must be in"):
        RunConfig(compression=0)
    RunConfig(depth=40, bottleneck=False, compression=1)


@pytest.mark.parametrize("values, says", [
    ({"momentum": 1.5}, r"momentum \(--momentum\) must be in \[0, 1\), got 1.5"),
    ({"opt": "adam", "momentum": 0.5}, r"--momentum 0.5 does nothing here \(--opt adam takes no momentum\); drop it"),
    ({"svhn_extra": False}, r"--no-svhn-extra does nothing here \(cifar10 has no extra images\)"),
    ({"compile": True, "kernels": "fused"}, r"--compile \(compile=True\) is --kernels compile, not --kernels fused"),
    ({"eval_batch_size": 0}, r"eval_batch_size \(--eval-batch-size\) must be a positive integer, got 0"),
    ({"stop_after": -1}, r"stop_after \(--stop-after\) must be 0 or more, got -1"),
    ({"save": "runs/a\nb"}, r"save \(--save\) the path 'runs/a\\nb' holds a control character"),
    ({"batch_size": 0}, "batch_size .* must be a positive integer, got 0"),
    ({"precision": "fp8"}, "precision .* must be one of fp32, bf16, fp16, got 'fp8'"),
    ({"lr": -1.0}, "lr .* must be a positive number"),
    ({"seed": -5}, "seed .* must be between 0 and 4294967295, got -5"),
    ({"depth": "40"}, "depth .* must be a whole number, got '40'"),
    ({"augment": 1}, "augment .* must be True or False, got 1"),
    ({"weight_decay": float("nan")}, "weight_decay .* must be a finite number, got nan"),
    ({"dataset": "mnist"}, "dataset .* must be one of cifar10, cifar100, svhn"),
    ({"lr": 10**400}, r"lr .* must be a finite number, got 1000000000000000000000000000000000000\.\.\."),
    ({"compression": "0.5"}, "compression .* must be a finite number, got '0.5'"),
    ({"data_dir": ""}, "data_dir .* an empty path names nothing"),
    ({"save": ""}, "save .* an empty path names nothing"),
])
def test_the_python_api_refuses_what_the_command_line_refuses(values, says):
    """RunConfig(...) checks each value at construction, naming the setting, its flag and its
    range, before anything is read or written."""
    with pytest.raises(UserError, match=says):
        RunConfig(**values)


def test_an_enormous_model_is_refused_before_it_is_built():
    """architecture.parameter_count (checked against every Table 2 model in test_densenet.py)."""
    with pytest.raises(ValueError, match="this DenseNet would have 63,372,551,010 parameters .* at most "
                                         "1,000,000,000 are built"):
        architecture.check_config(190, 2000, True, 0.5)
    architecture.check_config(190, 40, True, 0.5)  # the paper's largest


def test_a_schedule_too_short_for_two_drops_says_so():
    assert RunConfig(epochs=2).schedule_notice() == (
        "notice: --epochs 2 is too short to keep the step schedule's two learning-rate drops "
        "apart: both fall before epoch 2, which trains at 0.001, right after 0.1")
    assert RunConfig(epochs=1, lr=0.05).schedule_notice().endswith("before epoch 1, which trains at 0.0005, not 0.05")
    assert RunConfig(epochs=3).schedule_notice() == RunConfig(epochs=300).schedule_notice() == ""
    assert RunConfig(epochs=2, schedule="cosine").schedule_notice() == ""


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    cfg = RunConfig(epochs=300)
    assert [cfg.learning_rate(e) for e in (0, 149, 150, 224, 225, 299)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    short = RunConfig(epochs=4, lr=0.5)
    assert [short.learning_rate(e) for e in range(4)] == pytest.approx([0.5, 0.5, 0.05, 0.005])


def test_cosine_schedule_anneals_from_lr_to_zero():
    cfg = RunConfig(schedule="cosine", epochs=10, lr=0.2)
    rates = [cfg.learning_rate(e) for e in range(10)]
    assert rates[0] == pytest.approx(0.2) and rates[5] == pytest.approx(0.1)
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0.1 * (1 - 0.951056), rel=1e-4)
    assert cfg.learning_rate(10) == pytest.approx(0.0, abs=1e-12)


def test_numpys_numbers_are_taken_as_pythons():
    import numpy as np
    cfg = RunConfig(lr=np.float64(0.05), seed=np.int64(3), depth=np.int32(40), bottleneck=False, compression=1)
    assert (cfg.lr, cfg.seed, cfg.depth) == (0.05, 3, 40) and type(cfg.seed) is int and type(cfg.lr) is float
    assert cfg == RunConfig(lr=0.05, seed=3, depth=40, bottleneck=False, compression=1)


def test_compile_true_is_kernels_compile():
    assert RunConfig(compile=True).kernels == "compile" and RunConfig(kernels="compile").compile


@pytest.mark.parametrize("argv, says", [
    (["--opt", "rmsprop", "--momentum", "0.9"], "--momentum 0.9 does nothing here (--opt rmsprop takes no momentum)"),
    (["--svhn-extra"], "--svhn-extra does nothing here (cifar10 has no extra images)"),
    (["--dataset", "cifar100", "--no-svhn-extra"], "--no-svhn-extra does nothing here (cifar100 has no extra images)"),
    (["--compile", "--kernels", "aten"], "--compile (compile=True) is --kernels compile, not --kernels aten: give one"),
    (["--resume", "--auto-resume"], "--resume and --auto-resume: give one (--auto-resume starts the run where there is none)")])
def test_a_flag_given_where_it_does_nothing_is_refused_even_at_its_default(argv, says):
    """A flag that would do nothing is refused, never silently dropped, and never names a
    folder; where it counts it is taken."""
    with pytest.raises(UserError) as refused:
        config_of(*argv)
    assert str(refused.value) in (f"{says}; drop it", says)
    assert config_of("--opt", "sgd", "--momentum", "0.9")[0].momentum == 0.9


def test_a_saved_run_whose_setting_did_nothing_reads_as_its_default():
    """A run an earlier version started with Adam and --momentum 0.5 (which did nothing) is
    read with the default momentum: one row, one folder name, with Adam's other runs."""
    saved = {**RunConfig(opt="adam").to_dict(), "momentum": 0.5}
    assert RunConfig.from_dict(saved, "config.json") == RunConfig(opt="adam")



def test_a_default_folder_name_too_long_for_a_file_system_ends_with_a_hash_of_it():
    """Settings with many digits (a rate of 1e-37 written out) would make a name no file system
    takes: it is cut, and a hash of the whole keeps runs that differ apart."""
    long = dict(lr=1.2345678901234567e-37, weight_decay=1.2345678901234567e-37, momentum=0.12345678901234567,
                dropout=0.12345678901234567, epochs=123456)
    names = [RunConfig(**long, seed=seed).save.removeprefix("work/") for seed in (1, 2)]
    assert all(len(name.encode()) == run_config.NAME_BYTES for name in names)
    assert names[0][:-12] == names[1][:-12] and names[0] != names[1]
    assert names[0].startswith("cifar10-densenet-bc-100-12-dropout0.12345678901234566-lr0.0000000")


def test_stop_after_the_last_epoch_does_nothing_and_is_refused():
    with pytest.raises(UserError, match=r"--stop-after 5 does nothing here \(the run ends after its 1 epoch\(s\) anyway\)"):
        config_of("--epochs", "1", "--stop-after", "5")
    assert config_of("--epochs", "3", "--stop-after", "2")[0].stop_after == 2
    assert config_of("--resume", "--stop-after", "400")[0].stop_after == 400  # the run's --epochs may be longer
