"""The batches model.fit(x, y, shuffle=True) trains on, served cheaper, and cached flips drawn per epoch."""

from __future__ import annotations

import math

import numpy as np

from tlkit import sources, stream

# Bytes of samples per read from a source that is not in memory (training_batches): whole batches,
# so the batches are the same; a few reads in flight, so memory holds tens of megabytes.
READ_BYTES = 8 << 20


def training_batches(x, y, batch_size: int, x_mirrored=None):
    """The batches model.fit(x, y, batch_size, shuffle=True) trains on, in the same order, as a dataset.

    x_mirrored: x's rows for the mirrored images. Then every epoch each sample is drawn as itself
    or mirrored, with probability 1/2 each (a coin per sample per epoch, seeded from numpy's
    random state, which the run's seed sets): RandomFlip("horizontal")'s distribution, from the cache.

    Keras's array pipeline draws a permutation of the samples for each iterator (tf.random.shuffle,
    seeded from the global seed), cuts it into batches (the last one partial) and gathers each
    batch in a parallel map behind a prefetch buffer. This is that pipeline with the gather done
    in the calling thread: with steps of a millisecond or two (a head on cached features) the
    hand-off through the buffer costs more than the gather (docs/performance.md).

    x: a sources.Source (or an array). One held in memory rides along in the dataset and is gathered
    in the graph; one that is not (cached features in their files, an image folder's files) is read a
    batch at a time through its batch reader in a parallel map (stream.decoded): the same permutation
    and coins, so the same batches in the same order as the arrays.
    """
    import keras
    import tensorflow as tf

    def as_tensor(array):
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and array.dtype != keras.backend.floatx():
            array = array.astype(keras.backend.floatx())  # as Keras casts float arrays (float16 features too)
        return tf.convert_to_tensor(array)

    count = len(y)
    in_full_batches = count // batch_size * batch_size
    if x_mirrored is not None:
        # The coins come from a generator whose state lives outside the dataset, so each iterator
        # (epoch) draws new ones: an op-seeded draw inside the dataset repeats itself in every new
        # iterator. Its seed is drawn from numpy's, which the run's seed sets.
        coin_source = tf.random.Generator.from_seed(int(np.random.randint(2**31 - 1)))

    def permutation(_):
        # As Keras draws it: the shuffle's seed comes from the global seed (set per run, per trial).
        indices = tf.random.shuffle(tf.range(count, dtype=tf.int64))
        if x_mirrored is None:
            return indices
        # Rows count.. of the stacked features are the mirror images: a coin per sample decides.
        coins = tf.cast(coin_source.uniform((count,)) < 0.5, tf.int64)
        return indices + count * coins

    def batched(indices):
        full = tf.data.Dataset.from_tensor_slices(tf.reshape(indices[:in_full_batches], (-1, batch_size)))
        if in_full_batches == count:
            return full
        return full.concatenate(tf.data.Dataset.from_tensors(indices[in_full_batches:]))

    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    # The shuffle's and the coins' state lives outside the dataset: say so, or tf.data refuses to
    # checkpoint or copy it.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    # A known length makes Keras start a new iterator, so a new permutation draw, every epoch, as for
    # arrays. tf.data.experimental is TensorFlow's public (documented, not yet stable) namespace;
    # neither name has a stable alias in TF 2.21.
    epoch_length = tf.data.experimental.assert_cardinality(math.ceil(count / batch_size))
    index_batches = tf.data.Dataset.range(1).map(permutation).flat_map(batched)

    source = sources.of(x)
    if source.in_memory() is None:
        # Read from the source (cached features from their files, images from theirs): the same
        # permutation and coins, read in parallel (stream.py) a few reads in flight, each read of
        # whole batches of about READ_BYTES, then cut into the batches again. A read per batch
        # costs a Python call into the pipeline per step, which a head on small features (VGG16's
        # 2 KB an image at 32 px) felt: 1.8 times its epoch (benchmarks/feature_reads.py).
        if x_mirrored is not None:
            if len(x_mirrored) != count:
                raise ValueError(f"{len(x_mirrored)} mirrored training features for {count} training features")
            source, y = sources.Stacked(source, x_mirrored), np.concatenate([y, y])
        row_bytes = max(1, int(np.prod(source.shape[1:])) * np.dtype(source.dtype).itemsize)
        rows_per_read = batch_size * max(1, READ_BYTES // (row_bytes * batch_size))
        index_reads = tf.data.Dataset.range(1).map(permutation).flat_map(
            lambda indices: tf.data.Dataset.from_tensor_slices(indices).batch(rows_per_read))
        reads = stream.decoded(source, index_reads, labels=as_tensor(y))
        return reads.unbatch().batch(batch_size).with_options(options).apply(epoch_length)
    x = source.in_memory()

    # The arrays ride along in a repeated dataset rather than in the gather's closure (Keras's way:
    # a captured tensor would be copied into the function's graph).
    if x_mirrored is not None:
        if len(x_mirrored) != count:
            raise ValueError(f"{len(x_mirrored)} mirrored training features for {count} training features")
        x, y = np.concatenate([x, x_mirrored]), np.concatenate([y, y])
    arrays = tf.data.Dataset.from_tensors((as_tensor(x), as_tensor(y))).repeat()
    batches = tf.data.Dataset.zip((index_batches, arrays))
    batches = batches.map(lambda indices, xy: (tf.gather(xy[0], indices), tf.gather(xy[1], indices)))
    return batches.with_options(options).apply(epoch_length)


def validation_batches(x, y, batch_size: int):
    """The unshuffled validation batches as a plain batched dataset: Keras's array pipeline (a
    shuffle-ready parallel gather) costs more to start than these need, at every epoch's end."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False  # as Keras's own pipeline: no rewrite
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).with_options(options)


def mirrored_draws(x, y, batch_size: int, x_mirrored):
    """Cached flips for Keras's own fit (the plain path): a keras.utils.PyDataset that every epoch
    draws a permutation and a coin per sample (itself or mirrored, p 1/2) from numpy's random state."""
    import keras

    if len(x_mirrored) != len(y):
        raise ValueError(f"{len(x_mirrored)} mirrored training features for {len(y)} training features")

    class MirroredDraws(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(int(np.random.randint(2**31 - 1)))
            self.on_epoch_end()

        def __len__(self):
            return math.ceil(len(y) / batch_size)

        def __getitem__(self, index):
            rows = self.order[index * batch_size:(index + 1) * batch_size]
            flipped = self.coins[rows].reshape(-1, *([1] * (np.ndim(x) - 1)))
            return np.where(flipped, x_mirrored[rows], x[rows]), y[rows]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(y))
            self.coins = self.rng.random(len(y)) < 0.5

    return MirroredDraws()
