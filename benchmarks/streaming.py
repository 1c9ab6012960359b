"""Peak memory of the base's pass over a 224-px image folder, against the number of images.

An image folder is streamed (tlkit/stream.py): loading scans the files once for the digest and
unreadable files, and the pass decodes a few batches at a time and appends their features to the
cache entry as they come (features.py). So peak memory should not grow with the folder beyond
the features themselves, which the pass writes to disk and does not hold.

This makes 224-px folders of N images by upscaling the real CIFAR-10 JPEGs (90% train, 10% test,
every class alike), then runs the pass a run makes (train.load_dataset, models.build,
train.frozen_features: what `tlkit train` does before the head trains) in a child process per
size, and reports each child's peak RSS (ru_maxrss) and images/s. --checkout runs the same child
against another checkout of tlkit (say the commit before streaming) for the before figure.

    python benchmarks/streaming.py --sizes 5000,40000            # MobileNetV3Small, weights none
    python benchmarks/streaming.py --sizes 5000 --checkout /tmp/tlkit-before
    python benchmarks/streaming.py --sizes 2000,20000 --train --json benchmarks/results/streaming-train.json

--train runs the whole `tlkit train baseline` instead (the pass, three epochs of the head on the
cached features read from disk, scoring, the logged model): its peak RSS should stay flat too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _upscale(job):
    source, target, size = job
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(target, quality=90)


def make_folder(cifar: Path, root: Path, count: int, size: int) -> Path:
    """root/N: count images at size px, 90% train and 10% test, the same number per class."""
    folder = root / f"{count}"
    if (folder / ".complete").exists():
        return folder
    classes = sorted(p.name for p in (cifar / "train").iterdir())
    per_class = {"train": count * 9 // 10 // len(classes), "test": count // 10 // len(classes)}
    jobs = []
    for split, n in per_class.items():
        for name in classes:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            sources = sorted((cifar / split / name).iterdir())[:n]
            if len(sources) < n:
                raise SystemExit(f"{cifar / split / name}: {len(sources)} images, {n} needed")
            jobs += [(s, folder / split / name / s.name, size) for s in sources]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_upscale, jobs, chunksize=256))
    (folder / ".complete").touch()
    return folder


def child(folder: str, base: str, size: int, cache: str, whole: bool = False) -> dict:
    """The pass a run makes before its head trains, in this process: peak RSS and time. whole: the
    whole `tlkit train baseline` (the pass, the head's epochs on the cached features, the scoring and
    the logged model) into a scratch MLflow store: the run's peak RSS."""
    from tlkit import models, spec as specs, train

    spec = specs.load("baseline", {"data": folder, "base": base, "weights": "none", "image_size": size,
                                    "preprocess": "base", "epochs": 3, "patience": 0})
    if whole:
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{cache}/mlflow.db")
        started = time.perf_counter()
        result = train.train("baseline", spec, cache_dir=cache)
        return {"images": None, "whole_run_s": time.perf_counter() - started, "test_accuracy": result.test_accuracy,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    started = time.perf_counter()
    dataset = train.load_dataset(spec)
    loaded = time.perf_counter()
    network = models.build(spec, len(dataset.class_names))
    got = train.frozen_features(network, dataset, spec, cache)
    done = time.perf_counter()
    images = len(dataset.x_train) + len(dataset.x_val) + len(dataset.x_test)
    return {"images": images, "load_s": loaded - started, "pass_s": done - loaded,
            "pass_images_per_s": images / (done - loaded), "feature_bytes_per_image": int(got.train[0].nbytes),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,40000", help="numbers of images, comma-separated")
    parser.add_argument("--base", default="MobileNetV3Small")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cifar", default=str(CIFAR), help="the CIFAR-10 JPEG archive or its extracted folder")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tlkit-streaming-bench"),
                        help="where the folders are made (kept for the next run)")
    parser.add_argument("--checkout", default=str(REPO), help="the tlkit checkout the pass runs from")
    parser.add_argument("--train", action="store_true",
                        help="the whole `tlkit train baseline` (3 epochs of the head), not the pass alone")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "BASE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as cache:
            print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), cache, args.train)))
        return

    work = Path(args.work)
    cifar = Path(args.cifar)
    if cifar.is_file():
        import tarfile

        extracted = work / "cifar-src"
        if not (extracted / "cifar10").is_dir():
            extracted.mkdir(parents=True, exist_ok=True)
            with tarfile.open(cifar) as archive:
                archive.extractall(extracted, filter="data")
        cifar = extracted / "cifar10"
    env = {**os.environ, "PYTHONPATH": args.checkout, "TF_CPP_MIN_LOG_LEVEL": "2"}
    print(f"checkout {args.checkout}, base {args.base} (weights none), {args.image_size} px", flush=True)
    results = []
    for count in (int(n) for n in args.sizes.split(",")):
        started = time.perf_counter()
        folder = make_folder(cifar, work, count, args.image_size)
        made = time.perf_counter() - started
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), args.base, str(args.image_size),
                              *(["--train"] if args.train else [])], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append({"images": count, "base": args.base, "image_size": args.image_size, **result,
                        "images_in_folder": count})
        if args.train:
            print(f"{count:>6} images: the whole train run {result['whole_run_s']:.0f} s, peak RSS "
                  f"{result['peak_rss_mb']:,.0f} MB (test accuracy {result['test_accuracy']:.3f})", flush=True)
            continue
        print(f"{count:>6} images (folder made in {made:.0f} s): peak RSS {result['peak_rss_mb']:,.0f} MB, "
              f"load {result['load_s']:.0f} s, pass {result['pass_s']:.0f} s "
              f"({result['pass_images_per_s']:.0f} images/s), features {result['feature_bytes_per_image']:,} "
              "bytes per image", flush=True)

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu": _cpu(), "results": results}, indent=1))


def _cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


if __name__ == "__main__":
    main()
