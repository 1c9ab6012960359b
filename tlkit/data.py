"""Load an image-classification data set into numpy arrays ready for Keras.

Three sources are understood by `load`:

* ``"cifar10"`` -- the keras download (``keras.datasets.cifar10``). The word is a
  keyword: to use a local folder that happens to be called ``cifar10``, pass a path
  such as ``./cifar10``.
* an image folder ``<dir>/train/<class>/*`` and ``<dir>/test/<class>/*``
  (.png .jpg .jpeg .bmp .gif, any size and colour mode);
* an ``.npz`` file with ``x_train, y_train, x_test, y_test`` and optionally
  ``class_names``.

Every source ends up the same way, following the original notebook: uint8 RGB images of
``image_size`` x ``image_size`` (scaling to [0, 1] lives in the model), float32 one-hot
labels, and 10% of the training images split off for validation.

A Dataset's image splits are sources.Source, read through one interface whatever holds them: an
image folder is not decoded into memory, its splits are `sources.ImageFiles`, the list of files,
decoded a batch at a time wherever they are read, so a folder of any size takes the memory of a
few batches. Loading it decodes every sampled image once, in that same streaming way, to find
unreadable files and to compute the digest of the pixels; the keras download and .npz files are
arrays already and stay arrays (`sources.InMemory`).

One module for the three sources: they share the split, limit, class and digest rules and the
wording of their errors, which is what a user meets first; apart, each rule would have to be kept
the same in three places. What a split is once loaded (files or an array) is sources.py's.
"""

from __future__ import annotations

import numbers
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from tlkit import sources
from tlkit.messages import first_line
from tlkit.sources import DataError, ImageFiles

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
VALIDATION_FRACTION = 0.1


# eq=False: the generated __eq__/__hash__ would compare numpy arrays, which raises.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded data set: uint8 images (n, size, size, 3), each split a sources.Source, and float32
    one-hot labels."""

    name: str
    source: str
    class_names: tuple[str, ...]
    x_train: sources.Source
    y_train: np.ndarray
    x_val: sources.Source
    y_val: np.ndarray
    x_test: sources.Source
    y_test: np.ndarray
    digest: str
    skipped_files: tuple[str, ...] = ()
    # The training images before the validation split, and where the split put each: x_train is
    # x_pool.take(train_rows), x_val is x_pool.take(val_rows). The feature cache stores the pool's
    # features once, whatever the split (so repeats at other split seeds share one pass).
    x_pool: sources.Source | None = None
    train_rows: np.ndarray | None = None
    val_rows: np.ndarray | None = None

    def __post_init__(self):
        # Each image split as a sources.Source, whoever built the Dataset (load, or a test with arrays).
        for split in ("x_train", "x_val", "x_test"):
            object.__setattr__(self, split, sources.of(getattr(self, split)))
        if self.x_pool is None:  # built from its splits (tests): the pool is the two, one after the other
            object.__setattr__(self, "x_pool", sources.Stacked(self.x_train, self.x_val))
            object.__setattr__(self, "train_rows", np.arange(len(self.x_train)))
            object.__setattr__(self, "val_rows", len(self.x_train) + np.arange(len(self.x_val)))

    def with_split(self, split_seed: int) -> Dataset:
        """The same images (the same pool, test images and digest) split off at another seed: a
        repeat's data without loading (decoding, scanning) them again."""
        import dataclasses

        train_rows, val_rows = split_rows(len(self.x_pool), split_seed)
        pool_labels = np.concatenate([self.y_train, self.y_val])[np.argsort(np.concatenate([self.train_rows,
                                                                                           self.val_rows]))]
        return dataclasses.replace(self, x_train=self.x_pool.take(train_rows), y_train=pool_labels[train_rows],
                                   x_val=self.x_pool.take(val_rows), y_val=pool_labels[val_rows],
                                   train_rows=train_rows, val_rows=val_rows)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[1])

    def labels(self, split: str) -> np.ndarray:
        """Integer labels of split "train", "val" or "test"."""
        one_hot = {"train": self.y_train, "val": self.y_val, "test": self.y_test}.get(split)
        if one_hot is None:
            raise ValueError(f"unknown split {split!r}: use 'train', 'val' or 'test'")
        return one_hot.argmax(axis=1)

    def class_counts(self, split: str) -> dict[str, int]:
        """Number of images per class name in split "train", "val" or "test"."""
        counts = np.bincount(self.labels(split), minlength=self.num_classes)
        return dict(zip(self.class_names, counts.tolist()))


