"""The seed's way against tlkit's frozen-feature cache: wall time, test accuracy, peak memory.

The seed trains `model.fit` on the whole network with the base frozen, so every epoch pushes every
training and validation image through all of VGG16 again. tlkit runs the base once, caches the
features, and trains the head on them. Both ways here use the same images, hyperparameters and
seed and a fixed number of epochs (early stopping off), so early stopping does not decide the
ratio. Each way runs in its own child process, so each peak RSS is its own.

    python benchmarks/feature_cache.py --data ../shared/data/cifar10-jpeg.tar.gz   # or an extracted folder

The frozen suite (baseline, conv_head, l2, sgd, dropout, a 6-trial search) is timed the tlkit
way for real, as `tlkit suite` runs it (children, comparison, promotion); the seed's way is
extrapolated from its baseline's costs measured in this run (data, build, epochs, test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import queue as queue_module
import resource
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

FROZEN_SUITE = ["baseline", "conv_head", "l2", "sgd", "dropout"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def spec_for(args, variant="baseline", **extra):
    from tlkit import spec as specs

    return specs.load(variant, dict(data=args.data, weights=args.weights, limit=args.train_images,
                                    test_limit=args.test_images, epochs=args.epochs, patience=0, **extra))


def seed_way(args, queue) -> None:
    """The notebook's code path: the full model, images in, every epoch through the base."""
    import keras

    from tlkit import data

    spec = spec_for(args)
    start = time.perf_counter()  # the data's decoding counts on both clocks: tlkit's train() decodes too
    dataset = data.load(spec["data"], limit=spec["limit"], test_limit=spec["test_limit"], seed=spec["seed"])
    x_train, x_val, x_test = (x.astype("float32") / 255.0 for x in (dataset.x_train, dataset.x_val, dataset.x_test))
    build_start = time.perf_counter()
    keras.utils.set_random_seed(spec["seed"])
    base = keras.applications.VGG16(include_top=False, weights=None if args.weights == "none" else args.weights,
                                    input_shape=(32, 32, 3))
    for layer in base.layers:
        layer.trainable = False
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Dense(256, activation="relu")(x)
    outputs = keras.layers.Dense(len(dataset.class_names), activation="softmax")(x)
    model = keras.Model(base.input, outputs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=spec["learning_rate"]),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    fit_start = time.perf_counter()
    model.fit(x_train, dataset.y_train, validation_data=(x_val, dataset.y_val), epochs=spec["epochs"],
              batch_size=spec["batch_size"], verbose=2)
    evaluate_start = time.perf_counter()
    _, accuracy = model.evaluate(x_test, dataset.y_test, verbose=0)
    end = time.perf_counter()
    queue.put({"seconds": end - start, "data_seconds": build_start - start, "build_seconds": fit_start - build_start,
               "epoch_seconds": (evaluate_start - fit_start) / spec["epochs"], "evaluate_seconds": end - evaluate_start,
               "test_accuracy": float(accuracy), "peak_rss_mb": peak_rss_mb()})


def seed_suite_seconds(seed: dict, fits: int, evaluations: int, epochs: int) -> float:
    """The seed's suite from its baseline's measured parts: the data decoded once, then for each
    fit (a variant or a trial) the model built and trained `epochs` epochs, and each variant and
    the search's best model evaluated on the test images, as the notebook does. An underestimate:
    the conv head and the wider trial heads cost more per epoch than the baseline's."""
    return (seed["data_seconds"] + fits * (seed["build_seconds"] + epochs * seed["epoch_seconds"])
            + evaluations * seed["evaluate_seconds"])


@contextlib.contextmanager
def _throwaway_store():
    """A fresh MLflow store (and feature cache) in a temporary folder, removed afterwards: each
    holds the models its runs logged, about 60 MB a run."""
    import mlflow

    work = Path(tempfile.mkdtemp(prefix="tlkit-bench-"))
    os.chdir(work)
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    mlflow.search_experiments()  # a user's store exists already: its one-time table creation is not timed
    try:
        yield work
    finally:
        os.chdir(tempfile.gettempdir())
        shutil.rmtree(work, ignore_errors=True)


def tlkit_baseline(args, queue) -> None:
    """`tlkit train baseline`'s code path, MLflow logging included, into a throw-away store and cache."""
    from tlkit.train import train

    import keras  # noqa: F401 - imported before the clock starts, as in seed_way

    with _throwaway_store() as work:
        start = time.perf_counter()
        result = train("baseline", spec_for(args), cache_dir=str(work / "cache"))
        queue.put({"seconds": time.perf_counter() - start, "test_accuracy": result.test_accuracy,
                   "peak_rss_mb": peak_rss_mb()})


def tlkit_suite(args, variants, queue) -> None:
    """`tlkit suite --variants ...`'s code path: the children, the comparison, the promotion."""
    import mlflow

    from tlkit import suite

    import keras  # noqa: F401

    overrides = dict(data=args.data, weights=args.weights, limit=args.train_images, test_limit=args.test_images,
                     epochs=args.epochs, patience=0)
    with _throwaway_store() as work:
        start = time.perf_counter()
        result = suite.run_suite(variants, overrides, cache_dir=str(work / "cache"))
        seconds = time.perf_counter() - start
        per_variant = {}
        for row in result.rows:
            run = mlflow.get_run(row["run_id"]).info
            per_variant[row["variant"]] = {"seconds": (run.end_time - run.start_time) / 1000,
                                           "test_accuracy": row["test_accuracy"]}
        queue.put({"seconds": seconds, "per_variant": per_variant, "peak_rss_mb": peak_rss_mb()})


