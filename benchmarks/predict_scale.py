"""Peak memory of `tlkit predict` on a folder, against the number of images.

`tlkit predict FOLDER --output FILE.csv` streams (tlkit/scoring.py): a batch of files is decoded,
answered and written before the next is read, so peak memory should not grow with the folder.
This makes 224-px folders of N images by upscaling the real CIFAR-10 JPEGs (benchmarks/streaming.py's
make_folder, the same folders), logs a MobileNetV3Small (weights none, its preprocessing inside,
at --image-size) as training logs a model, and runs the command under `/usr/bin/time -v` per size:
its peak RSS ("Maximum resident set size") and wall time.

    python benchmarks/predict_scale.py --sizes 2000,20000
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import CIFAR, make_folder  # noqa: E402  (the same 224-px folders as the pass's benchmark)


def extracted_cifar(archive: Path, work: Path) -> Path:
    if archive.is_dir():
        return archive
    import tarfile

    extracted = work / "cifar-src"
    if not (extracted / "cifar10").is_dir():
        extracted.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as opened:
            opened.extractall(extracted, filter="data")
    return extracted / "cifar10"


def model_folder(work: Path, size: int) -> Path:
    """A logged model's folder, as `tlkit download` leaves it."""
    folder = work / f"model-{size}"
    if (folder / "MLmodel").exists():
        return folder
    import mlflow
    import numpy as np

    from tlkit import models, spec as specs, tracking

    spec = dict(specs.DEFAULTS, base="MobileNetV3Small", weights="none", preprocess="base", image_size=size)
    network = models.build(spec, 10).full
    with tempfile.TemporaryDirectory() as store:
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        with mlflow.start_run():
            info = tracking.log_model(network, [str(i) for i in range(10)], np.zeros((1, size, size, 3), np.uint8),
                                      spec)
        mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder))
    return folder


def measure(model: Path, images: Path, output: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "tlkit.cli", "predict", "--model", str(model), str(images),
               "--output", str(output)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    with open(output) as f:
        rows = sum(1 for _ in f) - 1
    return {"peak_rss_mb": peak_kb / 1024, "seconds": seconds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,20000", help="numbers of images, comma-separated")
    parser.add_argument("--image-size", type=int, default=224, help="the images' and the network's size, px")
    parser.add_argument("--cifar", default=str(CIFAR), help="the CIFAR-10 JPEG archive or its extracted folder")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tlkit-streaming-bench"),
                        help="where the folders are made (kept for the next run; streaming.py's too)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cifar = extracted_cifar(Path(args.cifar), work)
    model = model_folder(work, args.image_size)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "?")
    print(f"MobileNetV3Small (weights none) at {args.image_size} px; {cpu}, {os.cpu_count()} cores", flush=True)
    for count in (int(n) for n in args.sizes.split(",")):
        folder = make_folder(cifar, work, count, args.image_size)
        result = measure(model, folder, work / f"answers-{count}.csv")
        print(f"{count:>6} images: peak RSS {result['peak_rss_mb']:,.0f} MB, {result['seconds']:.0f} s "
              f"({result['rows'] / result['seconds']:.0f} images/s), {result['rows']:,} rows written", flush=True)


if __name__ == "__main__":
    main()
