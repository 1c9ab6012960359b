"""An experiment spec: every knob of a run as plain data.

FIELDS holds every default, with the seed notebook's values (a frozen ImageNet VGG16, global
average pooling, Dense 256 relu, softmax; Adam 1e-3; 10 epochs of batch 32; early stopping on
val_loss with patience 3). A variant in experiments/NAME.toml lists only what it changes, and
command-line overrides go on top. Unknown keys and values of the wrong type fail loudly.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from tlkit import models

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"

# name: (default, help). The defaults reproduce the seed's baseline.
FIELDS: dict[str, tuple[object, str]] = {
    # data
    "data": ("cifar10", "'cifar10' (keras download), an image folder with train/ and test/, or an .npz file"),
    "classes": ("all", "comma-separated class names to keep, in this order; 'all' keeps every class"),
    "image_size": (32, "images are resized to this square size (pixels)"),
    "limit": (0, "cap on training images, stratified; 0 = all"),
    "test_limit": (0, "cap on test images, stratified; 0 = all"),
    "seed": (1995, "random seed: validation split, weight initialisation, batch order, and the limit samples "
                   "unless sample_seed is set"),
    # --repeats N trains at seed, seed+1, ...: each repeat's run keeps the first seed here, so all
    # of them train and test on the same sampled images (one dataset digest) and can be paired.
    "sample_seed": (0, "seed of the limit / test_limit samples alone; 0 = the seed"),
    # model
    "base": ("VGG16", "keras.applications base: VGG16, Xception, ResNet50, MobileNetV2, EfficientNetB0, "
                      "MobileNetV3Small"),
    "weights": ("imagenet", "'imagenet', 'none' (random), or a path to a weights file"),
    "preprocess": ("unit", "'unit' scales pixels to [0, 1] (the seed); 'base' uses the base's own preprocessing"),
    "head": ("dense", "head kind: 'dense' (pool, dense, softmax) or 'conv' (a conv block first)"),
    "conv_filters": (512, "filters of the conv head's Conv2D 3x3"),
    "units": (256, "units of the head's hidden Dense layer"),
    "l2": (0.0, "L2 factor on the hidden Dense layer's kernel; 0 = none"),
    "dropout": (0.0, "dropout rate after the hidden Dense layer, in [0, 1); 0 = none"),
    "augment": (False, "random horizontal flip and translation in training, the seed's exact way (runs the whole "
                       "network every epoch)"),
    "flip": (False, "random horizontal flips from the feature cache: the training images' mirror images get one "
                    "pass of the base, and every epoch each image is drawn as itself or mirrored (p 1/2)"),
    "tta": (False, "test-time flips: each validation and test image scored as the mean of its probabilities and its "
                   "mirror image's (cached features); the logged model does the same, so it answers what the metric says"),
    "precision": ("float32", "'float32', or 'mixed_float16' / 'mixed_bfloat16': layers compute in 16 bits, variables "
                             "and the softmax stay float32 (for GPUs; bfloat16 also runs on CPUs)"),
    "jit": (False, "compile training steps and the feature pass with XLA (jit_compile)"),
    # batch_size stays the global batch under a strategy and the learning rate stays as given, so a
    # spec trains the same steps on any number of devices (tlkit/distribute.py says why).
    "strategy": ("auto", "devices of this machine: 'auto' (MirroredStrategy over every GPU when there are 2 or "
                         "more, else one device), 'one', or 'mirrored' (every GPU, or every logical CPU); "
                         "batch_size is the global batch, split between the replicas, the learning rate unchanged"),
    "trainable_base": (False, "train the whole base from the first epoch, BatchNorm included (from scratch with "
                              "weights 'none'; runs the whole network every epoch)"),
    # optimisation
    "optimizer": ("adam", "'adam' or 'sgd'"),
    "learning_rate": (0.001, "learning rate of the head's training"),
    "momentum": (0.0, "SGD momentum"),
    "epochs": (10, "maximum epochs"),
    "batch_size": (32, "images per step (under a strategy: in all, split between the replicas)"),
    "patience": (3, "early-stopping patience on val_loss, in epochs; 0 turns early stopping off"),
    "restore_best_weights": (True, "early stopping restores the weights of the best val_loss epoch"),
    # The recipe's fine-tuning once restored epoch 2 (val 82.54%) by val_loss while epoch 4 had reached 83.74%.
    "monitor": ("val_loss", "what early stopping watches and restores the best epoch of: 'val_loss' or 'val_accuracy'"),
    "label_smoothing": (0.0, "label smoothing of the cross-entropy loss, in [0, 1); 0 = none (the seed's)"),
    # fine-tuning: a second stage after the head is trained
    "unfreeze": ("", "the base's top blocks to unfreeze after the head is trained: 'top1', 'top2', ... (the same on "
                     "every base), or a layer-name prefix (VGG16: block5); '' = none"),
    "finetune_epochs": (10, "maximum epochs of the fine-tuning stage"),
    "finetune_learning_rate": (0.0001, "learning rate of the fine-tuning stage (10x lower than the head's)"),
    "finetune_schedule": ("constant", "the fine-tuning learning rate: 'constant', or 'cosine' (decays to 0 over "
                                      "finetune_epochs)"),
}

DEFAULTS = {name: default for name, (default, _) in FIELDS.items()}

# Keras's dtype policies that `precision` names: float32, or 16-bit compute with float32 variables.
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

MONITORS = ("val_loss", "val_accuracy")
SCHEDULES = ("constant", "cosine")

# How a run uses the devices of one machine (tlkit/distribute.py).
STRATEGIES = ("auto", "one", "mirrored")

# `tlkit pretrain` (pretrain.py) as a diff from the defaults, here with the other specs as data (the
# CLI's options and MLproject's entry point read them without loading pretrain's TensorFlow): the base
# starts from random weights and trains with the top from the first epoch; augmentation, since every
# epoch runs the whole network anyway; more epochs and a more patient early stop, as a base from
# scratch learns slowly.
PRETRAIN = {"weights": "none", "trainable_base": True, "augment": True, "epochs": 30, "patience": 5}
# Spec fields that mean nothing to pretraining: the whole base always trains, there is no second stage.
NOT_PRETRAIN_OPTIONS = ("trainable_base", "unfreeze", "finetune_epochs", "finetune_learning_rate")


class SpecError(ValueError):
    """A spec or parameter that cannot run: the message names the key and what is wrong."""


def variant_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def variant_path(variant: str) -> Path:
    """A variant is a name in experiments/ or a path to a .toml file of the same form."""
    if variant.endswith(".toml"):
        path = Path(variant)
        if not path.is_file():
            raise SpecError(f"spec file {variant} does not exist")
        return path
    path = EXPERIMENTS_DIR / f"{variant}.toml"
    if not path.is_file():
        raise SpecError(f"unknown variant {variant!r}; choose one of {', '.join(variant_names())} or a .toml path")
    return path


def _read_table(variant: str) -> tuple[Path, dict]:
    path = variant_path(variant)
    try:
        return path, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"spec file {path}: {err}") from None


def read_variant(variant: str) -> tuple[dict, str]:
    """The variant file's own keys (a diff from the defaults) and its description."""
    _, table = _read_table(variant)
    description = table.pop("description", "")
    table.pop("search", None)  # what a search variant searches: variant_search
    return table, description


