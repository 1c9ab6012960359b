"""Samples streamed from their source: the tf.data pipelines that read a split a batch at a time.

Whatever reads a split's pixels a batch at a time comes through here, from a sources.Source (an
image folder's files, or an array): the feature pass (features.py), whole-network training and
validation on files (fastpath.batches), inference (fastpath.predict) and loading's own scan of a
folder for unreadable files and the digest (sources.ImageFiles.hash_into). A pipeline cuts the rows
into batches, reads the batches in parallel through the source's batch reader (tf.data's parallel
map over a numpy function; PIL's decoders release the GIL while they work), keeps them in order
and prefetches, so the model does not wait for the decoder where there are cores to spare, and
memory holds a few batches, never the data set (benchmarks/streaming.py measures peak memory
against the number of images).

Arrays go through the same pipelines, their rows gathered instead of decoded, so every caller has
one way to read whatever the source.
"""

from __future__ import annotations

import numpy as np

SCAN_BATCH = 64  # images per decode task when loading scans a folder


def reader(images, with_unreadable: bool = False):
    """A numpy function: rows (int64) -> images[rows] (and the positions of unreadable files), by the
    source's own batch reader (sources.Source). The one way rows are read, here in tf.data and in
    cluster.py's Ray workers, so both passes see the same pixels."""
    return images.read_marking_unreadable if with_unreadable else images.read


def decoded(images, row_batches, labels=None, with_unreadable: bool = False):
    """A dataset of row batches (int64 vectors) -> images[rows] (with labels[rows], or with the
    positions of the unreadable files), decoded in parallel, in order, prefetched."""
    import tensorflow as tf

    read = reader(images, with_unreadable)
    image_type = tf.as_dtype(np.dtype(images.dtype))
    label_table = None if labels is None else tf.constant(np.asarray(labels))

    def load(rows):
        if with_unreadable:
            x, unreadable = tf.numpy_function(read, [rows], (image_type, tf.int64), stateful=False)
            x.set_shape((None, *images.shape[1:]))
            return x, unreadable
        x = tf.numpy_function(read, [rows], image_type, stateful=False)
        x.set_shape((None, *images.shape[1:]))
        return x if label_table is None else (x, tf.gather(label_table, rows))

    return row_batches.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def row_batches(count: int, batch_size: int):
    """The rows 0..count-1 in order, batch_size at a time (the last batch partial), as a dataset."""
    import tensorflow as tf

    return tf.data.Dataset.range(0, count, batch_size).map(
        lambda start: tf.range(start, tf.minimum(start + batch_size, count)))


def batches(images, batch_size: int, labels=None):
    """images (a sources.Source) in order, batch_size at a time, as a dataset of uint8
    batches (with labels[rows] beside them when given)."""
    return decoded(images, row_batches(len(images), batch_size), labels)


def scan(images, batch_size: int | None = None):
    """(start row, images, positions of unreadable files in the batch) for every batch, in order:
    a folder read once, in parallel, a few batches in memory at a time. batch_size: SCAN_BATCH, read
    at the call (tests set it)."""
    batch_size = batch_size or SCAN_BATCH
    dataset = decoded(images, row_batches(len(images), batch_size), with_unreadable=True)
    for start, (batch, unreadable) in zip(range(0, len(images), batch_size), dataset.as_numpy_iterator()):
        yield start, batch, unreadable
