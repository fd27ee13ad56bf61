#!/usr/bin/env python3
"""Classify your own images with a trained checkpoint: the most likely classes, with probabilities.

Each PNG or JPEG file, of any size, is converted to RGB, cropped to its central square (CIFAR
and SVHN images are square, so nothing is stretched) and resized to 32x32 with antialiasing,
then normalised with the run's own training statistics and classified by the checkpoint's
model in evaluation mode. Class names come from the run's config.json.

  attic/predict.py work/cifar10-densenet-bc-100-12 cat.jpg dog.png
  attic/predict.py work/cifar10-densenet-bc-100-12/checkpoint.pt photos/*.jpg --top 3
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from densenet_trainer.config import cli
from densenet_trainer.results.layout import CONFIG_FILE
from densenet_trainer.run.checkpoint import INFERENCE_KEYS, Checkpoint
from densenet_trainer.run.inference import load_trained
from densenet_trainer.whole_files import NotARegularFile, refuse_unless_file

SIZE = 32  # what the networks of this project see
MAX_PIXELS = 50_000_000  # a 50-megapixel photo decodes in about 150 MB; more is refused unread


def as_seen(image):
    """The image as a person sees it, in 8-bit RGB: turned as its EXIF orientation says (a
    phone's photo), and 16-bit greyscale scaled to 8 bits rather than clipped at 255."""
    from PIL import Image, ImageOps
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit samples
        eight_bit = np.clip(np.round(np.asarray(image, dtype=np.float64) / 257), 0, 255)
        image = Image.fromarray(eight_bit.astype(np.uint8), "L")
    return image.convert("RGB")


def read_image(path: Path) -> torch.Tensor:
    """A uint8 (3, 32, 32) tensor: the central square of the image, resized."""
    from PIL import Image, UnidentifiedImageError
    Image.MAX_IMAGE_PIXELS = None  # MAX_PIXELS below is the limit, checked before decoding
    refuse_unless_file(path)
    try:
        with Image.open(path) as image:  # reads the header only
            if image.width * image.height > MAX_PIXELS:
                raise cli.UserError(f"{path} is {image.width}x{image.height} pixels, more than "
                                    f"the {MAX_PIXELS // 1_000_000} megapixels this reads; "
                                    f"shrink it first")
            image = as_seen(image)
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=None)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise cli.UserError(f"{path} is not a readable PNG or JPEG image ({error}); "
                            f"check the file") from None
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(SIZE, SIZE, 3).permute(2, 0, 1).contiguous()


def class_names(checkpoint: Path, count: int) -> list[str]:
    """The run's class names from config.json beside the checkpoint, or the class numbers."""
    try:
        refuse_unless_file(checkpoint.parent / CONFIG_FILE)
        names = json.loads((checkpoint.parent / CONFIG_FILE).read_text()).get("classes")
    except (OSError, ValueError, AttributeError, NotARegularFile):
        names = None
    if isinstance(names, list) and len(names) == count:
        return [str(name) for name in names]
    return [str(c) for c in range(count)]


@cli.one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = cli.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=cli.path, help="a checkpoint written by train.py, or its run's directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", type=cli.path, help="PNG or JPEG files")
    p.add_argument("--top", type=cli.positive_int, default=5, help="classes shown per image")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the model")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise cli.UserError("--device cuda: no CUDA GPU is visible; use --device cpu")
    checkpoint = Checkpoint.load(Path(args.checkpoint), INFERENCE_KEYS)
    images = torch.stack([read_image(Path(image)) for image in args.images])
    trained = load_trained(checkpoint, torch.device(args.device))
    with torch.inference_mode():
        probabilities = trained.model(trained.inputs(images)).float().softmax(1).cpu()
    names = class_names(checkpoint.path, trained.config.num_classes)
    top = min(args.top, len(names))
    for image, row in zip(args.images, probabilities):
        values, classes = row.topk(top)
        print(f"{image}: " + ", ".join(f"{names[c]} {100 * v:.1f}%" for v, c in zip(values.tolist(),
                                                                                  classes.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
