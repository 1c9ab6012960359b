"""Fine-tuning VGG16's block5 on cached block4_pool features: tlkit's training view against the
plain Keras way (TLKIT_PLAIN_KERAS=1), the same command, settings and seed otherwise.

    python benchmarks/finetune_speed.py --data /path/to/cifar10 --weights /abs/vgg16-imagenet-notop.weights.h5

Each run is `tlkit train finetune` in a child process on one warm feature cache (the first run
fills it and is not counted), early stopping off, the fine-tuning stage `--finetune-epochs` long.
The two ways alternate (fast, plain, fast, plain, ...) so the machine's drift falls on both; each
pair gives a ratio. Seconds per epoch are the fine-tuning stage's nested run (its wall time over
its epochs: tracing, validation and the epoch-end callbacks included). The test accuracies of the
two ways differ by float rounding grown through training: their gap is compared with the binomial
noise of the test set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
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
    return {"way": "plain" if plain else "fast", "epoch_seconds": seconds / args.finetune_epochs,
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
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store, cache = Path(tmp) / "mlflow.db", Path(args.cache_dir or Path(tmp) / "cache")
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
    ratios = [p["epoch_seconds"] / f["epoch_seconds"] for f, p in zip(fast, plain)]
    n_test = 10000
    accuracy = statistics.mean(r["test_accuracy"] for r in results)
    noise = (accuracy * (1 - accuracy) / n_test) ** 0.5
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "fast_epoch_seconds": [round(r["epoch_seconds"], 1) for r in fast],
        "plain_epoch_seconds": [round(r["epoch_seconds"], 1) for r in plain],
        "ratios": [round(r, 2) for r in ratios],
        "fast_test_accuracy": [r["test_accuracy"] for r in fast],
        "plain_test_accuracy": [r["test_accuracy"] for r in plain],
        "test_accuracy_sd_of_one_run_binomial": round(noise, 4),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
