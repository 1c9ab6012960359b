"""One training step of VGG16's block5 shape (three 512-filter 3x3 'same' convs, pooled, a Dense
head) on HxW maps: TensorFlow's convolution (plain Keras) against tlkit's training view
(tlkit/fastpath/views.py Im2colConv2D: one matrix product over the zero-padded patches, on the
conv's own weights). The conv rewrite alone: both ways train with tlkit's fused Adam.

    python benchmarks/small_map_conv.py --sizes 2,3,4 --repeats 3

Batch 32, random inputs and labels; each way warms up (traces) first and is timed over --steps
steps; the two ways alternate within each repeat. views.SMALL_MAP_POSITIONS is set from these figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def block(size: int, seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 512))
    x = inputs
    for i in range(3):
        x = keras.layers.Conv2D(512, 3, padding="same", activation="relu", name=f"block5_conv{i + 1}")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def ms_per_step(size: int, plain: bool, steps: int) -> float:
    import keras

    from tlkit.fastpath import optimizers, views

    view = views.training_view(block(size), rewrite=not plain)
    view.compile(optimizer=optimizers.Adam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, size, size, 512)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 10, 32), 10)
    for _ in range(3):
        view.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        view.train_on_batch(x, y)
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2,3,4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        times = {"plain": [], "view": []}
        for _ in range(args.repeats):
            for way in ("plain", "view"):
                times[way].append(ms_per_step(size, way == "plain", args.steps))
        plain, view = statistics.median(times["plain"]), statistics.median(times["view"])
        print(f"{size}x{size} maps: plain Keras {plain:.1f} ms/step, training view {view:.1f} ms/step "
              f"(medians of {args.repeats}): {plain / view:.2f}x", flush=True)


if __name__ == "__main__":
    main()
