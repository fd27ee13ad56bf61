#!/usr/bin/env python3
"""Per-channel mean and standard deviation of a dataset's training images.

These are the figures train.py normalises with: both call datasets.channel_stats on the same
images (0-1 scale, population standard deviation over every pixel of the training set). For
the full CIFAR-10 training set they are mean 0.4914, 0.4822, 0.4465 and std 0.2470, 0.2435,
0.2616.

  attic/dataset_stats.py --data-dir ../shared/data
  attic/dataset_stats.py --dataset cifar100 --json
"""
from __future__ import annotations

import json
import sys

from densenet_trainer.config import cli, run_config
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.data import datasets

OFFICIAL = {"cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])}


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    run_config.add_flags(p, ["dataset", "data_dir", "download"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    cfg, _ = RunConfig.from_flags(args)
    dataset = datasets.load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    mean, std = datasets.channel_stats(dataset.train.images)
    if args.json:
        print(json.dumps({"dataset": cfg.dataset, "images": len(dataset.train), "mean": mean, "std": std}))
        return 0
    print(f"{cfg.dataset}: {len(dataset.train)} training images")
    print("channel  mean    std")
    for name, m, s in zip("RGB", mean, std):
        print(f"{name}        {m:.4f}  {s:.4f}")
    if cfg.dataset in OFFICIAL:
        ref_mean, ref_std = OFFICIAL[cfg.dataset]
        print(f"full training set: mean {', '.join(f'{v:.4f}' for v in ref_mean)}; "
              f"std {', '.join(f'{v:.4f}' for v in ref_std)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
