"""The notebook's table, reproduced: every variant on the full shared CIFAR-10 with the real ImageNet
weights, the notebook's test accuracy beside tlkit's, wall time and peak RSS per variant.

    python benchmarks/notebook_table.py --data /path/to/cifar10 --weights /abs/vgg16-imagenet-notop.weights.h5

Each variant is its own `tlkit train` (or `tlkit tune`) process, as a user runs it, on one feature
cache that starts empty: finetune runs first and makes the one pass of the base (its block4_pool
features and the base's output derived from them), the frozen variants read it, augment adds the
pass over the mirrored training images. Peak RSS is each process's own (os.wait4). augment_exact
(the seed's random flip and translation, the whole network every epoch) is left out unless asked
for with --with-exact: on 2 CPU cores about 35 minutes for its 10 epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The notebook's figures (test accuracy on CIFAR-10, ImageNet weights, its own runs).
NOTEBOOK = {"baseline": 0.6087, "conv_head": 0.6154, "l2": 0.5374, "tune": 0.6004}
ORDER = ["finetune", "baseline", "conv_head", "l2", "sgd", "dropout", "tune", "augment"]


def run_variant(variant: str, args, env: dict, experiment: str) -> dict:
    import mlflow

    if variant == "tune":
        command = [sys.executable, "-m", "tlkit.cli", "tune", "--max-trials", "6"]
    else:
        command = [sys.executable, "-m", "tlkit.cli", "train", variant]
    command += ["--data", args.data, "--weights", args.weights, "--experiment", experiment]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise SystemExit(f"{variant} failed ({os.waitstatus_to_exitcode(status)}):\n{log.read()[-3000:]}")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    top = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    return {"variant": variant, "test_accuracy": top.data.metrics["test_accuracy"],
            "val_accuracy_final": top.data.metrics.get("val_accuracy_final"), "seconds": seconds,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "feature_cache": top.data.tags.get("feature_cache", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the extracted CIFAR-10 folder")
    parser.add_argument("--weights", required=True, help="VGG16 no-top ImageNet weights (absolute path)")
    parser.add_argument("--variants", default=",".join(ORDER))
    parser.add_argument("--with-exact", action="store_true", help="also augment_exact (about 35 min on 2 cores)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    variants = args.variants.split(",") + (["augment_exact"] if args.with_exact else [])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", TLKIT_CACHE_DIR=f"{tmp}/cache",
                   TF_CPP_MIN_LOG_LEVEL="2")
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        for variant in variants:
            row = run_variant(variant, args, env, "notebook-table")
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| variant | notebook | tlkit | gap (points) | wall time | peak RSS | feature cache |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        seed = NOTEBOOK.get(row["variant"])
        gap = f"{100 * (row['test_accuracy'] - seed):+.2f}" if seed else ""
        print(f"| {row['variant']} | {f'{100 * seed:.2f}%' if seed else '—'} | {100 * row['test_accuracy']:.2f}% | "
              f"{gap} | {row['seconds']:.0f} s | {row['peak_rss_mb']:,.0f} MB | {row['feature_cache']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
