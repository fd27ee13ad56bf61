"""A run's work directory: what a start or a resume will do there, and the files the run keeps.

``plan_run`` decides, reading only, whether ``--save DIR`` starts a run or continues the one
there, and refuses what could not continue exactly: a folder holding a run (without --resume),
a flag changing the numbers, an --epochs that would shorten the run or raise its rate
(``check_schedule``), CSVs or config.json unlike the checkpoint; leaving every file as it was.

``RunFiles`` owns the files once the run begins: config.json (the configuration, what was
built, a ``resumes`` entry per resume), a CSV per split with a row per epoch, checkpoint.pt
after every epoch (or a stop mid-epoch) and best.pt at the epoch of lowest validation error.
"""
from __future__ import annotations

import json
import shlex
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import NUMBER_NEUTRAL, RESUMABLE, RunConfig, flag_name
from densenet_trainer.results.layout import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    EVAL_COLUMNS,
    LAST_CHECKPOINT,
    RUN_FILES,
    TOP5_COLUMNS,
    TRAIN_COLUMNS,
    csv_name,
    seal,
)
from densenet_trainer.run.checkpoint import BestEpochs, Checkpoint
from densenet_trainer.run.files import (
    CsvLog,
    RunError,
    WorkDirLock,
    holds_run,
    remove_stale_temporaries,
    run_files_in,
    save_checkpoint,
    write_errors,
    write_json,
)
from densenet_trainer.whole_files import refuse_unless_file, refuse_unless_regular


@dataclass
class Plan:
    """What this start or resume will do in ``save``, decided before any file is written."""
    save: Path
    config: RunConfig
    checkpoint: Checkpoint | None = None  # the checkpoint to continue from
    changes: dict = field(default_factory=dict)  # flags that differ at this resume
    config_json: dict | None = None  # config.json as found, to append this resume to
    note: str = ""  # a line to print about the schedule
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # kept in every file of the run
    continued_by: str = ""  # what made this a resume: --resume, --auto-resume, a job's restart
    copied_from: str | None = None  # a copy's continuation: the identity of the run it copies

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None or self.config_json is not None

    @property
    def start_epoch(self) -> int:
        return self.checkpoint.epoch if self.checkpoint else 0

    @property
    def progress(self) -> dict:
        """The sums of the epoch a checkpoint was saved in the middle of (empty: none)."""
        return self.checkpoint.state["progress"] if self.checkpoint else {}

    @property
    def trained_on(self) -> int | None:
        """The processes the run's last session trained on (None: not recorded)."""
        sessions = [self.config_json or {}, *(self.config_json or {}).get("resumes", [])]
        recorded = [session.get("environment", {}).get("world_size") for session in sessions
                    if isinstance(session, dict) and isinstance(session.get("environment"), dict)]
        return recorded[-1] if recorded and isinstance(recorded[-1], int) else None

    @property
    def best(self) -> BestEpochs:
        return BestEpochs.from_state(self.checkpoint.state["best"]) if self.checkpoint else BestEpochs()


def already_holds_a_run(save: Path) -> UserError:
    """The refusal of a start in ``save``: a run to continue, or files a run writes but no run."""
    if not any((save / name).exists() for name in (CONFIG_FILE, LAST_CHECKPOINT)):
        return UserError(f"{save} holds files a run writes ({', '.join(run_files_in(save))}) but no "
                         f"run; move them, or choose another --save DIR")
    return UserError(f"{save} already holds a run; continue it with --resume --save "
                     f"{shlex.quote(str(save))} or start a new one with another --save DIR")


