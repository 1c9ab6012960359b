"""float32 against mixed_bfloat16 on this CPU, as the recipe's probe measures them: the base's pass
(seconds an image through the frozen base) and a real training step of each fine-tuning depth.

    python benchmarks/precision.py --json benchmarks/results/precision.json

The two precisions alternate, REPEATS times, in one process, so a loaded machine slows both alike;
the rows are each repeat's rates and the summary is the median speedup. It is what decides whether
the recipe screens mixed_bfloat16 (recipe.PRECISION_SPEEDUP): a CPU with AVX512_BF16 (AMD Zen 4,
Intel Sapphire Rapids) runs bf16 matrix products natively, one without emulates them, slower.
Accuracy is not measured here: the recipe's fine-tuning screen compares the two on validation, and
benchmarks/finetune_levers.py has a mixed_bfloat16 arm at a larger sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tlkit

from finetune_levers import cpu_model  # noqa: E402

PRECISIONS = ("float32", "mixed_bfloat16")
REPEATS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="VGG16")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--depths", default="top1,top2")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from tlkit import budget, candidates
    from tlkit import spec as specs

    depths = args.depths.split(",")
    head = max(candidates.HEADS, key=lambda h: h.get("units", 0))
    rows = []
    for repeat in range(REPEATS):
        for precision in PRECISIONS:
            spec = specs.merge({"base": args.base, "image_size": args.image_size, "preprocess": "base",
                                "precision": precision, "weights": "none"}, specs.load("baseline", {}))
            rates = budget.probe(spec, 10, depths, head)
            row = {"repeat": repeat, "precision": precision, "pass_ms_per_image": round(rates.pass_image * 1e3, 3),
                   **{f"{depth}_step_ms_per_image": round(seconds * 1e3, 3)
                      for depth, seconds in rates.finetune_sample.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)

    def speedup(column: str) -> float:
        ratios = [own[column] / fast[column] for own, fast in zip(rows[::2], rows[1::2])]
        return round(statistics.median(ratios), 2)

    columns = ["pass_ms_per_image"] + [f"{depth}_step_ms_per_image" for depth in depths]
    summary = {column: speedup(column) for column in columns}
    print(f"\n{args.base} at {args.image_size} px, {cpu_model()}, {os.cpu_count()} cores: "
          "mixed_bfloat16 speedup (median of {REPEATS} alternating pairs)".replace("{REPEATS}", str(REPEATS)))
    for column, ratio in summary.items():
        print(f"  {column.replace('_ms_per_image', '')}: {ratio}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "cpu": cpu_model(),
                                               "cores": os.cpu_count(), "base": args.base,
                                               "image_size": args.image_size, "rows": rows,
                                               "speedup": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
