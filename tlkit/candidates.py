"""What the recipe search tries, derived from the data and the bases rather than written for CIFAR-10.

Image sizes come from the images' own size (their median side) and each base's range (its
minimum input, the size its ImageNet weights were trained at): a base sees more of a small image
upscaled (CIFAR-10's 32 px: 32 -> 128 px for VGG16, 71 -> 128 px for Xception), while a folder of
224-px photos is screened from half its size up to the trained size. Preprocessing is the base's
own and, where the base does not scale pixels itself, the seed's [0, 1] at the smallest size.
Heads, flips and fine-tuning depths are the same levers on every base; a depth is 'top1', 'top2'
(models.DEPTH), which every base resolves to its own blocks. Every candidate is checked against
its base (spec.validate) before the search starts.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from tlkit import models
from tlkit import spec as specs

SIZE_SPAN = 4  # the largest candidate size: up to 4x the images' median side (never past the trained size)
SIZE_STEPS = 3  # sizes per base, geometric from the smallest to the largest
SIZE_ROUNDING = 16  # the sizes between the ends are multiples of this
MEDIAN_SAMPLE = 200  # image files whose size is read to take the median side

# Head levers, screened on every input (the first is the seed's head).
HEADS: list[dict] = [
    {},
    {"units": 1024, "dropout": 0.5},
    {"units": 1024, "dropout": 0.5, "label_smoothing": 0.1},
]
# Fine-tuning levers for the finalists, in the order the budget buys them: the top block with a
# cosine schedule, stopped on validation accuracy; as the first recipe did (constant rate, val_loss);
# then two blocks. Each names its schedule and monitor: a lever goes on top of the best so far, which
# may be fine-tuned already (the 45-minute run's second lever inherited the first's cosine and ran
# it again at 5 epochs).
FINETUNES: list[dict] = [
    {"unfreeze": "top1", "finetune_schedule": "cosine", "monitor": "val_accuracy"},
    {"unfreeze": "top1", "finetune_schedule": "constant", "monitor": "val_loss"},
    {"unfreeze": "top2", "finetune_schedule": "cosine", "monitor": "val_accuracy"},
]
FINETUNE_FIELDS = {"finetune_epochs": 6, "patience": 2}  # fine-tuning's fixed fields, as the first recipe


def median_side(data: str) -> int:
    """The images' median side (the shorter of width and height), from a sample of their files."""
    if data == "cifar10":
        return 32
    path = Path(data)
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, mmap_mode="r") as arrays:
            x = arrays["x_train"]
            return int(min(x.shape[1:3]))
    from PIL import Image

    files = sorted(p for p in (path / "train").rglob("*") if p.is_file())
    step = max(1, len(files) // MEDIAN_SAMPLE)
    sides = []
    for file in files[::step][:MEDIAN_SAMPLE]:
        try:
            with Image.open(file) as image:  # reads the header only
                sides.append(min(image.size))
        except OSError:
            continue  # not an image: loading says so, with its name
    if not sides:
        raise specs.SpecError(f"data {data}: no readable image under {path / 'train'}")
    return int(statistics.median(sides))


def image_counts(data: str) -> tuple[int, int]:
    """(training, test) images the data has, from its files' names (nothing decoded)."""
    if data == "cifar10":
        return 50000, 10000
    path = Path(data)
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path, mmap_mode="r") as arrays:
            return len(arrays["x_train"]), len(arrays["x_test"])
    return tuple(sum(1 for p in (path / split).rglob("*") if p.is_file()) for split in ("train", "test"))


def image_sizes(base: str, median: int) -> list[int]:
    """Candidate sizes for a base on images of median side `median`, smallest first."""
    info = models.BASES[base]
    largest = max(info.min_image_size, min(info.trained_size, SIZE_SPAN * median))
    smallest = max(info.min_image_size, min(median, largest // 2))
    sizes = [smallest]
    for step in range(1, SIZE_STEPS):
        size = smallest * (largest / smallest) ** (step / (SIZE_STEPS - 1))
        size = largest if step == SIZE_STEPS - 1 else int(round(size / SIZE_ROUNDING) * SIZE_ROUNDING)
        if size >= sizes[-1] * 1.2:  # sizes closer than that buy little for a pass each
            sizes.append(size)
    if sizes[-1] != largest and largest > sizes[-1]:
        sizes[-1] = largest
    return sizes


def inputs(base: str, median: int) -> list[dict]:
    """The input levers of one base: each size with the base's preprocessing; the seed's [0, 1]
    at the smallest size where the base takes it."""
    sizes = image_sizes(base, median)
    chosen = [{"base": base, "image_size": size, "preprocess": "base"} for size in sizes]
    if not models.BASES[base].scales_pixels_itself:
        chosen.insert(0, {"base": base, "image_size": sizes[0], "preprocess": "unit"})
    return chosen


def screen(bases: dict[str, str], median: int) -> list[dict]:
    """Every input of every base (base name -> weights) crossed with every head lever."""
    return [{**found, "weights": bases[found["base"]], **head}
            for base in bases for found in inputs(base, median) for head in HEADS]


def finetunes() -> list[dict]:
    return [{**FINETUNE_FIELDS, **lever} for lever in FINETUNES]


def check(candidates: list[dict], base_spec: dict) -> None:
    """Every candidate is legal for its base before anything runs (spec.validate)."""
    for candidate in candidates:
        specs.validate(specs.merge(candidate, base_spec))