def load(data: str, image_size: int = 32, limit: int = 0, test_limit: int = 0,
         seed: int = 1995, classes: tuple[str, ...] | list[str] | str = (), split_seed: int | None = None) -> Dataset:
    """Load `data` ("cifar10", an image folder or an .npz file) as a Dataset.

    image_size: every image is resized to image_size x image_size (PIL bilinear).
    limit / test_limit: at most this many training / test images (0 = all), sampled
        stratified by class and deterministically from `seed`.
    classes: use only these class names, in this order (label i = classes[i]);
        a string is read as a comma-separated list. Empty = all classes.
    seed: drives the `limit` samples (and, unless split_seed is given, the validation split).
    split_seed: drives the 10% validation split alone (default: seed). Repeats of a run at several
        seeds keep `seed` and change this: the same images (one digest), other validation splits.
    """
    split_seed = seed if split_seed is None else split_seed
    _check_count("image_size", image_size, minimum=1)
    _check_count("limit", limit, minimum=0)
    _check_count("test_limit", test_limit, minimum=0)
    if isinstance(classes, str):
        # MLflow passes parameters as strings, e.g. "cat,dog".
        classes = [name.strip() for name in classes.split(",") if name.strip()]
    classes = tuple(str(name) for name in classes)
    split_seed = seed if split_seed is None else split_seed

    if data == "cifar10":
        raw = _read_cifar10()
        return _from_arrays("cifar10", "keras.datasets.cifar10", *raw, image_size=image_size,
                            limit=limit, test_limit=test_limit, seed=seed, classes=classes, split_seed=split_seed)

    path = os.path.abspath(os.path.expanduser(str(data)))
    if not os.path.exists(path):
        raise DataError(f"data path does not exist: {path}")
    if os.path.isdir(path):
        return _load_folder(path, image_size, limit, test_limit, seed, classes, split_seed)
    if path.lower().endswith(".npz"):
        name = os.path.splitext(os.path.basename(path))[0]
        return _from_arrays(name, path, *_read_npz(path), image_size=image_size, limit=limit,
                            test_limit=test_limit, seed=seed, classes=classes, split_seed=split_seed)
    raise DataError(f"{path}: not 'cifar10', an image folder (train/, test/) or an .npz file")


def split_and_encode(x: np.ndarray, labels: np.ndarray, num_classes: int, seed: int):
    """One-hot encode and split off 10% for validation, as the notebook does.

    Returns (x_train, y_train, x_val, y_val). Same result as the notebook's
    `train_test_split(x, to_categorical(labels), test_size=0.1, random_state=seed)`
    (no stratify), computed on indices so the images are copied only once.
    """
    train_idx, val_idx = split_rows(len(x), seed)
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    x = sources.of(x)
    return x.take(train_idx), one_hot[train_idx], x.take(val_idx), one_hot[val_idx]


