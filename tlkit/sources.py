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
import os
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



class FeatureFile(Source):
    """Cached features in a .npy file (features.py's entries), read by offsets a batch at a time.

    Rows are read with os.preadv into a fresh batch array: the file's pages stay in the kernel's page
    cache, shared and reclaimable, and never count in the process's resident memory, as the pages of
    a memory map it touches do (a head trained on a memory-mapped 6 GB entry ends holding all of it:
    `/usr/bin/time -v`'s peak RSS). So a split of any size takes the memory of the batches in flight.
    rows: which of the file's rows, in which order (take); None for all of them."""

    def __init__(self, path, rows: np.ndarray | None = None):
        self.path = str(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise DataError(f"{self.path}: .npy format {version} is not one this reads")
            shape, fortran_order, dtype = read_header(f)
            self.offset = f.tell()
        if fortran_order:
            raise DataError(f"{self.path}: features stored in Fortran order")
        self.dtype, self.row_shape = np.dtype(dtype), tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.file_rows = int(shape[0])
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._fd, self._pid = None, os.getpid()

    ndim = property(lambda self: 1 + len(self.row_shape))

    @property
    def shape(self) -> tuple:
        return (len(self), *self.row_shape)

    def __len__(self) -> int:
        return self.file_rows if self.rows is None else len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        index, within = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        rows = np.arange(len(self))[index]
        batch = self.read(np.atleast_1d(rows))
        return batch[(slice(None), *within)] if np.ndim(rows) else batch[0][within]

    def __array__(self, dtype=None, copy=None):
        whole = self.read(np.arange(len(self)))  # for small data and tests: tlkit's own paths read batches
        return whole if dtype is None else whole.astype(dtype)

    def __getstate__(self):  # pickled (Ray) without the descriptor: the other process opens its own
        return {**self.__dict__, "_fd": None}

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except (OSError, TypeError):  # at interpreter exit os may be half torn down
                pass

    def read(self, rows):
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: rows outside its {len(self)}")
        positions = (rows if self.rows is None else self.rows[rows]) % self.file_rows
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        if not len(rows):
            return out
        view, fd, size = memoryview(out.reshape(-1).view(np.uint8)), self._descriptor(), self.row_bytes
        if np.all(np.diff(positions) == 1):  # consecutive rows (a pass in order): one read
            self._read_into(fd, view, self.offset + int(positions[0]) * size)
            return out
        for i, position in enumerate(positions.tolist()):  # a shuffled batch: a read per row (GIL released)
            self._read_into(fd, view[i * size:(i + 1) * size], self.offset + position * size)
        return out

    def _read_into(self, fd: int, buffer, offset: int) -> None:
        done = 0
        while done < len(buffer):  # a read may return less than asked (signals, large reads)
            got = os.preadv(fd, [buffer[done:]], offset + done)
            if got <= 0:
                raise DataError(f"{self.path}: ends before its rows (the cache entry changed while read)")
            done += got

    def read_marking_unreadable(self, rows):
        return self.read(rows), np.zeros(0, np.int64)

    def take(self, rows) -> FeatureFile:
        rows = np.arange(len(self))[rows] if not isinstance(rows, np.ndarray) or rows.dtype == bool \
            else np.asarray(rows, dtype=np.int64)
        taken = FeatureFile.__new__(FeatureFile)
        taken.__dict__.update(self.__getstate__())
        taken.rows = rows % len(self) if self.rows is None else self.rows[rows]
        return taken

    def mirror(self):
        raise DataError(f"{self.path}: features cannot be mirrored; the mirrored images' features are an entry of "
                        "their own (the spec's `flip`)")

    def in_memory(self):
        return None

    def hash_into(self, h):
        for start in range(0, len(self), 1024):
            h.update(self.read(np.arange(start, min(start + 1024, len(self)))).data)
        return np.zeros(0, np.int64)

    def as_mlflow_dataset(self, targets, *, source, name, digest):
        raise DataError("cached features are not logged as a data set: their images are")

    def make_read_only(self):
        pass  # read afresh from a file that is never written again


class Stacked(Source):
    """Two sources of the same rows' shape, one after the other: rows below len(first) are first's.
    The pool of a data set built from its splits; training features beside their mirror images."""

    def __init__(self, first, second):
        self.first, self.second = of(first), of(second)
        if tuple(self.first.shape[1:]) != tuple(self.second.shape[1:]) or self.first.dtype != self.second.dtype:
            raise DataError(f"cannot stack {self.first.dtype} {tuple(self.first.shape[1:])} samples with "
                            f"{self.second.dtype} {tuple(self.second.shape[1:])} ones")
        self.dtype, self.ndim = self.first.dtype, self.first.ndim

    @property
    def shape(self) -> tuple:
        return (len(self), *self.first.shape[1:])

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, index):
        index, within = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        rows = np.arange(len(self))[index]
        batch = self.read(np.atleast_1d(rows))
        return batch[(slice(None), *within)] if np.ndim(rows) else batch[0][within]

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate([np.asarray(self.first), np.asarray(self.second)])
        return whole if dtype is None else whole.astype(dtype)

    def _parts(self, rows):
        rows = np.asarray(rows, dtype=np.int64) % max(len(self), 1)
        second = rows >= len(self.first)
        return rows, second

    def read(self, rows):
        return self.read_marking_unreadable(rows)[0]

    def read_marking_unreadable(self, rows):
        rows, second = self._parts(rows)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        unreadable = []
        for part, mask, start in ((self.first, ~second, 0), (self.second, second, len(self.first))):
            if mask.any():
                at = np.flatnonzero(mask)
                out[at], bad = part.read_marking_unreadable(rows[mask] - start)
                unreadable.extend(at[bad].tolist())
        return out, np.array(sorted(unreadable), dtype=np.int64)

    def take(self, rows):
        rows, second = self._parts(np.arange(len(self))[rows])
        if not second.any():
            return self.first.take(rows)
        if second.all():
            return self.second.take(rows - len(self.first))
        return _Rows(self, rows)  # rows of both: read through the stack

    def mirror(self):
        return Stacked(self.first.mirror(), self.second.mirror())

    def in_memory(self):
        return None

    def hash_into(self, h):
        failed = self.first.hash_into(h)
        if len(failed):
            return failed
        return len(self.first) + self.second.hash_into(h)

    def as_mlflow_dataset(self, targets, *, source, name, digest):
        import mlflow

        return mlflow.data.from_numpy(np.asarray(self), targets=targets, source=source, name=name, digest=digest)

    def make_read_only(self):
        self.first.make_read_only()
        self.second.make_read_only()