def variant_search(variant: str) -> dict | None:
    """A search variant's [search] table (tuner, trials, the space of hyperparameters: tlkit/tune);
    None for a variant that trains one model."""
    path, table = _read_table(variant)
    search = table.get("search")
    if search is not None and not isinstance(search, dict):
        raise SpecError(f"spec file {path}: search must be a table ([search]), got {search!r}")
    return search


def flag(name: str) -> str:
    """The command-line flag of a spec field or option: learning_rate -> --learning-rate."""
    return "--" + name.replace("_", "-")


def merge(overrides: dict, base: dict | None = None) -> dict:
    """Return base (default: DEFAULTS) updated with overrides, checking names and types."""
    spec = dict(DEFAULTS if base is None else base)
    for key, value in overrides.items():
        if key not in DEFAULTS:
            raise SpecError(f"unknown spec key {key!r}")
        want = type(DEFAULTS[key])
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise SpecError(f"{key} must be {want.__name__}, got {value!r}")
        spec[key] = value
    return spec


def load(variant: str, overrides: dict | None = None) -> dict:
    """The full spec of a variant: defaults, then the variant's diff, then overrides."""
    diff, _ = read_variant(variant)
    spec = merge(diff)
    spec = merge({k: v for k, v in (overrides or {}).items() if v is not None}, spec)
    validate(spec)
    return spec