def split_rows(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a pool of `count` images: the notebook's 10% split."""
    return train_test_split(np.arange(count), test_size=VALIDATION_FRACTION, random_state=seed)


def stratified_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of at most `limit` items, stratified by label (limit 0 = all)."""
    positions = np.arange(len(labels))
    if limit == 0 or limit >= len(labels):
        return positions
    try:
        chosen, _ = train_test_split(positions, train_size=limit, stratify=labels,
                                     random_state=seed)
    except ValueError:
        # Stratifying is impossible when limit (or the remainder) is smaller than the
        # number of classes, or a class has a single image: sample without it.
        chosen, _ = train_test_split(positions, train_size=limit, random_state=seed)
    # Sorted, so the data (and its digest) depends on which images, not on their order.
    return np.sort(chosen)


def data_digest(class_names, image_size: int, x_train, labels_train, x_test, labels_test) -> str:
    """sha256 of the data actually used (before the validation split), as hex (sources.digest)."""
    return sources.digest(class_names, image_size, x_train, labels_train, x_test, labels_test)[0]


# --- sources -------------------------------------------------------------------------

def _read_cifar10():
    """(class_names, x_train, y_train, x_test, y_test) from the keras download."""
    try:
        import keras  # imported here: loading tensorflow takes seconds

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as exc:  # keras raises a bare Exception for network failures
        reason = first_line(exc)
        # keras 3 looks for the archive under this name (file_utils.get_file with
        # fname="cifar-10-batches-py-target" and extract=True) and checks its sha256.
        raise DataError(
            f"cifar10: could not download CIFAR-10 ({reason}); without internet, copy "
            "cifar-10-python.tar.gz to ~/.keras/datasets/cifar-10-batches-py-target_archive "
            "(keras finds it there), or pass an image folder or .npz file") from exc
    if x_train.shape[1] == 3 and x_train.shape[3] != 3:
        # keras returns channels-first arrays when configured with image_data_format
        # "channels_first"; images here are always channels-last.
        x_train, x_test = x_train.transpose(0, 2, 3, 1), x_test.transpose(0, 2, 3, 1)
    return (CIFAR10_CLASSES, x_train, _labels("cifar10", "y_train", y_train),
            x_test, _labels("cifar10", "y_test", y_test))


def _read_npz(path: str):
    """(class_names, x_train, y_train, x_test, y_test) from an .npz file, checked."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ("x_train", "y_train", "x_test", "y_test")
                       if key not in npz.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)} "
                                f"(has: {', '.join(npz.files) or 'nothing'})")
            arrays = {key: npz[key] for key in npz.files
                      if key in ("x_train", "y_train", "x_test", "y_test", "class_names")}
    except DataError:
        raise
    except Exception as exc:  # zipfile, pickle and format errors
        raise DataError(f"{path}: cannot read .npz file ({exc})") from exc

    x_train = _images(path, "x_train", arrays["x_train"])
    x_test = _images(path, "x_test", arrays["x_test"])
    y_train = _labels(path, "y_train", arrays["y_train"])
    y_test = _labels(path, "y_test", arrays["y_test"])
    for x_key, x, y_key, y in (("x_train", x_train, "y_train", y_train),
                               ("x_test", x_test, "y_test", y_test)):
        if len(x) != len(y):
            raise DataError(f"{path}: {x_key} has {len(x)} images but {y_key} has {len(y)} labels")

    all_labels = np.concatenate([y_train, y_test])
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1:
            raise DataError(f"{path}: class_names must be 1-D, got shape {names.shape}")
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
        if len(set(class_names)) != len(class_names):
            raise DataError(f"{path}: class_names has duplicates: {', '.join(class_names)}")
    else:
        k = int(all_labels.max()) + 1 if len(all_labels) else 0
        class_names = tuple(str(i) for i in range(max(k, 0)))
    bad = all_labels[(all_labels < 0) | (all_labels >= len(class_names))]
    if len(bad):
        raise DataError(f"{path}: label {int(bad[0])} outside 0..{len(class_names) - 1} "
                        f"({len(class_names)} classes)")
    return class_names, x_train, y_train, x_test, y_test


