"""The fine-tuning levers side by side: the frozen head, the top block fine-tuned the first recipe's
way (constant rate, stopping on val_loss) and the recipe's way (cosine, stopping on val_accuracy),
the top two blocks, and the top block with cached flips in training (and test-time flips), on one
sample, one seed, one feature cache.

    python benchmarks/finetune_levers.py --data /path/to/cifar10 --weights /abs/vgg16-imagenet-notop.weights.h5 \
        --limit 10000 --json benchmarks/results/finetune-levers.json

Each arm is `tlkit train baseline` in a child process with the recipe's input and head (64 px, the
base's own preprocessing, Dense 1024 + dropout 0.5) and its own fine-tuning flags; the arms share
one store and one feature cache, so an arm's seconds hold its own pass only where its cache
boundary (block3_pool for two blocks, block4_pool for one) is new. The recipe chooses on
validation accuracy, so that is the column to compare; --limit samples the training images
(stratified; the validation split is taken from them), the test set stays whole.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD = ["--image-size", "64", "--preprocess", "base", "--units", "1024", "--dropout", "0.5", "--patience", "2"]
FINETUNE = ["--finetune-epochs", "4"]
ARMS = {
    "frozen head": [],
    "top1, constant rate, stops on val_loss (the first recipe's)":
        ["--unfreeze", "top1", *FINETUNE, "--finetune-schedule", "constant", "--monitor", "val_loss"],
    "top1, cosine, stops on val_accuracy (the recipe's)":
        ["--unfreeze", "top1", *FINETUNE, "--finetune-schedule", "cosine", "--monitor", "val_accuracy"],
    "top2, cosine, stops on val_accuracy":
        ["--unfreeze", "top2", *FINETUNE, "--finetune-schedule", "cosine", "--monitor", "val_accuracy"],
    "top1, cosine, val_accuracy, cached flips in training":
        ["--unfreeze", "top1", *FINETUNE, "--finetune-schedule", "cosine", "--monitor", "val_accuracy", "--flip"],
    "top1, cosine, val_accuracy, cached flips in training and test-time flips":
        ["--unfreeze", "top1", *FINETUNE, "--finetune-schedule", "cosine", "--monitor", "val_accuracy", "--flip",
         "--tta"],
}


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    found = re.search(r"Model name:\s*(.+)", out)
    return found.group(1).strip() if found else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--limit", type=int, default=10000, help="training images (stratified); 0 = all")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()

    import mlflow

    rows = []
    with tempfile.TemporaryDirectory(prefix="tlkit-finetune-levers-") as tmp:
        # PYTHONPATH: this checkout's tlkit, whatever is installed.
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", TLKIT_CACHE_DIR=f"{tmp}/cache",
                   TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                               os.environ.get("PYTHONPATH", "")]))
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        for number, (arm, extra) in enumerate(ARMS.items()):
            experiment = f"arm{number}"
            command = [sys.executable, "-m", "tlkit.cli", "train", "baseline", "--data", args.data,
                       "--weights", args.weights, "--limit", str(args.limit), "--experiment", experiment,
                       *HEAD, *extra]
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"{arm} failed:\n{done.stderr[-3000:]}")
            # The arm's own run: fine-tuning's two stages are nested runs under it.
            [run] = [r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")
                     if "mlflow.parentRunId" not in r.data.tags]
            metrics = run.data.metrics
            row = {"arm": arm, "flags": [*HEAD, *extra], "seconds": round(seconds, 1),
                   "val_accuracy": metrics["val_accuracy_final"], "test_accuracy": metrics["test_accuracy"],
                   "val_accuracy_without_tta": metrics.get("val_accuracy_without_tta"),
                   "test_accuracy_without_tta": metrics.get("test_accuracy_without_tta")}
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nVGG16, {args.limit or 'all'} training images, {cpu_model()}")
    print("| arm | s | val acc | test acc |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['arm']} | {row['seconds']:,.0f} | {100 * row['val_accuracy']:.2f}% "
              f"| {100 * row['test_accuracy']:.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "cpu": cpu_model(),
                                               "cores": os.cpu_count(), "limit": args.limit, "rows": rows},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