def is_a_copy(save: Path, recorded: Path, run_id: str) -> bool:
    """Whether the run in ``save`` is a copy of the one still in ``recorded`` (the folder it
    was started in), which holds the same ``run_id``: continued, the copy diverges, and the
    tables must count both."""
    try:
        if recorded.resolve() == save.resolve() or not (recorded / CONFIG_FILE).is_file():
            return False
        return json.loads((recorded / CONFIG_FILE).read_text()).get("run_id") == run_id
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def plan_run(cfg: RunConfig, given: frozenset[str], reschedule: bool, jobs: dict | None = None) -> Plan:
    """Decide what to do in ``cfg.save``; ``given``: the flags on the command line; ``jobs``:
    the launchers' jobs the processes run in (Runtime.jobs), to know a restart of one that
    worked on the run there.

    Reads only: a refused start or resume leaves every file as it was. A run's file that is a
    link (into another run, say) or not a regular file is refused before anything is read.
    """
    save = Path(cfg.save)
    for name in RUN_FILES:
        refuse_unless_regular(save / name)
    continued_by = "--resume"
    if not cfg.resume:
        if not holds_run(save):
            return Plan(save, cfg)
        continued_by = "--auto-resume" if cfg.auto_resume else restarted_job(save, jobs or {})
        if not continued_by:
            raise already_holds_a_run(save)
        cfg = replace(cfg, resume=True)
    checkpoint = Checkpoint.load(save / LAST_CHECKPOINT) if (save / LAST_CHECKPOINT).exists() else None
    config_json = read_config_json(save, checkpoint is not None)
    if checkpoint is not None:
        saved = checkpoint.config
    elif config_json is None:
        raise UserError(f"{save} holds no run to resume (no checkpoint.pt or config.json); "
                        + (elsewhere if (elsewhere := runs_like(cfg, given)) else
                           "move the files a run writes out of it" if holds_run(save) else
                           "start a new run without --resume"))
    else:
        saved = RunConfig.from_dict(config_json["config"], str(save / CONFIG_FILE))
        if max(run_logs(save, saved)["train"].epochs(), default=0) > 1:
            # rows are appended before each checkpoint, so only epoch 1 can be logged without one
            raise UserError(f"{save} has epochs logged in train.csv but no checkpoint.pt to "
                            f"continue from; put the checkpoint back, or start a new run with "
                            f"another --save")
        # else: stopped before its first checkpoint: start over with its flags (epoch 1 again)
    resumed, changes = resumed_config(saved, cfg, given, save, continued_by)
    plan = Plan(save, resumed, checkpoint, changes, config_json, continued_by=continued_by)
    known = (config_json or {}).get("run_id") or (checkpoint.state.get("run_id") if checkpoint else None)
    if known:  # a run from before run identities gets one now
        plan.run_id = known
        if is_a_copy(save, Path(saved.save), known):  # its own run from here on
            plan.copied_from, plan.run_id = known, uuid.uuid4().hex
            plan.continued_by += f"; a copy of {saved.save}, from here a run of its own"
    partial = bool(checkpoint and checkpoint.state["progress"]["step"])
    plan.note = check_schedule(saved, resumed, plan.start_epoch, partial, reschedule, save)
    if plan.note:
        changes["schedule"] = plan.note
    for log in run_logs(save, resumed).values():
        log.check_resumable(plan.start_epoch)
    return plan


def restarted_job(save: Path, jobs: dict) -> str:
    """Why the processes continue the run in ``save`` without --resume, where they are a
    restart of a job that worked on that run: a launcher's restart count above zero under a
    job that config.json recorded at the run's start or a resume (SLURM: its job id;
    torchrun: its rendezvous id and one of its agents, since a later launch may reuse the
    id); '' where they are not."""
    restarted = {launcher: job for launcher, job in jobs.items() if job["restart"] > 0}
    record = read_config_json(save, (save / LAST_CHECKPOINT).exists()) if restarted else None
    if not record:
        return ""
    sessions = [session for session in [record, *record.get("resumes", [])] if isinstance(session, dict)]
    for launcher, job in restarted.items():
        for session in sessions:
            recorded = session.get("jobs", {}).get(launcher) if isinstance(session.get("jobs"), dict) else None
            if (isinstance(recorded, dict) and recorded.get("id") == job["id"]
                    and (launcher != "torchrun" or set(recorded.get("agents") or []) & set(job["agents"]))):
                return f"restart {job['restart']} of {launcher} job {job['id']}, which worked on this run"
    return ""


