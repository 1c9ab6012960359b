"""Where a split's samples are, behind one small interface (`Source`): in memory (`InMemory`), or
image files decoded as they are read (`ImageFiles`).

Training, the feature pass, scoring and the fast path read a split through a Source: its length, a
batch reader (`read(rows)`), the rows as a source of the same kind (`take`), the images mirrored
(`mirror`), its part of a data set's digest (`hash_into`), and how it is logged to MLflow. This is
the one module that knows which kind a split is; `of(x)` makes any numpy array a Source (images or
cached features alike), and every other module asks the Source, not its kind. A fast path may ask
`in_memory()`: the whole array, where there is one, gathers batches inside the graph, which is
cheaper than a reader called back from it; a Source without one (files; features read from disk)
is read a batch at a time through `read`.

An image folder's splits are ImageFiles, the list of files, decoded a batch at a time wherever
they are read (stream.py's tf.data pipelines), so a folder of any size takes the memory of a few
batches. Files are decoded as the served model decodes them: colours by serving.to_rgb
(serving.py is bundled with the model and imports nothing of tlkit).
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tlkit import serving, stream


class DataError(ValueError):
    """A bad data source: the message is one line naming the path/parameter and what is wrong."""


class Source(abc.ABC):
    """A split's samples (n, ...) wherever they are: len(x), x.shape, x.dtype, x[rows] as numpy
    indexes (an array), and the methods below."""

    @abc.abstractmethod
    def read(self, rows: np.ndarray) -> np.ndarray:
        """The samples at `rows` (int64 positions) as one C-contiguous array: the batch reader."""

    @abc.abstractmethod
    def read_marking_unreadable(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(read(rows), positions in `rows` of samples that could not be read, zeros there)."""

    @abc.abstractmethod
    def take(self, rows) -> Source:
        """The samples at `rows`, a Source of the same kind (files stay files)."""

    @abc.abstractmethod
    def mirror(self) -> Source:
        """The same images mirrored left to right (the width axis of (n, height, width, channels))."""

    @abc.abstractmethod
    def in_memory(self) -> np.ndarray | None:
        """The whole array when it is held in memory (a fast path gathers from it in the graph), else None."""

    @abc.abstractmethod
    def hash_into(self, h) -> np.ndarray:
        """Add the samples' bytes, in order, to hashlib object `h`; returns the positions of the
        samples that could not be read (none for arrays). After the first such, `h` is left as it is."""

    @abc.abstractmethod
    def as_mlflow_dataset(self, targets: np.ndarray, *, source: str, name: str, digest: str):
        """The split as an MLflow dataset, for mlflow.log_input."""

    @abc.abstractmethod
    def make_read_only(self) -> None:
        """Refuse writes from now on (a suite's children share one loaded data set)."""


class InMemory(np.ndarray, Source):
    """A numpy array as a Source: the array itself (a view of it; `of`), indexes as numpy does."""

    def read(self, rows):
        return np.ascontiguousarray(np.asarray(self)[rows])

    def read_marking_unreadable(self, rows):
        return self.read(rows), np.zeros(0, np.int64)

    def take(self, rows):
        return np.asarray(self)[rows].view(InMemory)

    def mirror(self):
        return np.ascontiguousarray(np.asarray(self)[:, :, ::-1]).view(InMemory)

    def in_memory(self):
        return np.asarray(self)

    def hash_into(self, h):
        h.update(np.ascontiguousarray(self).data)
        return np.zeros(0, np.int64)

    def as_mlflow_dataset(self, targets, *, source, name, digest):
        import mlflow

        return mlflow.data.from_numpy(np.asarray(self), targets=targets, source=source, name=name, digest=digest)

    def make_read_only(self):
        self.flags.writeable = False

    def __reduce_ex__(self, protocol):
        # Pickled as the plain array it views: Ray and pickle 5 then ship its buffer out of band
        # (a worker maps the object store's copy instead of unpickling one of its own); numpy
        # pickles subclasses in band.
        return _in_memory, (np.asarray(self),)


def _in_memory(array: np.ndarray) -> InMemory:
    return array.view(InMemory)


def of(x) -> Source | None:
    """x as a Source: a Source as it is, a numpy array (images, labels, cached features) as InMemory;
    None for anything else (a tf.data dataset, a keras PyDataset: Keras's to serve)."""
    if isinstance(x, Source):
        return x
    if isinstance(x, np.ndarray):
        return x.view(InMemory)
    return None