def _images(path: str, key: str, x: np.ndarray) -> np.ndarray:
    """Images as uint8 (n, h, w, 1 or 3): grayscale gets a channel axis, alpha is dropped."""
    if x.dtype != np.uint8:
        raise DataError(f"{path}: {key} must be uint8 images (0..255), got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[3] not in (1, 3, 4):
        raise DataError(f"{path}: {key} must have shape (n, h, w) or (n, h, w, c) with c in "
                        f"1, 3, 4; got {x.shape}")
    return x[..., :3]


def _labels(path: str, key: str, y: np.ndarray) -> np.ndarray:
    """Integer labels of shape (n,) from (n,) or (n, 1)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: {key} must be integer labels of shape (n,) or (n, 1), "
                        f"got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must be integer labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def _from_arrays(name, source, class_names, x_train, y_train, x_test, y_test, *,
                 image_size, limit, test_limit, seed, classes, split_seed) -> Dataset:
    """Select classes, apply the limits, resize, then build the Dataset."""
    if len(class_names) < 2:
        raise DataError(f"{source}: need at least two classes, found {len(class_names)}")
    wanted = _select_classes(source, class_names, classes)
    if wanted != list(range(len(class_names))):
        new_label = np.full(len(class_names), -1)
        new_label[wanted] = np.arange(len(wanted))
        keep_train, keep_test = new_label[y_train] >= 0, new_label[y_test] >= 0
        x_train, y_train = x_train[keep_train], new_label[y_train[keep_train]]
        x_test, y_test = x_test[keep_test], new_label[y_test[keep_test]]
        class_names = tuple(class_names[i] for i in wanted)

    # Limit before resizing: no work is spent on images that are left out.
    chosen = stratified_sample(y_train, limit, seed)
    x_train, y_train = x_train[chosen], y_train[chosen]
    chosen = stratified_sample(y_test, test_limit, seed)
    x_test, y_test = x_test[chosen], y_test[chosen]
    return _build(name, source, tuple(class_names), _fit_images(x_train, image_size), y_train,
                  _fit_images(x_test, image_size), y_test, image_size, split_seed)


def _fit_images(x: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w, 1 or 3) uint8 -> (n, size, size, 3) uint8, resized with PIL bilinear."""
    n, h, w, channels = x.shape
    if (h, w) != (size, size):
        resized = np.empty((n, size, size, channels), np.uint8)
        for i in range(n):
            image = Image.fromarray(x[i, :, :, 0] if channels == 1 else x[i])
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            resized[i] = np.asarray(image).reshape(size, size, channels)
        x = resized
    if channels == 1:
        x = np.repeat(x, 3, axis=3)
    return x


# --- image folders -------------------------------------------------------------------

def _load_folder(root, image_size, limit, test_limit, seed, classes, split_seed) -> Dataset:
    splits = {}
    for split in ("train", "test"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise DataError(f"{root}: no {split}/ folder (expected {split}/<class>/<images>)")
        splits[split] = split_dir
    train_classes = _class_folders(splits["train"])
    test_classes = _class_folders(splits["test"])
    if len(train_classes) < 2:
        raise DataError(f"{splits['train']}: need at least two class folders, "
                        f"found {len(train_classes)}")
    if train_classes != test_classes:
        missing = sorted(set(train_classes) - set(test_classes))
        extra = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"{splits['test']}: class folders differ from train/: "
                        f"missing {', '.join(missing) or '-'}; not in train/ {', '.join(extra) or '-'}")
    class_names = tuple(train_classes[i] for i in _select_classes(root, train_classes, classes))

    files = {split: _split_files(split_dir, class_names) for split, split_dir in splits.items()}
    limits = {"train": limit, "test": test_limit}
    unreadable = {"train": np.zeros(0, np.int64), "test": np.zeros(0, np.int64)}
    while True:
        # The sample leaves out the files found unreadable so far: still `limit` images, deterministically.
        chosen = {split: _sample_readable(splits[split], class_names, files[split][1], unreadable[split],
                                          limits[split], seed) for split in splits}
        digest, found = _scan(class_names, image_size, files, chosen)
        if not any(len(rows) for rows in found.values()):
            break
        # Rare: the pixels hashed so far belong to a sample that changes, so the scan starts again
        # (decoding the new sample) rather than keep every image in memory in case it must.
        unreadable = {split: np.union1d(unreadable[split], found[split]) for split in splits}

    skipped = [str(files[split][0][row]) for split in splits for row in unreadable[split]]
    if skipped:
        shown = ", ".join(os.path.relpath(p, root) for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"{root}: skipped {len(skipped)} unreadable image file(s): {shown}{more}",
                      stacklevel=3)
    x_train, x_test = (ImageFiles(files[split][0][chosen[split]], image_size) for split in ("train", "test"))
    return _build(os.path.basename(root), root, class_names, x_train, files["train"][1][chosen["train"]],
                  x_test, files["test"][1][chosen["test"]], image_size, split_seed, skipped=tuple(skipped),
                  digest=digest)


def _split_files(split_dir, class_names) -> tuple[np.ndarray, np.ndarray]:
    """(paths, integer labels) of every image file of a split, class by class, sorted."""
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        found = _image_files(class_dir)
        if not found:
            raise DataError(f"{class_dir}: no image files ({' '.join(IMAGE_EXTENSIONS)})")
        paths.extend(found)
        labels.extend([label] * len(found))
    return np.array(paths, dtype=object), np.array(labels, dtype=np.int64)


def _sample_readable(split_dir, class_names, labels, unreadable, limit, seed) -> np.ndarray:
    """Positions of a stratified sample of `limit` files (0 = all), none of them in `unreadable`."""
    pool = np.setdiff1d(np.arange(len(labels)), unreadable)
    counts = np.bincount(labels[pool], minlength=len(class_names))
    if (counts == 0).any():
        empty = class_names[int(np.argmin(counts))]
        raise DataError(f"{os.path.join(split_dir, empty)}: no readable images")
    return pool[stratified_sample(labels[pool], limit, seed)]


def _scan(class_names, image_size, files, chosen) -> tuple[str, dict[str, np.ndarray]]:
    """Decode the chosen files once, streaming (sources.digest): (data_digest of their pixels and
    labels, positions of the files that could not be read per split). The digest is the one of
    the decoded arrays (data_digest), so a folder keeps its digest and its cache entries."""
    (x_train, labels_train), (x_test, labels_test) = (
        (ImageFiles(files[split][0][chosen[split]], image_size), files[split][1][chosen[split]])
        for split in ("train", "test"))
    digest, unreadable = sources.digest(class_names, image_size, x_train, labels_train, x_test, labels_test)
    return digest, {split: chosen[split][rows] for split, rows in unreadable.items()}


def _class_folders(split_dir: str) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .git) are not classes.
    return sorted(entry.name for entry in os.scandir(split_dir)
                  if entry.is_dir() and not entry.name.startswith("."))