def runs_like(cfg: RunConfig, given: frozenset[str]) -> str:
    """Advice for a --resume without --save that finds no run in the default folder: the
    folders beside it holding a run of the same settings but --epochs (one extended with
    another --epochs, or kept under the older default name work/<dataset>-<model>), as
    commands to resume them ('' when none is). Folders that cannot be read are passed over."""
    default = Path(cfg.save)
    if "save" in given or not default.parent.is_dir():
        return ""
    same = [name for name in RunConfig.__dataclass_fields__ if name not in NUMBER_NEUTRAL | {"epochs"}]
    found = []
    for folder in sorted(default.parent.iterdir()):
        if folder == default or not folder.is_dir() or not holds_run(folder):
            continue
        try:
            record = read_config_json(folder, has_checkpoint=True)
            saved = RunConfig.from_dict(record["config"], str(folder / CONFIG_FILE)) if record else None
        except UserError:
            continue
        if saved and all(getattr(saved, name) == getattr(cfg, name) for name in same):
            found.append(f"--resume --save {shlex.quote(str(folder))}")
    return f"a run of these settings is elsewhere: {'; or '.join(found)}" if found else ""


def resumed_config(saved: RunConfig, cfg: RunConfig, given: frozenset[str],
                   save: Path, continued_by: str = "--resume") -> tuple[RunConfig, dict]:
    """The saved run's configuration, with the ``given`` flags of ``cfg`` that differ from it
    and that a resume may change (RESUMABLE); returns it and those changes. A given flag
    that would change the run's numbers is refused, naming what continued the run."""
    changes = {name: getattr(cfg, name) for name in sorted(given)
               if getattr(cfg, name) != getattr(saved, name)}
    fixed = {name: value for name, value in changes.items() if name not in RESUMABLE}
    if fixed:
        described = ", ".join(f"--{flag_name(name)} {value} (the run has {getattr(saved, name)})"
                              for name, value in fixed.items())
        raise UserError(f"{continued_by}: {described} would change the run in {save}; "
                        f"drop these flags or start a new run with --save")
    return replace(saved, **changes), changes


def check_schedule(saved: RunConfig, cfg: RunConfig, start_epoch: int, partial: bool,
                   reschedule: bool, save: Path) -> str:
    """Refuse an --epochs on resume that would shorten the run or raise its learning rate.

    The run continues in 0-based ``start_epoch`` (``partial``: some of its steps are done).
    A new length whose schedule gives every epoch trained so far the learning rate it had is
    exact, as if the run had started with it. Any other length is a new schedule from here
    on: accepted where the next learning rate is no higher than the last one trained (say,
    more epochs at the final rate of a finished run), refused where it would jump back up
    unless ``reschedule``. Returns what changed, to print and record ('' when exact).
    """
    epochs, planned = cfg.epochs, saved.epochs
    trained = start_epoch + partial
    if epochs < planned and epochs <= trained:
        raise UserError(f"--epochs {epochs}: the run in {save} has trained {trained} of its "
                        f"{planned} epochs and cannot be shortened to {epochs}; resume without "
                        f"--epochs to finish it, or pass a larger --epochs")
    had = [saved.learning_rate(epoch) for epoch in range(trained)]
    if epochs == planned or had == [cfg.learning_rate(epoch) for epoch in range(trained)]:
        return ""
    following = cfg.learning_rate(start_epoch)
    change = (f"the {trained} epoch(s) trained followed the schedule of --epochs {planned}, the "
              f"last at lr {had[-1]:.3g}; under --epochs {epochs}, epoch {start_epoch + 1} trains "
              f"at lr {following:.3g}")
    if following > had[-1] and not reschedule:
        raise UserError(f"--epochs {epochs} would raise the learning rate: {change}; add "
                        f"--reschedule to accept that, or resume without --epochs")
    return change


