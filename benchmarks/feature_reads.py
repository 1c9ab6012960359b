"""A head trained on cached features held in memory (the path before bounded memory) against the
same features read from their files a batch at a time (sources.FeatureFile, the path now): seconds
per epoch and peak RSS, each way in a child process of its own, alternating, repeated.

The features are random (the head's arithmetic does not depend on their values) in the shapes of
real entries: VGG16's output at 32 px (1x1x512, 2 KB an image) and at 64 px (2x2x512, 8 KB), and
Xception's at 128 px (4x4x2048, 128 KB). The head is the seed's (Flatten, Dense 256, softmax).

    python benchmarks/feature_reads.py --images 45000 --shapes 1x1x512,2x2x512 --repeats 2
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere


def child(folder: str, way: str, epochs: int) -> dict:
    import types

    import keras
    import numpy as np

    from tlkit import features, models, spec as specs, train

    entry = features.FeatureCache(folder).read("bench" + "0" * 19)
    count = len(entry.pool) * 9 // 10
    entry.split(np.arange(count), np.arange(count, len(entry.pool)))
    if way == "memory":  # what the cache handed out before: every row in one array, then a tensor
        inputs = {"train": np.load(Path(folder) / ("bench" + "0" * 19) / "pool.npy")[:count],
                  "val": np.asarray(entry.val)}
    else:
        inputs = {"train": entry.train, "val": entry.val}
    rng = np.random.default_rng(0)
    labels = types.SimpleNamespace(y_train=keras.utils.to_categorical(rng.integers(0, 10, count), 10),
                                   y_val=keras.utils.to_categorical(rng.integers(0, 10, len(entry.val)), 10))
    spec = specs.load("baseline", {"weights": "none", "patience": 0})
    keras.utils.set_random_seed(0)
    head = models.head_model(spec, entry.pool.shape[1:], 10)
    started = time.perf_counter()
    train.fit(head, inputs, labels, spec, epochs=epochs, learning_rate=1e-3, on_features=True)
    seconds = time.perf_counter() - started
    return {"way": way, "s_per_epoch": seconds / epochs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=45000)
    parser.add_argument("--shapes", default="1x1x512,2x2x512")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return
    import numpy as np

    from tlkit import features

    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    results = []
    for text in args.shapes.split(","):
        shape = tuple(int(n) for n in text.split("x"))
        with tempfile.TemporaryDirectory() as folder:
            rng = np.random.default_rng(0)
            with features.FeatureCache(folder).writer("bench" + "0" * 19, {}, {"pool": args.images}) as entry:
                for start in range(0, args.images, 1000):
                    entry.append("pool", rng.normal(size=(min(1000, args.images - start), *shape)).astype("float32"))
            for repeat in range(args.repeats):
                for way in ("memory", "files"):
                    out = subprocess.run([sys.executable, __file__, "--child", folder, way, str(args.epochs)],
                                         env=env, capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(out.stderr[-3000:])
                    row = {"shape": text, "images": args.images, "repeat": repeat,
                           **json.loads(out.stdout.strip().splitlines()[-1])}
                    results.append(row)
                    print(f"{text} {args.images} images, {way:>6}: {row['s_per_epoch']:.2f} s/epoch, "
                          f"peak RSS {row['peak_rss_mb']:,.0f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
