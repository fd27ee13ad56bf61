#!/usr/bin/env python3
"""A DenseNet, layer by layer: output shape, parameters and FLOPs, with totals and a picture.

Takes train.py's model flags. FLOPs count the multiply-adds of convolutions and the
classifier twice (one multiply, one add) for one 32x32 image in a forward pass; a training
step costs about three times that. The picture shows the channels entering each dense layer
(their growth by k per layer within a block), the blocks with their resolutions, and the
compression at each transition.

  attic/summary.py                                  # DenseNet-BC-100-12
  attic/summary.py --depth 40 --no-bottleneck --compression 1 --image work/d40.png
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from densenet import DenseBlock, DenseLayer, DenseNet, Transition
from densenet_trainer.config import cli, run_config
from densenet_trainer.config.run_config import RunConfig
from densenet_trainer.whole_files import write_figure


def rows_of(model: DenseNet, num_classes: int) -> list[dict]:
    """One row per stem, dense layer, transition, final norm and classifier."""
    units = [(name, module) for name, module in model.named_modules()
             if isinstance(module, (DenseLayer, Transition)) or name in ("stem", "norm", "classifier")]
    macs: dict[nn.Module, int] = {}
    shapes: dict[nn.Module, tuple] = {}
    inputs: dict[nn.Module, int] = {}

    def count(module, args, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs[module] = output.numel() * module.in_channels * kh * kw // module.groups
        else:
            macs[module] = module.in_features * module.out_features

    def record(module, args, output):
        shapes[module] = tuple(output.shape[1:])
        first = args[0]
        inputs[module] = sum(f.shape[1] for f in first) if isinstance(first, list) else first.shape[1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks += [m.register_forward_hook(record) for _, m in units]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return [{"name": name, "kind": type(module).__name__, "in_channels": inputs[module],
             "shape": shapes[module], "parameters": sum(p.numel() for p in module.parameters()),
             "flops": 2 * sum(macs.get(m, 0) for m in module.modules())} for name, module in units]


def table(rows: list[dict]) -> str:
    lines = [f"{'layer':28} {'type':11} {'in':>5} {'output shape':>15} {'parameters':>11} {'MFLOPs':>8}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['name']:28} {r['kind']:11} {r['in_channels']:>5} {shape:>15} "
                     f"{r['parameters']:>11,} {r['flops'] / 1e6:>8.2f}")
    return "\n".join(lines)


def draw(rows: list[dict], model: DenseNet, path: Path) -> None:
    """Channels entering each dense layer, block by block, with the transitions between."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colours = ["#0072B2", "#E69F00", "#009E73"]
    position = 0
    ticks: list[tuple[float, str]] = []  # block centres and transitions, labelled as what they are
    blocks = [m for m in model.features if isinstance(m, DenseBlock)]
    for index, block in enumerate(blocks):
        names = {f"features.{list(model.features).index(block)}.layers.{i}" for i in range(len(block.layers))}
        layer_rows = [r for r in rows if r["name"] in names]
        xs = range(position, position + len(layer_rows))
        ax.bar(xs, [r["in_channels"] for r in layer_rows], width=1.0, color=colours[index % 3],
               label=f"block {index + 1}: {layer_rows[0]['shape'][1]}x{layer_rows[0]['shape'][2]}, "
                     f"{len(layer_rows)} layers")
        ticks.append((position + (len(layer_rows) - 1) / 2,
                      f"block {index + 1}\nlayers 1-{len(layer_rows)}"))
        position += len(layer_rows)
        if index < len(blocks) - 1:
            transition = next(r for r in rows if r["kind"] == "Transition"
                              and r["name"] > layer_rows[-1]["name"].rsplit(".layers", 1)[0])
            ax.bar(position + 0.5, transition["shape"][0], width=2.0, color="0.6", hatch="//",
                   label="transition (compression)" if index == 0 else None)
            ax.annotate(f"{transition['in_channels']}→{transition['shape'][0]}",
                        (position + 0.5, transition["in_channels"]), ha="center", fontsize=8)
            ticks.append((position + 0.5, f"T{index + 1}"))
            position += 2
    ax.set_xticks([x for x, _ in ticks], [label for _, label in ticks], fontsize=8)
    ax.set_xlabel("dense layers of each block, in order, and the transitions (T) between blocks")
    ax.set_ylabel("input channels")
    total = sum(p.numel() for p in model.parameters())
    ax.set_title(f"{model.name}: {total:,} parameters, "
                 f"{sum(r['flops'] for r in rows) / 1e9:.3f} GFLOPs per image (forward)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_figure(fig, path, 120)
    except OSError as error:
        raise cli.UserError(f"cannot write {path} ({error.strerror or error}); choose another "
                            f"--image") from None
    finally:
        plt.close(fig)


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    run_config.add_flags(p, ["depth", "growth_rate", "bottleneck", "compression"])
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs")
    p.add_argument("--image", default=None, type=cli.path, help="picture file, .png, .pdf or .svg "
                                                 "(default work/summary/<model>.png)")
    args = p.parse_args(argv)
    cfg, _ = RunConfig.from_flags(args)
    if args.image and Path(args.image).suffix.lstrip(".").lower() not in cli.FIGURE_FORMATS:
        p.error(f"--image {args.image}: the name must end in .png, .pdf or .svg")
    try:
        model = DenseNet(cfg.depth, cfg.growth_rate, bottleneck=cfg.bottleneck, compression=cfg.compression,
                         num_classes=args.num_classes)
    except ValueError as error:
        p.error(str(error))
    rows = rows_of(model, args.num_classes)
    print(table(rows))
    total_parameters = sum(r["parameters"] for r in rows)
    total_flops = sum(r["flops"] for r in rows)
    print(f"total: {total_parameters:,} parameters, {total_flops / 1e9:.4f} GFLOPs per 32x32 image "
          f"forward (about {3 * total_flops / 1e9:.2f} GFLOPs per image for a training step)")
    image = Path(args.image or f"work/summary/{model.name}.png")
    draw(rows, model, image)
    print(f"wrote {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
