"""Compare runs: the variant runs of an experiment (or of one suite), best test accuracy first, each
with its 95% interval and, paired image by image with the best run, the difference and McNemar's p.

A test accuracy is a count of right answers on a finite test set: 60.87% on 10,000 images is
60.9 +- 1.0 points (Wilson's 95% interval). Runs tested on the same images (one dataset digest)
are compared image by image on the per-image predictions every run logs (stats.py).

A variant repeated at several seeds (tlkit/repeats.py) is one row, its parent run's: the mean test
accuracy over its seeds, ranked on that, with the 95% t-interval across seeds, the sd and the
number of seeds; its seeds are paired with the best row's seed by seed (seed k with seed k) and
the p is the stratified McNemar test over those pairings (stats.Stratified: Cochran-Mantel-Haenszel,
exact), with the smallest p its disagreements could give. A single run is a row of one seed, and
two single runs get McNemar's exact test as before. Without repeated variants the columns and
values are those of before repeats.
"""

from __future__ import annotations

import csv
import io
import json
import logging

from tlkit import runs, stats, tracking
from tlkit.runs import RegistryError

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json")
# Columns of `compare`, in order; the table prints the first 12 characters of the digest and the
# interval and the comparison with the best run in three cells of their own.
COLUMNS = ("variant", "run_id", "status", "test_accuracy", "test_accuracy_low", "test_accuracy_high",
           "diff_vs_best", "p_vs_best", "best_val_accuracy", "epochs_run", "duration_s", "dataset", "dataset_digest")
# The table's header: the interval in one cell, the difference from the best in points.
TABLE_HEADER = ("variant", "run_id", "status", "test_accuracy", "95%_interval", "vs_best_pts", "p_mcnemar",
                "best_val_accuracy", "epochs_run", "duration_s", "dataset", "dataset_digest")
# With a repeated variant among the rows: the sd and number of seeds beside the interval, and the
# smallest p the pairing's disagreements could give beside the (stratified) p.
REPEAT_COLUMNS = ("variant", "run_id", "status", "test_accuracy", "test_accuracy_low", "test_accuracy_high",
                  "test_accuracy_sd", "seeds", "diff_vs_best", "p_vs_best", "p_smallest", "best_val_accuracy",
                  "epochs_run", "duration_s", "dataset", "dataset_digest")
REPEAT_TABLE_HEADER = ("variant", "run_id", "status", "test_accuracy", "95%_interval", "sd", "seeds", "vs_best_pts",
                       "p_cmh", "p_floor", "best_val_accuracy", "epochs_run", "duration_s", "dataset", "dataset_digest")


# --- compare ----------------------------------------------------------------------------------

def _row(client, run) -> dict:
    metrics, tags = run.data.metrics, run.data.tags
    end = run.info.end_time
    return {
        "variant": tags.get("variant", ""),
        "run_id": run.info.run_id,
        "status": run.info.status,
        "test_accuracy": metrics.get("test_accuracy"),
        "test_accuracy_low": None,
        "test_accuracy_high": None,
        "diff_vs_best": None,
        "p_vs_best": None,
        "best_val_accuracy": runs.best_val_accuracy(client, run),
        "epochs_run": int(metrics["epochs_run"]) if "epochs_run" in metrics else None,
        "duration_s": round((end - run.info.start_time) / 1000, 1) if end and run.info.start_time else None,
        "dataset": tags.get("dataset", ""),
        "dataset_digest": tags.get("dataset_digest", ""),
    }


def _rank(row: dict) -> tuple:
    # Best test accuracy first; runs without one (failed, running) last; ties: the earlier run id order.
    accuracy = row["test_accuracy"]
    return (accuracy is None, -(accuracy or 0.0), row["variant"], row["run_id"])


def _repeated_row(client, run, seeds: list) -> dict:
    """A repeated variant's row: its parent's aggregate (none while, or if, the parent did not
    finish its seeds), the number of its finished seeds."""
    row = _row(client, run)
    metrics = run.data.metrics
    row.update(test_accuracy=metrics.get("test_accuracy_mean"), test_accuracy_low=metrics.get("test_accuracy_ci_low"),
               test_accuracy_high=metrics.get("test_accuracy_ci_high"), test_accuracy_sd=metrics.get("test_accuracy_sd"),
               best_val_accuracy=metrics.get("val_accuracy_mean"), epochs_run=None, seeds=len(seeds))
    return row