def class_list(spec: dict) -> tuple[str, ...]:
    """The classes to keep, in order; () means all."""
    if spec["classes"].strip() in ("", "all"):
        return ()
    return tuple(name.strip() for name in spec["classes"].split(",") if name.strip())


def validate(spec: dict) -> None:
    """Reject every value that cannot run, before any data is loaded or run created."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SpecError(message)

    for key in ("epochs", "batch_size", "image_size", "units", "conv_filters"):
        need(spec[key] > 0, f"{key} must be a positive integer, got {spec[key]}")
    for key in ("limit", "test_limit", "patience", "sample_seed"):
        need(spec[key] >= 0, f"{key} must be 0 or more, got {spec[key]}")
    need(spec["finetune_epochs"] >= 0, f"finetune_epochs must be 0 or more, got {spec['finetune_epochs']}")
    for key in ("learning_rate", "finetune_learning_rate"):
        need(spec[key] > 0, f"{key} must be greater than 0, got {spec[key]}")
    need(0.0 <= spec["dropout"] < 1.0, f"dropout must be in [0, 1), got {spec['dropout']}")
    need(spec["l2"] >= 0, f"l2 must be 0 or more, got {spec['l2']}")
    need(0.0 <= spec["momentum"] < 1.0, f"momentum must be in [0, 1), got {spec['momentum']}")
    need(spec["optimizer"] in ("adam", "sgd"), f"optimizer must be 'adam' or 'sgd', got {spec['optimizer']!r}")
    need(spec["preprocess"] in ("unit", "base"), f"preprocess must be 'unit' or 'base', got {spec['preprocess']!r}")
    need(spec["head"] in models.HEADS, f"head must be one of {', '.join(models.HEADS)}, got {spec['head']!r}")
    need(spec["base"] in models.BASES, f"unknown base {spec['base']!r}; choose one of {', '.join(models.BASES)}")
    min_size = models.BASES[spec["base"]].min_image_size
    need(spec["image_size"] >= min_size,
         f"image_size {spec['image_size']} is too small for {spec['base']}: it needs at least {min_size}")
    weights = spec["weights"]
    if weights not in ("imagenet", "none"):
        need(Path(weights).is_file(), f"weights file {weights} does not exist (use 'imagenet', 'none' or a path)")
    if spec["flip"] and (spec["augment"] or spec["trainable_base"]):
        raise SpecError("flip comes from the feature cache, and augment / trainable_base run the whole network "
                        "(augment flips already): use --no-flip with them")
    if spec["tta"] and (spec["augment"] or spec["trainable_base"]):
        raise SpecError("tta comes from the feature cache, and augment / trainable_base run the whole network: "
                        "use --no-tta with them")
    if spec["augment"] and spec["unfreeze"]:
        raise SpecError("augment and unfreeze cannot be combined yet: pick one variant")
    if spec["trainable_base"] and spec["unfreeze"]:
        raise SpecError("trainable_base trains the whole base already: unfreeze must be ''")
    need(not (models.BASES[spec["base"]].scales_pixels_itself and spec["preprocess"] == "unit"),
         f"{spec['base']} scales raw pixels itself (keras.applications builds it in): use preprocess 'base'")
    need(spec["monitor"] in MONITORS, f"monitor must be one of {', '.join(MONITORS)}, got {spec['monitor']!r}")
    need(0.0 <= spec["label_smoothing"] < 1.0, f"label_smoothing must be in [0, 1), got {spec['label_smoothing']}")
    need(spec["finetune_schedule"] in SCHEDULES,
         f"finetune_schedule must be one of {', '.join(SCHEDULES)}, got {spec['finetune_schedule']!r}")
    need(spec["data"] != "", "data must name 'cifar10', an image folder or an .npz file")
    need(spec["precision"] in PRECISIONS,
         f"precision must be one of {', '.join(PRECISIONS)}, got {spec['precision']!r}")
    need(spec["strategy"] in STRATEGIES,
         f"strategy must be one of {', '.join(STRATEGIES)}, got {spec['strategy']!r}")
