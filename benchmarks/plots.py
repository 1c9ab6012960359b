"""The documentation's figures, drawn from the benchmarks' recorded results (PNG, into docs/images).

Reads JSON only, so it runs in a second and redraws the same figures from the same files:
- benchmarks/results/notebook_table.json: the rows `benchmarks/notebook_table.py --json` writes
  (give a new run's file with --notebook-table);
- benchmarks/results/recipe.json and cluster_pass.json: the figures `tlkit recipe` and
  `benchmarks/cluster_pass.py` printed (neither writes JSON), copied from their runs' output with
  the command and the hardware they ran on.

    python benchmarks/plots.py [--out docs/images] [--notebook-table rows.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The notebook's own test accuracies (benchmarks/notebook_table.py's NOTEBOOK, the seed's figures).
NOTEBOOK = {"baseline": 0.6087, "conv_head": 0.6154, "l2": 0.5374, "tune": 0.6004}


def recipe_accuracy_against_time(recipe: dict, path: Path) -> None:
    """Validation and test accuracy of each configuration the recipe tried, at the wall time it was
    reached (the runs one after the other), the chosen ones joined."""
    elapsed, points = 0.0, []
    for config in recipe["configurations"]:
        elapsed += config["seconds"]
        points.append((elapsed / 60, config))
    fig, ax = plt.subplots(figsize=(8, 4.6))
    chosen = [(t, c) for t, c in points if c["chosen"]]
    ax.plot([t for t, _ in chosen], [100 * c["validation"] for _, c in chosen], "-", color="tab:blue", alpha=0.4)
    for t, c in points:
        ax.plot(t, 100 * c["validation"], "o", color="tab:blue", mfc="tab:blue" if c["chosen"] else "white")
        ax.plot(t, 100 * c["test"], "s", color="tab:orange", ms=4)
        ax.annotate(c["label"], (t, 100 * c["validation"]), textcoords="offset points", xytext=(5, -11),
                    fontsize=7.5)
    ax.plot([], [], "o", color="tab:blue", label="validation (chooses; filled: kept)")
    ax.plot([], [], "s", color="tab:orange", ms=4, label="test (reported, never chooses)")
    ax.set_xlim(0, elapsed / 60 * 1.15)  # room for the last label
    ax.set_xlabel("wall time since the recipe started (minutes); the input stage on a sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("tlkit recipe on full CIFAR-10, VGG16 ImageNet weights, 2-core CPU", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def images_per_second_by_path(cluster: dict, path: Path) -> None:
    """The base's pass in images/s, one bar per way (the median), each repeat a dot."""
    ways = cluster["ways"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, way in enumerate(ways):
        ax.barh(i, way["median"], color="tab:blue", alpha=0.6)
        ax.plot(way["repeats"], [i] * len(way["repeats"]), "k.", ms=6)
        ax.text(way["median"] + 2, i + 0.28, f"{way['median']:.1f}", fontsize=8)
    ax.set_yticks(range(len(ways)), [w["way"] for w in ways])
    ax.invert_yaxis()
    ax.set_xlabel("images/s (bar: median of 3 repeats; dots: each repeat)")
    ax.set_title("Pass of MobileNetV3Small over 2,000 images at 224 px, 2-core CPU", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def notebook_against_tlkit(rows: list[dict], path: Path) -> None:
    """Each variant's test accuracy in tlkit, beside the notebook's where it reported one."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["variant"] for r in rows]
    xs = range(len(rows))
    ax.bar([x + 0.2 for x in xs], [100 * r["test_accuracy"] for r in rows], 0.4, label="tlkit", color="tab:blue")
    seed = [(x, NOTEBOOK[n]) for x, n in zip(xs, names) if n in NOTEBOOK]
    ax.bar([x - 0.2 for x, _ in seed], [100 * v for _, v in seed], 0.4, label="notebook", color="tab:gray")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(40, 75)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("CIFAR-10 test accuracy (10,000 images), each variant as a user runs it", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "images"))
    parser.add_argument("--notebook-table", default=str(RESULTS / "notebook_table.json"),
                        help="rows written by benchmarks/notebook_table.py --json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_accuracy_against_time(json.loads((RESULTS / "recipe.json").read_text()), out / "recipe-accuracy-time.png")
    images_per_second_by_path(json.loads((RESULTS / "cluster_pass.json").read_text()),
                              out / "pass-images-per-second.png")
    notebook_against_tlkit(json.loads(Path(args.notebook_table).read_text()), out / "notebook-table.png")
    print(f"wrote {out}/recipe-accuracy-time.png, pass-images-per-second.png, notebook-table.png")


if __name__ == "__main__":
    main()