def seed_predictions(run, seeds: list | None) -> dict:
    """A row's per-image test predictions by seed index (None for a seed without them); a single
    run's is that of seed 0."""
    if seeds is None:
        return {0: tracking.load_predictions(run.info.run_id)}
    return {int(seed.data.tags[runs.REPEAT]): tracking.load_predictions(seed.info.run_id) for seed in seeds}


def pair_seeds(best: dict, other: dict) -> stats.Stratified | None:
    """`other` against `best` seed by seed (seed index k with seed index k, for the indices both
    finished), each pairing a stratum where both were scored on the same test images; None if none is."""
    both = sorted(set(best) & set(other))
    return stats.stratify(best[k].paired_with(other[k]) if best[k] is not None and other[k] is not None else None
                          for k in both)


def finished_seeds(parent) -> list:
    """A repeated variant's FINISHED seed runs that logged a test accuracy, in seed order."""
    return [s for s in runs.seed_runs(parent) if s.info.status == "FINISHED" and "test_accuracy" in s.data.metrics]


def compare(experiment: str | None = None, suite: str | None = None) -> list[dict]:
    """One row per variant run (COLUMNS; REPEAT_COLUMNS when a repeated variant is among them),
    best test accuracy first. Each run with a test accuracy gets its Wilson 95% interval (a
    repeated variant: the t-interval of its mean across seeds); each run on the best run's digest
    with per-image predictions, its difference from the best (a fraction, negative; averaged over
    the seed pairings) and the exact p of McNemar's test on the pairs (stratified over the seed
    pairings, stats.Stratified)."""
    import mlflow

    client = mlflow.MlflowClient()
    found = runs.variant_runs(experiment, suite)
    seeds = {run.info.run_id: finished_seeds(run) for run in found if runs.is_repeated(run)}
    by_id = {run.info.run_id: run for run in found}
    rows = sorted((_repeated_row(client, run, seeds[run.info.run_id]) if run.info.run_id in seeds else _row(client, run)
                   for run in found), key=_rank)
    predictions = {r["run_id"]: seed_predictions(by_id[r["run_id"]], seeds.get(r["run_id"])) for r in rows
                   if r["test_accuracy"] is not None}
    for row in rows:
        got = predictions.get(row["run_id"])
        if got is not None and row["run_id"] not in seeds and got[0] is not None:
            row["test_accuracy_low"], row["test_accuracy_high"] = got[0].interval()
    best = next((r for r in rows if any(p is not None for p in predictions.get(r["run_id"], {}).values())), None)
    repeated = bool(seeds)
    for row in rows:
        if repeated:
            row.setdefault("test_accuracy_sd", None)
            row.setdefault("seeds", 1)
            row["p_smallest"] = None
        got = predictions.get(row["run_id"])
        paired = pair_seeds(predictions[best["run_id"]], got) if best is not None and got is not None else None
        if paired is not None:
            row["diff_vs_best"] = paired.gain
            row["p_vs_best"] = None if row is best else paired.p_value
            if repeated and row is not best:
                row["p_smallest"] = paired.smallest_p
    return rows


def render(rows: list[dict], fmt: str) -> str:
    """rows as an aligned table, CSV or JSON (the same rows, the same order)."""
    repeated = bool(rows) and "seeds" in rows[0]
    columns, header = (REPEAT_COLUMNS, REPEAT_TABLE_HEADER) if repeated else (COLUMNS, TABLE_HEADER)
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        return out.getvalue()
    if fmt != "table":
        raise RegistryError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    def cell(key, value):
        if value is None:
            return "-"
        if key in ("test_accuracy", "best_val_accuracy", "test_accuracy_sd"):
            return f"{value:.4f}"
        if key == "dataset_digest":
            return value[:12]
        if key == "diff_vs_best":
            return f"{100 * value:+.2f}"
        if key in ("p_vs_best", "p_smallest"):
            return f"{value:.3g}"
        return str(value)

    def ci(row):
        low, high = row["test_accuracy_low"], row["test_accuracy_high"]
        return "-" if low is None else f"{low:.4f}-{high:.4f}"

    shown = [c for c in columns if c not in ("test_accuracy_low", "test_accuracy_high")]
    at = shown.index("test_accuracy") + 1
    cells = [list(header)]
    for row in rows:
        line = [cell(k, row[k]) for k in shown]
        line.insert(at, ci(row))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n" for line in cells)