def _image_files(class_dir: str) -> list[str]:
    """Image files under class_dir (subfolders included), sorted; others ignored."""
    files = []
    for folder, subfolders, names in os.walk(class_dir):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        # Hidden files are skipped too: macOS "._x.jpg" files carry an image extension.
        files.extend(os.path.join(folder, name) for name in sorted(names)
                     if not name.startswith(".")
                     and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
    return files


# --- shared --------------------------------------------------------------------------

def _build(name, source, class_names, x_train, y_train, x_test, y_test, image_size, split_seed,
           skipped=(), digest: str = "") -> Dataset:
    """digest: data_digest of these images, when the caller computed it as it streamed them.
    split_seed: the validation split's."""
    if len(x_train) < 2:
        raise DataError(f"{source}: {len(x_train)} training image(s) after classes/limit; "
                        "the 10% validation split needs at least 2")
    if len(x_test) == 0:
        raise DataError(f"{source}: no test images after classes/test_limit")
    digest = digest or data_digest(class_names, image_size, x_train, y_train, x_test, y_test)
    x_pool = sources.of(x_train)
    train_rows, val_rows = split_rows(len(x_pool), split_seed)
    one_hot = np.eye(len(class_names), dtype=np.float32)
    return Dataset(name=name, source=source, class_names=class_names,
                   x_train=x_pool.take(train_rows), y_train=one_hot[y_train[train_rows]],
                   x_val=x_pool.take(val_rows), y_val=one_hot[y_train[val_rows]],
                   x_test=x_test, y_test=one_hot[y_test], digest=digest, skipped_files=tuple(skipped),
                   x_pool=x_pool, train_rows=train_rows, val_rows=val_rows)


def _select_classes(source: str, available, requested) -> list[int]:
    """Indices into `available` of the requested class names, in requested order."""
    available = list(available)
    if not requested:
        return list(range(len(available)))
    for name in requested:
        if name not in available:
            raise DataError(f"{source}: unknown class {name!r} in classes "
                            f"(available: {', '.join(available)})")
    if len(set(requested)) != len(requested):
        raise DataError(f"{source}: classes lists a name twice: {', '.join(requested)}")
    if len(requested) < 2:
        raise DataError(f"{source}: classes must name at least two classes, got {requested[0]!r}")
    return [available.index(name) for name in requested]


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
