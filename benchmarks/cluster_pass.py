"""The base's pass in images/s, three ways over the same image files, in one run: in one process
with the images decoded into memory first (the pass before streaming), the streaming pass
(features.FeatureCache.get: tf.data decodes batches in parallel as the base runs), and Ray Data's
local mode with 2 workers (cluster.RayPass: 2 actors, each decoding its batches and running its
own copy of the base).

    python benchmarks/cluster_pass.py --images 2000 --repeats 3

The images: the first --images of the shared CIFAR-10 training JPEGs (../shared/data, the
archive extracted once into --source), upscaled to 224 px and saved as JPEG (quality 90), made
once into --work. The base: MobileNetV3Small at 224 px, weights 'none' (the speed does not
depend on the weights), its own preprocessing, batch features.PASS_BATCH. Every pass writes a
fresh cache entry (a miss), so each way is timed as `tlkit features` runs it, entry included.
The ways alternate within each repeat after one warm-up pass each. Each way's whole pass is
timed, Ray's including starting its actors (TensorFlow's import and the base's build in each), and
so is a pass over the first --small images: (images - small) / (whole - small pass) is the rate
once the fixed costs are paid, which a long pass approaches. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SIZE = 224


def make_images(source: Path, work: Path, count: int) -> list[str]:
    """count CIFAR-10 training JPEGs (round robin over the classes) upscaled to SIZE px, made once."""
    from PIL import Image

    if not (source / "cifar10" / "train").is_dir():
        source.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(ARCHIVE), "-C", str(source)], check=True)
    classes = sorted(p for p in (source / "cifar10" / "train").iterdir() if p.is_dir())
    files = [sorted(c.iterdir()) for c in classes]
    chosen = [files[i % len(classes)][i // len(classes)] for i in range(count)]
    out = work / f"{SIZE}px"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, path in enumerate(chosen):
        target = out / f"{i:06d}.jpg"
        if not target.exists():
            with Image.open(path) as image:
                image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR).save(target, quality=90)
        paths.append(str(target))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--small", type=int, default=256, help="images of the short pass (the fixed costs)")
    parser.add_argument("--source", type=Path, default=Path("/tmp/cifar-src"), help="where the archive is extracted")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlkit-cluster-bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import ray

    from tlkit import cluster, features, models, spec as specs
    from tlkit.data import ImageFiles

    paths = make_images(args.source, args.work, args.images)
    files = ImageFiles(np.array(paths, dtype=object), SIZE)
    spec = specs.load("baseline", {"base": "MobileNetV3Small", "weights": "none", "preprocess": "base",
                                   "image_size": SIZE})
    network = models.build(spec, 10)
    fields = features.key_fields(spec, "benchmark", network.boundary)
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env=cluster.runtime_env())
    pass_number = iter(range(10**6))

    def seconds(way: str, count: int) -> float:
        """One pass of `way` over the first `count` images into a fresh entry, as `tlkit features` runs it."""
        cache = features.FeatureCache(args.work / "cache" / f"{way}-{next(pass_number)}")
        engine = cluster.RayPass(spec, 10, "local", args.workers, 0.0, 1.0, cluster.RETRIES,
                                 cluster.BaseWorker) if way == "ray" else features.LocalPass()
        images = files.take(np.arange(count))
        started = time.perf_counter()
        if way == "in memory":
            images = np.asarray(images)  # decoded in this process, one image after another
        cache.get(fields, network.extractor, {"train": images}, engine=engine)
        took = time.perf_counter() - started
        shutil.rmtree(cache.root)  # 113 KB of features an image (7x7x576 float32): a repeat's entries fill /tmp
        return took

    ways = ("in memory", "streaming", "ray")
    for way in ways:  # warm-up: the extractor's trace, the page cache, Ray's worker pool
        seconds(way, args.small)
    rates = {way: [] for way in ways}
    for repeat in range(args.repeats):
        for way in ways:
            small, whole = seconds(way, args.small), seconds(way, args.images)
            rates[way].append((args.images / whole, (args.images - args.small) / (whole - small)))
            print(f"repeat {repeat + 1}, {way}: {whole:.1f} s, {args.images / whole:.1f} images/s whole pass; "
                  f"{args.small} images {small:.1f} s, {rates[way][-1][1]:.1f} images/s beyond them", flush=True)
    ray.shutdown()
    median = {way: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
              for way, rs in rates.items()}
    print(f"\n{args.images} images at {SIZE} px, MobileNetV3Small (weights none), {os.cpu_count()} CPUs, "
          f"medians of {args.repeats}:")
    for way in ways:
        whole, steady = median[way]
        print(f"  {way:10s} {whole:7.1f} images/s whole pass ({whole / median['streaming'][0]:.2f}x streaming), "
              f"{steady:7.1f} beyond the first {args.small} ({steady / median['streaming'][1]:.2f}x)")


if __name__ == "__main__":
    main()
