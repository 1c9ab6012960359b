"""The notebook's frozen variants at 3 seeds each: mean test accuracy with its 95% t-interval across
seeds, and which differences the stratified McNemar test (CMH over the seed pairings, exact) calls
real, from one `tlkit suite --repeats` on the shared CIFAR-10 with the real ImageNet weights.

    python benchmarks/repeats.py --data /tmp/cifar10 --weights /abs/vgg16-imagenet-notop.weights.h5

One `tlkit suite --variants baseline,conv_head,l2,sgd,dropout --repeats 3 --no-promote` process, as a
user runs it, on a tracking store and feature cache of its own (a temporary folder) that start
empty; its wall time and peak RSS (os.wait4) are its own. Then `tlkit compare`'s rows for the
suite (tlkit.compare.compare), each seed's test accuracy, and a markdown table for
docs/repeats.md. --limit / --test-limit / --epochs make a quick check of the script on a sample.
Writes --json (default benchmarks/results/repeats.json) with the command, the CPU (lscpu's model
name, the core count) and the versions beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = "baseline,conv_head,l2,sgd,dropout"
SIGNIFICANCE = 0.05


def cpu() -> str:
    """lscpu's model name and this machine's CPU count."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown CPU")
    return f"{model}, {os.cpu_count()} CPUs"


def versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("tensorflow", "keras", "mlflow", "numpy")}


def run_suite(args, env: dict) -> tuple[list[str], float, float, str]:
    """The suite as a process of its own: (command, wall seconds, peak RSS in MB, its output)."""
    command = [sys.executable, "-m", "tlkit.cli", "suite", "--variants", args.variants, "--repeats",
               str(args.repeats), "--data", args.data, "--weights", args.weights, "--experiment", "repeats",
               "--no-promote"]
    for option in ("limit", "test_limit", "epochs"):
        if getattr(args, option):
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS
        seconds = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"the suite failed ({os.waitstatus_to_exitcode(status)}):\n{output[-3000:]}")
    return command, seconds, usage.ru_maxrss / 1024, output


def rows_of(experiment: str) -> list[dict]:
    """compare's rows of the suite, each with its seeds' own test accuracies."""
    import mlflow

    from tlkit import compare, runs

    [suite] = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.suite_variants != ''",
                                 output_format="list")
    rows = compare.compare(experiment, suite.info.run_id)
    for row in rows:
        parent = mlflow.get_run(row["run_id"])
        row["seed_test_accuracies"] = {s.data.tags[runs.REPEAT_SEED]: s.data.metrics.get("test_accuracy")
                                       for s in runs.seed_runs(parent)}
        row["real_difference"] = row["p_vs_best"] is not None and row["p_vs_best"] < SIGNIFICANCE
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | mean test accuracy | 95% t-interval | sd (points) | seeds | vs best (points) | "
             "p (stratified McNemar) | smallest p | real at 0.05 |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        p = "-" if r["p_vs_best"] is None else f"{r['p_vs_best']:.3g}"
        floor = "-" if r.get("p_smallest") is None else f"{r['p_smallest']:.2g}"
        real = "best" if r["p_vs_best"] is None else ("yes" if r["real_difference"] else "no")
        lines.append(f"| {r['variant']} | {100 * r['test_accuracy']:.2f}% | {100 * r['test_accuracy_low']:.2f}-"
                     f"{100 * r['test_accuracy_high']:.2f}% | {100 * r['test_accuracy_sd']:.2f} | {r['seeds']} | "
                     f"{100 * (r['diff_vs_best'] or 0):+.2f} | {p} | {floor} | {real} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the extracted CIFAR-10 folder")
    parser.add_argument("--weights", required=True, help="VGG16 no-top ImageNet weights (absolute path)")
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="training images (0 = all): for a quick check")
    parser.add_argument("--test-limit", type=int, default=0, help="test images (0 = all): for a quick check")
    parser.add_argument("--epochs", type=int, default=0, help="epochs (0 = each variant's): for a quick check")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "repeats.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", TLKIT_CACHE_DIR=f"{tmp}/cache",
                   TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                       os.environ.get("PYTHONPATH")])))
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        command, seconds, rss, _ = run_suite(args, env)
        rows = rows_of("repeats")

    result = {"command": " ".join(["tlkit", *command[3:]]), "cpu": cpu(), "versions": versions(),
              "wall_s": round(seconds, 1), "peak_rss_mb": round(rss), "significance": SIGNIFICANCE,
              "test": "stratified McNemar (Cochran-Mantel-Haenszel over the seed pairings), exact conditional p",
              "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['command']}\n{result['cpu']}; {seconds / 60:.1f} min, peak RSS {rss:.0f} MB\n")
    print(table(rows))
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
