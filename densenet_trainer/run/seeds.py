"""Several runs of one configuration, a run per seed, in one process (train.py --seeds): the
seed's own folders, and on a GPU whether the runs fit in its memory together."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from densenet_trainer.config.cli import UserError
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.run import workdir
from densenet_trainer.run.build import Run, RunData, build_synthetic_run, load_data
from densenet_trainer.runtime import Runtime


def seed_configs(cfg: RunConfig, given: frozenset[str], seeds: list[int] | None, runtime: Runtime) -> list[RunConfig]:
    """--seeds: ``cfg`` with each seed, in the folder --seed alone would give it (the default,
    or --save with {seed} replaced by the seed); with --resume, a seed without a run starts.
    Without --seeds (None), ``cfg`` alone, its --save's {seed} replaced by its own seed."""
    if seeds is None:
        return [replace(cfg, save=cfg.save.replace("{seed}", str(cfg.seed)))]
    if runtime.world_size > 1:
        raise UserError("--seeds trains several runs in one process; under torchrun give each "
                        "seed its own job (--seed N)")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))} names a seed twice: give each once")
    if "save" in given and len(seeds) > 1 and "{seed}" not in cfg.save:
        raise UserError(f"--save {cfg.save} is one folder, and --seeds makes a run per seed: put "
                        f"{{seed}} in it (--save 'runs/bc100-seed{{seed}}'), or drop it for the default folders")
    configs = [replace(cfg, seed=seed, save=cfg.save.replace("{seed}", str(seed)) if "save" in given else None)
               for seed in seeds]
    folders = [Path(c.save).resolve() for c in configs]
    if len(set(folders)) < len(folders):
        raise UserError(f"--save {cfg.save} gives two seeds one folder ({max(folders, key=folders.count)}): "
                        f"give each seed its own")
    return [replace(c, resume=False) if c.resume and not workdir.holds_run(Path(c.save)) else c
            for c in configs]


def shared_images(cfg: RunConfig, runtime: Runtime, read: dict[tuple, RunData]) -> RunData:
    """The images of ``cfg``'s run, read once for every run of the group that has the same
    (``read`` keeps them by what decides them; the seed does only where it draws a validation
    set), and on a GPU copied to it once: every run's batches and evaluations use that copy."""
    key = (cfg.dataset, cfg.data_dir, cfg.download, cfg.svhn_extra, cfg.train_subset,
           cfg.test_subset, cfg.val_size, cfg.seed if cfg.val_size else None)
    if key not in read:
        data = load_data(cfg, runtime.log)
        read[key] = replace(data, **{split: getattr(data, split).to(runtime.device)
                                     for split in ("train", "val", "test") if getattr(data, split) is not None})
    return read[key]


def refuse_unless_fit(run: Run, runs: int) -> None:
    """On a GPU: refuse --seeds where ``runs`` runs like ``run`` would not fit in its memory
    together (one run's need measured on a synthetic step of its own: peak_memory)."""
    need = peak_memory(run)
    fit = runs_that_fit(run.runtime.device, need)
    if fit < runs:
        raise UserError(f"--seeds: {runs} runs need about {runs * need / 2**30:.1f} GiB of GPU "
                        f"memory together ({need / 2**30:.2f} GiB each) and {fit} fit: give at most "
                        f"{fit} seeds at once")


def peak_memory(like: Run) -> int:
    """Bytes of GPU memory a run like ``like`` needs at its peak: measured on a synthetic run
    of its own (model, optimiser, a step's activations, its CUDA graph; ``like``'s kernels),
    built and stepped after its warm-up, then freed."""
    runtime = like.runtime
    torch.cuda.synchronize(runtime.device)
    before = torch.cuda.memory_allocated(runtime.device)
    torch.cuda.reset_peak_memory_stats(runtime.device)
    run = build_synthetic_run(like.config, runtime, 1, log=lambda *_, **__: None, self_test=False,
                              kernel_choice=like.kernel_choice)
    run.run_step()
    torch.cuda.synchronize(runtime.device)
    need = torch.cuda.max_memory_allocated(runtime.device) - before
    del run
    torch.cuda.empty_cache()
    return need


def runs_that_fit(device: torch.device, one_run_bytes: int) -> int:
    """How many runs of ``one_run_bytes`` each (the peak of one run's set-up and first steps,
    measured) the GPU's memory holds at once: the one measured, and as many more as the
    memory free now (in the device and in the caching allocator's reserve) takes."""
    free, _ = torch.cuda.mem_get_info(device)
    reserve = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return 1 + int((free + reserve) // max(one_run_bytes, 1))