class _Rows(Source):
    """Some rows of a source, in a given order, read through it (a Stacked source's rows of both parts)."""

    def __init__(self, parent: Source, rows: np.ndarray):
        self.parent, self.rows = parent, np.asarray(rows, dtype=np.int64)
        self.dtype, self.ndim = parent.dtype, parent.ndim

    @property
    def shape(self) -> tuple:
        return (len(self.rows), *self.parent.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.parent[self.rows[index]]

    def __array__(self, dtype=None, copy=None):
        whole = self.read(np.arange(len(self)))
        return whole if dtype is None else whole.astype(dtype)

    def read(self, rows):
        return self.parent.read(self.rows[np.asarray(rows, dtype=np.int64)])

    def read_marking_unreadable(self, rows):
        return self.parent.read_marking_unreadable(self.rows[np.asarray(rows, dtype=np.int64)])

    def take(self, rows):
        return _Rows(self.parent, self.rows[np.arange(len(self))[rows]])

    def mirror(self):
        return _Rows(self.parent.mirror(), self.rows)

    def in_memory(self):
        return None

    def hash_into(self, h):
        failed = []
        for start in range(0, len(self), 1024):
            batch, bad = self.read_marking_unreadable(np.arange(start, min(start + 1024, len(self))))
            failed.extend((start + bad).tolist())
            if not failed:
                h.update(batch.data)
        return np.array(failed, dtype=np.int64)

    def as_mlflow_dataset(self, targets, *, source, name, digest):
        import mlflow

        return mlflow.data.from_numpy(np.asarray(self), targets=targets, source=source, name=name, digest=digest)

    def make_read_only(self):
        self.parent.make_read_only()


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
