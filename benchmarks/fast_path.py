"""The fast path's door as a whole: training a head on cached features, and scoring it, the fast way
against the plain Keras way (TLKIT_PLAIN_KERAS=1), in one process, alternating, repeated.

    python benchmarks/fast_path.py --repeats 3

Each measurement is train.fit (what `tlkit train` calls: compile, fit with validation every epoch,
finish) of a fresh head on features of VGG16's output shape (1x1x512; random numbers: the time of a
step does not depend on them), --epochs epochs without early stopping, then fastpath.predict
(evaluate.score's path) over --test features. Heads: the baseline's Dense 256, a Dense 1024 with
dropout (the recipe's), and the conv head (a 3x3 conv on the 1x1 map: its centre tap on the fast
path). Printed: seconds per fit and per scoring, fast and plain, medians, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types

import numpy as np

HEADS = {"dense-256": ("baseline", {}), "dense-1024-dropout": ("dropout", {"units": 1024}),
         "conv": ("conv_head", {})}


def measure(variant: str, extra: dict, plain: bool, data, epochs: int) -> tuple[float, float]:
    import keras

    from tlkit import fastpath, models, spec as specs, train

    os.environ[fastpath.PLAIN_KERAS_ENV] = "1" if plain else ""
    spec = specs.load(variant, {"weights": "none", "patience": 0, **extra})
    keras.utils.set_random_seed(1)
    head = models.head_model(spec, data.x_train.shape[1:], 10)
    started = time.perf_counter()
    train.fit(head, {"train": data.x_train, "val": data.x_val}, data, spec, epochs=epochs,
              learning_rate=spec["learning_rate"], on_features=True)
    fitted = time.perf_counter() - started
    started = time.perf_counter()
    fastpath.predict(head, data.x_test)
    return fitted, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4500)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", default=",".join(HEADS))
    args = parser.parse_args()

    import keras

    rng = np.random.default_rng(0)

    def split(n):
        return (rng.normal(size=(n, 1, 1, 512)).astype("float32"),
                keras.utils.to_categorical(rng.integers(0, 10, n), 10))

    (x_train, y_train), (x_val, y_val), (x_test, _) = split(args.train), split(args.val), split(args.test)
    data = types.SimpleNamespace(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test)
    for name in args.heads.split(","):
        variant, extra = HEADS[name]
        times = {way: ([], []) for way in ("fast", "plain")}
        measure(variant, extra, False, data, 1)  # warm-up: first traces of TensorFlow's kernels
        for _ in range(args.repeats):
            for way in ("fast", "plain"):
                fit_s, score_s = measure(variant, extra, way == "plain", data, args.epochs)
                times[way][0].append(fit_s)
                times[way][1].append(score_s)
        fast_fit, plain_fit = (statistics.median(times[w][0]) for w in ("fast", "plain"))
        fast_score, plain_score = (statistics.median(times[w][1]) for w in ("fast", "plain"))
        print(f"{name}: fit {args.epochs} epochs on {args.train} features: fast {fast_fit:.2f} s, plain "
              f"{plain_fit:.2f} s ({plain_fit / fast_fit:.2f}x); score {args.test}: fast {fast_score:.3f} s, "
              f"plain {plain_score:.3f} s ({plain_score / fast_score:.2f}x)  [medians of {args.repeats}; "
              f"fast {', '.join(f'{t:.2f}' for t in times['fast'][0])}; "
              f"plain {', '.join(f'{t:.2f}' for t in times['plain'][0])}]", flush=True)


if __name__ == "__main__":
    main()
