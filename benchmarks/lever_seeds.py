"""What the cheap levers buy, over seeds: the notebook's head, a wider head with dropout, and that
head with cached flips, each at --seeds, on full CIFAR-10 with the real weights at 32 px.

    python benchmarks/lever_seeds.py --data /path/to/cifar10 --weights /abs/vgg16-imagenet-notop.weights.h5 --seeds 1,2,3

A seed sets the validation split, the weights' initialisation and the batches, so each seed is its
own pass of the base (cached, shared by the seed's three runs). Prints each arm's test and
validation accuracy as mean ± sd over the seeds, and the paired differences (same seed, same split).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ARMS = {
    "notebook head": [],
    "Dense 1024 + dropout 0.5": ["--units", "1024", "--dropout", "0.5"],
    "Dense 1024 + dropout 0.5 + flips": ["--units", "1024", "--dropout", "0.5", "--flip"],
}


def main() -> None:
    import mlflow

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--image-size", default="32")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", TLKIT_CACHE_DIR=f"{tmp}/cache",
                   TF_CPP_MIN_LOG_LEVEL="2")
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        for seed in seeds:
            for arm, extra in ARMS.items():
                experiment = f"seed{seed}-{len(results[arm])}-{arm.replace(' ', '_').replace('+', 'and')}"
                subprocess.run([sys.executable, "-m", "tlkit.cli", "train", "baseline", "--data", args.data,
                                "--weights", args.weights, "--image-size", args.image_size, "--seed", str(seed),
                                "--experiment", experiment, *extra], env=env, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                run = mlflow.search_runs(experiment_names=[experiment], output_format="list")[0]
                metrics = run.data.metrics
                results[arm].append((metrics["test_accuracy"], metrics["val_accuracy_final"]))
                print(json.dumps({"seed": seed, "arm": arm, "test": metrics["test_accuracy"],
                                  "val": metrics["val_accuracy_final"]}), flush=True)

    def mean_sd(values):
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"

    print(f"\n{args.image_size} px, seeds {args.seeds}: test / validation accuracy (%), mean ± sd")
    first = list(ARMS)[0]
    for arm in ARMS:
        tests, vals = [t for t, _ in results[arm]], [v for _, v in results[arm]]
        line = f"| {arm} | {mean_sd(tests)} | {mean_sd(vals)} |"
        if arm != first:
            previous = list(ARMS)[list(ARMS).index(arm) - 1]
            gains = [a[0] - b[0] for a, b in zip(results[arm], results[previous])]
            line += f" {mean_sd(gains)} over {previous} (paired) |"
        print(line)


if __name__ == "__main__":
    main()
