"""The recipe search end to end under /usr/bin/time -v: wall time, peak RSS and every configuration.

    python benchmarks/recipe.py --data /tmp/cifar10 --budget 45m \
        --base VGG16,Xception --weights VGG16=/abs/vgg16.weights.h5,Xception=/abs/xception.weights.h5

Runs `tlkit recipe` from an empty store and an empty feature cache (a cold start, as a new user
has it) in a scratch folder, then writes JSON (default benchmarks/results/recipe-budget.json): the
command, the CPU (lscpu's model name), wall seconds, peak RSS, the budget, and per configuration
its rung, fidelity (limit, test_limit, epochs), estimated and actual seconds, validation and test
accuracy; the chosen one and what the budget left out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    found = re.search(r"Model name:\s*(.+)", out)
    return found.group(1).strip() if found else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--budget", default="45m")
    parser.add_argument("--base", default="VGG16")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "recipe-budget.json"))
    parser.add_argument("--keep-cache", action="store_true",
                        help="keep the scratch feature cache (every run starts cold; it held 27 GB after a two-base 45m run)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="tlkit-recipe-bench-"))
    # PYTHONPATH: this checkout's tlkit, whatever is installed.
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{scratch}/mlflow.db", TLKIT_CACHE_DIR=str(scratch / "cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "tlkit.cli", "recipe", "--data", args.data, "--base", args.base,
               "--weights", args.weights, "--budget", args.budget, "--output", str(scratch / "chosen.toml")]
    log_path = scratch / "recipe.log"  # the run's own output, to follow while it runs
    print(f"scratch {scratch}; following: tail -f {log_path}", flush=True)
    with open(log_path, "w") as log_file:
        done = subprocess.run(["/usr/bin/time", "-v", *command], env=env, cwd=scratch, stdout=log_file,
                              stderr=subprocess.STDOUT, text=True)
    output = log_path.read_text()
    cache = scratch / "cache"
    # The cache's size on disk is a cost too: the two-base 45m run filled the disk at 27 GB, and
    # old scratch caches had taken the rest (its last rungs failed on "No space left on device").
    cache_bytes = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        sys.exit(f"the recipe failed:\n{output[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", output).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", output).group(1))

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName = 'recipe'",
                                output_format="list")[0]
    load = lambda name: json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/{name}"))  # noqa: E731
    configurations = [{key: c.get(key) for key in ("rung", "name", "diff", "estimate", "seconds", "ended_at",
                                                   "val_accuracy", "test_accuracy", "val_accuracy_without_tta",
                                                   "error")}
                      for c in load("configurations.json")]
    result = {"command": " ".join(["tlkit", *command[3:]]), "cpu": cpu_model(), "cores": os.cpu_count(),
              "budget": args.budget, "wall_seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024),
              "cache_disk_mb": round(cache_bytes / 2**20),
              "chosen": parent.data.tags.get("best_configuration"),
              "best_val_accuracy": parent.data.metrics.get("best_val_accuracy"),
              "best_test_accuracy": parent.data.metrics.get("best_test_accuracy"),
              "configurations": configurations, "left_out": load("left_out.json")}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("configurations", "left_out")}, indent=1))


if __name__ == "__main__":
    main()