def digest(class_names, image_size: int, x_train, labels_train, x_test, labels_test) -> tuple[str, dict]:
    """(sha256 of the data actually used, before the validation split, as hex; per split "train"
    and "test", the positions of the images that could not be read). The pixels and labels of the
    training images, then the test images', after a header: the same digest whichever kind holds
    them, so a folder keeps its digest (and its cache entries) as it would have in memory."""
    x_train, x_test = of(x_train), of(x_test)
    h = hashlib.sha256()
    header = {"class_names": list(class_names), "image_size": int(image_size),
              "train": list(x_train.shape), "test": list(x_test.shape)}
    h.update(json.dumps(header).encode())
    unreadable = {}
    for split, x, labels in (("train", x_train, labels_train), ("test", x_test, labels_test)):
        unreadable[split] = x.hash_into(h)
        h.update(np.asarray(labels).astype("<i8").data)
    return h.hexdigest(), unreadable


@dataclass(frozen=True, eq=False)
class ImageFiles(Source):
    """A split of an image folder as its files: an array-like of uint8 (n, size, size, 3) images
    that decodes only what is read. x[rows] (an int, a slice, an index array) decodes those
    images; stream.batches(x, ...) streams them all; np.asarray(x) decodes every one (for small
    data and tests: tlkit's own paths stream)."""

    paths: np.ndarray  # of str, one per image
    size: int
    mirrored: bool = False  # each image mirrored left to right as it is decoded (the spec's `flip`)

    dtype = np.dtype(np.uint8)
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> np.ndarray:
        # As numpy indexes: the first index picks images (only those are decoded), the rest their pixels.
        index, within = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        rows = np.arange(len(self))[index]
        images, unreadable = self.decode(np.atleast_1d(rows))
        if len(unreadable):
            raise DataError(f"{self.paths[np.atleast_1d(rows)[unreadable[0]]]}: can no longer be read "
                            "(the folder changed after it was loaded)")
        if np.ndim(rows):
            return images[(slice(None), *within)]
        return images[0][within]

    def __array__(self, dtype=None, copy=None):
        images = self[:]
        return images if dtype is None else images.astype(dtype)

    def decode(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images of `rows`, positions in `rows` of the files that could not be read: zeros there)."""
        images = np.zeros((len(rows), self.size, self.size, 3), np.uint8)
        unreadable = []
        for j, row in enumerate(rows):
            image = read_image(self.paths[row], self.size)
            if image is None:
                unreadable.append(j)
            else:
                images[j] = image[:, ::-1] if self.mirrored else image
        return images, np.array(unreadable, dtype=np.int64)

    def read(self, rows):
        # self[rows] names a file that can no longer be read (changed since loading).
        return self[rows]

    def read_marking_unreadable(self, rows):
        return self.decode(rows)

    def take(self, rows) -> ImageFiles:
        return ImageFiles(self.paths[rows], self.size, self.mirrored)

    def mirror(self) -> ImageFiles:
        return ImageFiles(self.paths, self.size, not self.mirrored)

    def in_memory(self):
        return None

    def hash_into(self, h):
        """Decodes the files once, streaming (stream.scan: in parallel, a few batches in memory)."""
        failed = []
        for start, images, unreadable in stream.scan(self):
            failed.extend(start + unreadable)
            if not failed:
                h.update(images.data)
        return np.array(failed, dtype=np.int64)

    def as_mlflow_dataset(self, targets, *, source, name, digest):
        import mlflow
        import pandas as pd

        # Logged as the file list (from_numpy would decode them all).
        table = pd.DataFrame({"path": self.paths, "label": targets})
        return mlflow.data.from_pandas(table, targets="label", source=source, name=name, digest=digest)

    def make_read_only(self):
        pass  # files are read afresh; the paths are the caller's own copy (take, mirror make new ones)



def read_image(path: str, size: int) -> np.ndarray | None:
    """The image at path as uint8 (size, size, 3), or None if it cannot be read."""
    try:
        with Image.open(path) as image:
            if image.size != (size, size):
                # JPEG only: decode at 1/2, 1/4 or 1/8 scale (never below size), much
                # faster for large photos. Other formats ignore it.
                image.draft(None, (size, size))
            image = serving.to_rgb(image)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image)
    except serving.UNREADABLE:
        return None
