"""Where a split's images are: image files decoded as they are read (`ImageFiles`).

data.py loads a data set; an image folder's splits are not decoded into memory but kept as
ImageFiles, the list of files, which decode a batch at a time wherever they are read (stream.py's
tf.data pipelines), so a folder of any size takes the memory of a few batches. Files are decoded
as the served model decodes them: colours by serving.to_rgb (serving.py is bundled with the model
and imports nothing of tlkit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from tlkit import serving


class DataError(ValueError):
    """A bad data source: the message is one line naming the path/parameter and what is wrong."""



@dataclass(frozen=True, eq=False)
class ImageFiles:
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

    def take(self, rows) -> ImageFiles:
        """The images at `rows`, still as files."""
        return ImageFiles(self.paths[rows], self.size, self.mirrored)

    def mirror(self) -> ImageFiles:
        """The same images mirrored left to right."""
        return ImageFiles(self.paths, self.size, not self.mirrored)



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