def read_config_json(save: Path, has_checkpoint: bool) -> dict | None:
    """config.json of a run (None when absent); a damaged one is refused."""
    path = save / CONFIG_FILE
    refuse_unless_file(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        content = None
    if (not isinstance(content, dict) or not isinstance(content.get("config"), dict)
            or not isinstance(content.get("resumes", []), list)
            or not isinstance(content.get("run_id", ""), str)):
        fix = ("move it away and resume again (checkpoint.pt holds the run's flags; a new "
               "config.json is written)" if has_checkpoint else
               "there is no checkpoint either: start a new run with another --save")
        raise RunError(f"{path} is damaged; {fix}")
    return content


def run_logs(save: Path, cfg: RunConfig) -> dict[str, CsvLog]:
    """The run's CSV files; with many classes each also has a top5_error column (except in a
    run logged before there was one, which keeps its columns)."""
    logs = {}
    for split in ["train", "test"] + (["val"] if cfg.val_size else []):
        path, columns = save / csv_name(split), TRAIN_COLUMNS if split == "train" else EVAL_COLUMNS
        try:
            with open(path) as f:
                earlier = f.readline().rstrip("\n") == ",".join(columns)
        except (OSError, UnicodeDecodeError):
            earlier = False
        logs[split] = CsvLog(path, columns if earlier or not cfg.top5 else columns + TOP5_COLUMNS)
    return logs


class RunFiles:
    """The files of a run that has begun; on processes other than the main one, no file."""

    def __init__(self, plan: Plan, writes: bool = True) -> None:
        self.plan, self.save, self.writes = plan, plan.save, writes
        self.logs = run_logs(plan.save, plan.config)

    def claim(self, lock: WorkDirLock) -> None:
        """Lock the folder where planning did not (a new one, made now); refuse a run begun there since."""
        if not lock.held:
            lock.acquire()
            if not self.plan.resuming and holds_run(self.save):
                raise already_holds_a_run(self.save)

    def open(self, lock: WorkDirLock, record: dict) -> None:
        """Write config.json and the CSV headers, or on resume the resume's entry and the CSVs
        trimmed to the checkpoint; once every check has passed (``claim`` too)."""
        plan = self.plan
        self.claim(lock)
        if plan.config.val_size:
            record = {**record, "best_checkpoint": {"file": BEST_CHECKPOINT,
                                                    "chosen_by": "lowest validation error"}}
        with write_errors("choose another work directory with --save"):
            remove_stale_temporaries(self.save)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if plan.config_json is not None:
                content = plan.config_json
                content.setdefault("resumes", []).append(
                    {"time": stamp, "from_epoch": plan.start_epoch, "changes": plan.changes,
                     "continued_by": plan.continued_by, **record})
                content["config"] = plan.config.to_dict()
                content.setdefault("run_id", plan.run_id)
                if plan.copied_from:
                    content["run_id"] = plan.run_id
                    content["copied_from"] = [*content.get("copied_from", []), plan.copied_from]
            else:
                content = {"config": plan.config.to_dict(), "run_id": plan.run_id, "started": stamp,
                           **record}
            write_json(self.save / CONFIG_FILE, seal(content))
            self.content = content
            for log in self.logs.values():
                log.keep_epochs_up_to(plan.start_epoch) if plan.resuming else log.create()

    def update_record(self, key: str, value) -> None:
        """Set ``key`` of what config.json records of this run (or of this resume), where it
        changed since: how the steps run is known only once they have."""
        if not self.writes:
            return
        entry = self.content["resumes"][-1] if self.plan.config_json is not None else self.content
        if entry.get(key) != value:
            entry[key] = value
            with self._writing():
                write_json(self.save / CONFIG_FILE, self.content)

    def append(self, epoch: int, rows: dict[str, dict]) -> None:
        """One row per split for 1-based ``epoch``, fsynced."""
        if self.writes:
            with self._writing():
                for split, row in rows.items():
                    self.logs[split].append({"epoch": epoch, **row})

    def save_checkpoint(self, state: dict, best: bool = False) -> None:
        """Replace checkpoint.pt (or best.pt) with ``state``, atomically, marked with the run's
        identity."""
        if self.writes:
            with self._writing():
                save_checkpoint(self.save / (BEST_CHECKPOINT if best else LAST_CHECKPOINT),
                                {**state, "run_id": self.plan.run_id})

    def _writing(self):
        """Failed writes end the run in one line that says how to go on from what is saved."""
        if (self.save / LAST_CHECKPOINT).exists():
            return write_errors(f"free space (or fix permissions), then continue from the last "
                                f"checkpoint with --resume --save {shlex.quote(str(self.save))}")
        return write_errors("nothing was saved yet: free space (or fix permissions) and start again")
