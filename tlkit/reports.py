"""Reports of a trained model, written as files: confusion matrix, per-class scores, curves.

Each function takes plain arrays and writes into a folder, so the same reports serve every
variant, the tuner's best trial and the benchmarks; tracking.py logs the folder to the run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def metric_safe(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and space; class names may hold anything."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, class_names) -> dict:
    from sklearn.metrics import classification_report as sk_report

    return sk_report(y_true, y_pred, labels=list(range(len(class_names))), target_names=list(class_names),
                     output_dict=True, zero_division=0)


def per_class_metrics(report: dict, class_names) -> dict[str, float]:
    """test_precision_<class>, test_recall_<class>, test_f1_<class> for every class."""
    metrics = {}
    for name in class_names:
        row = report[name]
        for key, short in (("precision", "precision"), ("recall", "recall"), ("f1-score", "f1")):
            metrics[f"test_{short}_{metric_safe(name)}"] = float(row[key])
    return metrics


def confusion_matrix_png(y_true, y_pred, class_names, path: Path) -> None:
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(class_names))))
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black", fontsize=8)
    ax.set_title(f"confusion matrix (test, {int(matrix.sum())} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_curves_png(history: dict[str, list[float]], path: Path, stage_starts: list[int] = ()) -> None:
    """Loss and accuracy per epoch, train and validation; dashed lines where a stage begins."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(key, [])
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
        for start in stage_starts:
            ax.axvline(start + 0.5, color="grey", linestyle="--")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_class_comparison_png(rows: list[dict], path: Path, title: str) -> None:
    """Per-class accuracy of two models side by side: rows of {class, champion, candidate}."""
    plt = _pyplot()
    names = [r["class"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 2), 4))
    ax.bar(x - 0.2, [r["champion"] for r in rows], 0.4, label="champion", color="tab:gray")
    ax.bar(x + 0.2, [r["candidate"] for r in rows], 0.4, label="candidate", color="tab:blue")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy of the class")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(folder: Path, y_true, probabilities, class_names, history, stage_starts=()) -> dict[str, float]:
    """Write every report into folder; return the per-class metrics to log."""
    folder.mkdir(parents=True, exist_ok=True)
    y_pred = np.asarray(probabilities).argmax(axis=1)
    report = classification_report(y_true, y_pred, class_names)
    (folder / "classification_report.json").write_text(json.dumps(report, indent=1))
    confusion_matrix_png(y_true, y_pred, class_names, folder / "confusion_matrix.png")
    training_curves_png(history, folder / "training_curves.png", list(stage_starts))
    return per_class_metrics(report, class_names)