def feature_pass(args, queue) -> None:
    """The physical floor: one forward pass of the frozen base over every image."""
    import numpy as np

    from tlkit import data, models

    spec = spec_for(args)
    dataset = data.load(spec["data"], limit=spec["limit"], test_limit=spec["test_limit"], seed=spec["seed"])
    network = models.build(spec, len(dataset.class_names))
    images = np.concatenate([dataset.x_train, dataset.x_val, dataset.x_test])
    network.extractor.predict(images[:256], verbose=0)  # warm-up: graph tracing is not the pass
    start = time.perf_counter()
    network.extractor.predict(images, batch_size=128, verbose=0)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "images": len(images), "images_per_second": len(images) / seconds})


def in_child(target, *args):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    # Poll: a child killed outright (out of memory, a signal) never puts its result.
    while True:
        try:
            result = queue.get(timeout=1)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise SystemExit(f"{target.__name__} died with exit code {process.exitcode} before reporting")
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed with exit code {process.exitcode}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"),
                        help="an image folder with train/ and test/, or the shared CIFAR-10 .tar.gz")
    parser.add_argument("--weights", default="none", help="'none' here; 'imagenet' where it can be downloaded")
    parser.add_argument("--train-images", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-tune", action="store_true", help="leave the suite's search out")
    parser.add_argument("--skip-suite", action="store_true", help="time baseline only")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    extracted = None
    if args.data.endswith((".tar.gz", ".tgz")):
        extracted = Path(tempfile.mkdtemp(prefix="tlkit-cifar-"))
        with tarfile.open(args.data) as archive:
            archive.extractall(extracted, filter="data")
        args.data = str(next(p.parent for p in extracted.rglob("train") if (p.parent / "test").is_dir()))
    try:
        compare(args)
    finally:
        if extracted is not None:
            shutil.rmtree(extracted, ignore_errors=True)  # 60,000 JPEGs, ~170 MB


def compare(args) -> None:
    """Both ways, one child process each; prints the figures (and writes them to --json)."""
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; data {args.data}; "
          f"{args.train_images} train / {args.test_images} test images; {args.epochs} epochs; weights {args.weights}")
    floor = in_child(feature_pass, args)
    print(f"one forward pass of the base: {floor['images']} images in {floor['seconds']:.1f} s "
          f"({floor['images_per_second']:.0f} images/s)")
    seed = in_child(seed_way, args)
    print(f"seed's way, baseline: {seed['seconds']:.1f} s (data {seed['data_seconds']:.1f} s, build "
          f"{seed['build_seconds']:.1f} s, {seed['epoch_seconds']:.1f} s/epoch, test {seed['evaluate_seconds']:.1f} s), "
          f"test accuracy {100 * seed['test_accuracy']:.2f}%, peak RSS {seed['peak_rss_mb']:.0f} MB")
    ours = in_child(tlkit_baseline, args)
    print(f"tlkit way, baseline:  {ours['seconds']:.1f} s, test accuracy {100 * ours['test_accuracy']:.2f}%, "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB  (feature pass, training and MLflow logging included)")
    speedup = seed["seconds"] / ours["seconds"]
    gap = 100 * abs(seed["test_accuracy"] - ours["test_accuracy"])
    print(f"baseline: {speedup:.1f}x faster; accuracy gap {gap:.2f} points")
    results = {"args": vars(args), "feature_pass": floor, "seed_baseline": seed, "tlkit_baseline": ours,
               "baseline_speedup": speedup, "accuracy_gap_points": gap}

    if not args.skip_suite:
        from tlkit import tune

        tune_trials = 0 if args.no_tune else tune.load_search().max_trials  # the suite's search: the seed's 6 trials
        suite = in_child(tlkit_suite, args, FROZEN_SUITE + (["tune"] if tune_trials else []))
        # The seed's suite: 5 variants and a search of `tune_trials` trials on the full network,
        # each variant and the search's best model then evaluated, at the baseline's measured costs.
        seed_suite = seed_suite_seconds(seed, fits=len(FROZEN_SUITE) + tune_trials,
                                        evaluations=len(FROZEN_SUITE) + bool(tune_trials), epochs=args.epochs)
        print(f"frozen suite ({', '.join(FROZEN_SUITE)}{f', {tune_trials}-trial search' if tune_trials else ''}; "
              "compared and the best promoted):")
        print(f"  tlkit way {suite['seconds']:.1f} s measured; seed's way {seed_suite:.0f} s extrapolated; "
              f"{seed_suite / suite['seconds']:.1f}x faster; suite / one pass = {suite['seconds'] / floor['seconds']:.1f}; "
              f"peak RSS {suite['peak_rss_mb']:.0f} MB")
        for variant, row in suite["per_variant"].items():
            print(f"  {variant:10s} {row['seconds']:6.1f} s  test accuracy {100 * row['test_accuracy']:.2f}%")
        results.update(suite=suite, seed_suite_extrapolated_seconds=seed_suite,
                       suite_speedup=seed_suite / suite["seconds"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
