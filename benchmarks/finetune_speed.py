"""Fine-tuning VGG16's block5 on cached block4_pool features: tlkit's training view against the
plain Keras way (TLKIT_PLAIN_KERAS=1), the same command, settings and seed otherwise.

    python benchmarks/finetune_speed.py --data /path/to/cifar10 --weights /abs/vgg16-imagenet-notop.weights.h5

Each run is `tlkit train finetune` in a child process on one warm feature cache (the first run
fills it and is not counted), early stopping off, the fine-tuning stage `--finetune-epochs` long.
The two ways alternate (fast, plain, fast, plain, ...) so the machine's drift falls on both.
An epoch's time is what Keras prints for it (steps x ms/step: the training steps and the epoch's
validation). This machine stalls now and then (both cores idle for 20-30 s inside an epoch, seen
with vmstat: 33 ms/step epochs became 58 ms/step ones in some runs, not in others), so the
summary gives each way's fastest and median epoch and the ratio of each. The test accuracies of
the two ways differ by float rounding grown through training: their gap is set beside the
binomial noise of the test set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_finetune(args, plain: bool, store: Path, cache: Path, experiment: str) -> dict:
    import mlflow

    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}", TLKIT_CACHE_DIR=str(cache),
               TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TLKIT_PLAIN_KERAS", None)
    if plain:
        env["TLKIT_PLAIN_KERAS"] = "1"
    command = [sys.executable, "-m", "tlkit.cli", "train", "finetune", "--data", args.data, "--weights", args.weights,
               "--epochs", str(args.head_epochs), "--finetune-epochs", str(args.finetune_epochs), "--patience", "0",
               "--limit", str(args.limit), "--experiment", experiment]
    started = time.perf_counter()
    printed = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    wall = time.perf_counter() - started
    # Keras's verbose=2 line per epoch: "1407/1407 - 46s - 33ms/step - accuracy: ..."; the last
    # finetune_epochs of them are the fine-tuning stage's.
    epochs = [(int(steps), float(per_step) / (1000 if unit == "ms" else 1e6))
              for steps, per_step, unit in re.findall(r"^(\d+)/\d+ - \d+s - ([\d.]+)(ms|us)/step", printed, re.M)]
    epoch_seconds = [steps * per_step for steps, per_step in epochs[-args.finetune_epochs:]]
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"],
                              output_format="list")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stage = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                 and r.data.tags.get("stage") == "finetune")
    client = mlflow.MlflowClient()
    val = [m.value for m in client.get_metric_history(stage.info.run_id, "val_accuracy")]
    loss = [m.value for m in client.get_metric_history(stage.info.run_id, "loss")]
    seconds = (stage.info.end_time - stage.info.start_time) / 1000
    return {"way": "plain" if plain else "fast", "epoch_seconds": epoch_seconds,
            "stage_seconds": seconds, "wall_seconds": wall, "test_accuracy": parent.data.metrics["test_accuracy"],
            "val_accuracy": val, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 image folder (extracted)")
    parser.add_argument("--weights", required=True, help="VGG16 no-top weights file (absolute path)")
    parser.add_argument("--pairs", type=int, default=2, help="fast/plain pairs to run")
    parser.add_argument("--head-epochs", type=int, default=1)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="training images (0 = all 45,000)")
    parser.add_argument("--cache-dir", help="a feature cache to reuse (default: a new one in a temporary folder)")
    parser.add_argument("--no-warm-up", action="store_true", help="skip the uncounted first run (a warm --cache-dir)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store, cache = Path(tmp) / "mlflow.db", Path(args.cache_dir or Path(tmp) / "cache")
        if not args.no_warm_up:
            print("warming the feature cache (not counted)", flush=True)
            run_finetune(argparse.Namespace(**{**vars(args), "finetune_epochs": 1, "head_epochs": 1}), False, store,
                         cache, "warm-up")
        results = []
        for pair in range(args.pairs):
            for plain in (False, True):
                result = run_finetune(args, plain, store, cache, f"pair{pair}-{'plain' if plain else 'fast'}")
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "loss"}), flush=True)

    fast = [r for r in results if r["way"] == "fast"]
    plain = [r for r in results if r["way"] == "plain"]
    fast_epochs = [e for r in fast for e in r["epoch_seconds"]]
    plain_epochs = [e for r in plain for e in r["epoch_seconds"]]
    accuracy = statistics.mean(r["test_accuracy"] for r in results)
    noise = (accuracy * (1 - accuracy) / 10000) ** 0.5
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "fast_epoch_seconds": [round(e, 1) for e in fast_epochs],
        "plain_epoch_seconds": [round(e, 1) for e in plain_epochs],
        "ratio_of_fastest_epochs": round(min(plain_epochs) / min(fast_epochs), 2),
        "ratio_of_median_epochs": round(statistics.median(plain_epochs) / statistics.median(fast_epochs), 2),
        "fast_test_accuracy": [r["test_accuracy"] for r in fast],
        "plain_test_accuracy": [r["test_accuracy"] for r in plain],
        "fast_val_accuracy": [r["val_accuracy"] for r in fast],
        "plain_val_accuracy": [r["val_accuracy"] for r in plain],
        "test_accuracy_sd_of_one_run_binomial": round(noise, 4),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
