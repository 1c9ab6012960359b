"""Compare runs: the variant runs of an experiment (or of one suite), best test accuracy first, each
with its 95% interval and, paired image by image with the best run, the difference and McNemar's p.

A test accuracy is a count of right answers on a finite test set: 60.87% on 10,000 images is
60.9 +- 1.0 points (Wilson's 95% interval). Runs tested on the same images (one dataset digest)
are compared image by image on the per-image predictions every run logs (stats.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging

from tlkit import runs, tracking
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


# --- compare ----------------------------------------------------------------------------------

def _best_val_accuracy(client, run) -> float | None:
    """The best epoch's val_accuracy; a fine-tuned run has its epochs in its stage runs."""
    import mlflow

    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    if not history:
        stages = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                    filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.stage != ''")
        history = [m for stage in stages for m in client.get_metric_history(stage.info.run_id, "val_accuracy")]
    return max((m.value for m in history), default=None)


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
        "best_val_accuracy": _best_val_accuracy(client, run),
        "epochs_run": int(metrics["epochs_run"]) if "epochs_run" in metrics else None,
        "duration_s": round((end - run.info.start_time) / 1000, 1) if end and run.info.start_time else None,
        "dataset": tags.get("dataset", ""),
        "dataset_digest": tags.get("dataset_digest", ""),
    }


def _rank(row: dict) -> tuple:
    # Best test accuracy first; runs without one (failed, running) last; ties: the earlier run id order.
    accuracy = row["test_accuracy"]
    return (accuracy is None, -(accuracy or 0.0), row["variant"], row["run_id"])


def compare(experiment: str | None = None, suite: str | None = None) -> list[dict]:
    """One row per variant run (COLUMNS), best test accuracy first. Each run with a test accuracy
    gets its Wilson 95% interval; each run on the best run's digest with per-image predictions, its
    difference from the best (a fraction, negative) and McNemar's exact p-value on the pairs."""
    import mlflow

    client = mlflow.MlflowClient()
    rows = sorted((_row(client, run) for run in runs.variant_runs(experiment, suite)), key=_rank)
    predictions = {r["run_id"]: tracking.load_predictions(r["run_id"]) for r in rows
                   if r["test_accuracy"] is not None}
    for row in rows:
        got = predictions.get(row["run_id"])
        if got is not None:
            row["test_accuracy_low"], row["test_accuracy_high"] = got.interval()
    best = next((r for r in rows if predictions.get(r["run_id"]) is not None), None)
    for row in rows if best is not None else []:
        got = predictions.get(row["run_id"])
        paired = predictions[best["run_id"]].paired_with(got) if got is not None else None
        if paired is not None:
            row["diff_vs_best"] = paired.gain
            row["p_vs_best"] = None if row is best else paired.p_value
    return rows


def render(rows: list[dict], fmt: str) -> str:
    """rows as an aligned table, CSV or JSON (the same rows, the same order)."""
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        return out.getvalue()
    if fmt != "table":
        raise RegistryError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    def cell(key, value):
        if value is None:
            return "-"
        if key in ("test_accuracy", "best_val_accuracy"):
            return f"{value:.4f}"
        if key == "dataset_digest":
            return value[:12]
        if key == "diff_vs_best":
            return f"{100 * value:+.2f}"
        if key == "p_vs_best":
            return f"{value:.3g}"
        return str(value)

    def ci(row):
        low, high = row["test_accuracy_low"], row["test_accuracy_high"]
        return "-" if low is None else f"{low:.4f}-{high:.4f}"

    shown = [c for c in COLUMNS if c not in ("test_accuracy_low", "test_accuracy_high")]
    at = shown.index("test_accuracy") + 1
    cells = [list(TABLE_HEADER)]
    for row in rows:
        line = [cell(k, row[k]) for k in shown]
        line.insert(at, ci(row))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_HEADER))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n" for line in cells)
