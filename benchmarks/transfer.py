"""What transfer buys, measured offline: a base pre-trained on half of CIFAR-10, reused on the other half.

No ImageNet weights exist on these machines, and a randomly initialised frozen base gives features
that say nothing about transfer. So this benchmark makes its own source task, the seed's step 1:

    source: airplane, automobile, bird, cat, deer   all 25,000 training images: `tlkit pretrain`
    target: dog, frog, horse, ship, truck            N images per class (N = 50, 200, 1,000)

and compares three ways to learn the target, scored on all 5,000 target test images, over several
seeds (each seed draws another N per class, another validation split and another initialisation;
the pre-trained base is the same one):

    scratch   the same network from random weights, the whole base trained (experiments/scratch.toml)
    frozen    the pre-trained base frozen, the baseline's head trained on its features (baseline.toml)
    finetune  that head first, then the base's last block unfrozen at a 10x lower rate (finetune.toml)

N includes the 10% that every run splits off for validation. No arm augments on the target, and every
arm trains a fixed number of epochs (early stopping off), so the three differ only in where the base's
weights come from and what trains. Early stopping on val_loss (the project's default) cannot be used
here: with 25 validation images, scratch's lowest val_loss was its first epoch's near-uniform output in
every seed, and restoring it scored exactly chance (20.00%), while 30 epochs reach ~35%.

The base is MobileNetV3Small at 32x32: 0.9M parameters and 846 training images/s on this machine's
2 CPU cores, against 229 for MobileNetV2 and 70 for VGG16 (measured with a 2,048-image epoch,
batch 64), so pre-training on 22,500 images takes minutes, not hours (8 epochs: 4.1 to 5.5 min here).

Cost, measured on 2 shared CPU cores (load average 3.3 to 4.6 from other jobs): with 3 seeds, 34.4 min
in all: pre-training 5.5 min, then per run scratch 46 / 92 / 256 s at 50 / 200 / 1,000 images per
class, frozen 14 / 18 / 26 s, finetune 22 / 32 / 47 s. The default of 2 seeds is the ~25-minute
version of that; bigger runs: --seeds, --budgets, --pretrain-epochs, --epochs, --base.

    python benchmarks/transfer.py                           # the shared JPEG archive, extracted to tmp
    python benchmarks/transfer.py --seeds 1,2,3             # the run in benchmarks/transfer.md
    python benchmarks/transfer.py --data /tmp/cifar-src/cifar10 --seeds 1,2,3,4,5 --pretrain-epochs 30

Everything goes to MLflow like any run: one parent run `transfer-benchmark`, the pre-training and
every target run nested under it (tags transfer_arm, budget_per_class, seed), the table as artifact
transfer.md and results.json. The table is also printed and written to --output.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SOURCE = "airplane,automobile,bird,cat,deer"
TARGET = "dog,frog,horse,ship,truck"
ARMS = {  # arm -> (variant in experiments/, what it is)
    "scratch": ("scratch", "same network, random weights, all trained"),
    "frozen": ("baseline", "pre-trained base frozen, head trained"),
    "finetune": ("finetune", "head, then the base's last block unfrozen"),
}

log = logging.getLogger("transfer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ARCHIVE),
                   help="CIFAR-10 as an image folder (train/<class>/, test/<class>/) or the .tar.gz of one")
    p.add_argument("--base", default="MobileNetV3Small", help="keras.applications base (tlkit/models.py BASES)")
    p.add_argument("--image-size", type=int, default=32, help="pixels, square")
    p.add_argument("--budgets", default="50,200,1000", help="target images per class, comma-separated")
    p.add_argument("--seeds", default="1,2", help="target seeds, comma-separated")
    p.add_argument("--pretrain-seed", type=int, default=1995)
    p.add_argument("--pretrain-epochs", type=int, default=8, help="maximum pre-training epochs")
    p.add_argument("--pretrain-patience", type=int, default=3, help="early-stopping patience of pre-training")
    p.add_argument("--epochs", type=int, default=30, help="epochs of every target run (finetune: of its head stage)")
    p.add_argument("--finetune-epochs", type=int, default=10, help="epochs of finetune's second stage")
    p.add_argument("--patience", type=int, default=0,
                   help="early-stopping patience of the target runs; 0 = off, every run trains all its epochs")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, every run")
    p.add_argument("--weights", default=None,
                   help="a pre-trained weights file to use instead of pre-training (then the source accuracy is '-')")
    p.add_argument("--weights-out", default=None,
                   help="where pre-training writes the base's weights  [default: a temporary folder; the file "
                        "is also an artifact of the pretrain run]")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "transfer.md"), help="markdown table written here")
    p.add_argument("--experiment", default="transfer-benchmark", help="MLflow experiment")
    return p.parse_args(argv)


def image_folder(data: str, work: Path) -> str:
    """An image folder: `data` itself, or the archive's folder extracted under `work`."""
    if not data.endswith((".tar.gz", ".tgz")):
        return data
    with tarfile.open(data) as archive:
        archive.extractall(work, filter="data")
    (folder,) = [p for p in work.iterdir() if (p / "train").is_dir()]
    return str(folder)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mean_spread(values: list[float]) -> str:
    """'mean ± sd' in percent; sd over seeds (n-1)."""
    values = 100 * np.asarray(values)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def markdown(rows: list[dict], header: dict) -> str:
    budgets = sorted({r["budget"] for r in rows})
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Test accuracy (%) on all {header['target_test_images']:,} target test images "
             f"({TARGET.replace(',', ', ')}), mean ± sd over {len(seeds)} seeds; the base is {header['base']} "
             f"at {header['image_size']}x{header['image_size']}, pre-trained on {header['source_train_images']:,} "
             f"images of {SOURCE.replace(',', ', ')} (source test accuracy {header['source_accuracy']}). "
             f"{header['protocol']}",
             "",
             "| images per class | " + " | ".join(f"{a}: {ARMS[a][1]}" for a in arms) + " |",
             "|---:|" + "---:|" * len(arms)]
    for budget in budgets:
        cells = [mean_spread([r["test_accuracy"] for r in rows if r["budget"] == budget and r["arm"] == a])
                 for a in arms]
        lines.append(f"| {budget:,} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per run (mean; MLflow logging included):", "",
              "| images per class | " + " | ".join(arms) + " |", "|---:|" + "---:|" * len(arms)]
    for budget in budgets:
        cells = [f"{np.mean([r['seconds'] for r in rows if r['budget'] == budget and r['arm'] == a]):.0f}"
                 for a in arms]
        lines.append(f"| {budget:,} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{header['command']}`  ",
              f"Wall time: {header['wall_minutes']:.1f} min in all (pre-training {header['pretrain_minutes']:.1f} min, "
              f"{header['pretrain_epochs_run']} epochs); {header['machine']}; TensorFlow {header['tensorflow']}, "
              f"Keras {header['keras']}, MLflow {header['mlflow']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    started = time.perf_counter()
    command = "python benchmarks/transfer.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    import keras
    import mlflow
    import tensorflow as tf

    from tlkit import models, pretrain as pretraining, spec as specs, tracking
    from tlkit.train import train

    preprocess = "base" if models.BASES[args.base].scales_pixels_itself else "unit"
    common = {"base": args.base, "image_size": args.image_size, "preprocess": preprocess,
              "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="tlkit-transfer-") as tmp:
        work = Path(tmp)
        data = image_folder(args.data, work)
        log.info("data %s (ready after %.0f s)", data, time.perf_counter() - started)
        tracking.use_experiment(args.experiment)
        tracking.check_reachable()
        rows: list[dict] = []
        with tracking.run("transfer-benchmark", tags={"benchmark": "transfer"}) as parent:
            mlflow.log_params({"base": args.base, "image_size": args.image_size, "budgets": args.budgets,
                               "seeds": args.seeds, "pretrain_epochs": args.pretrain_epochs,
                               "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
                               "patience": args.patience, "batch_size": args.batch_size, "source": SOURCE,
                               "target": TARGET})
            mlflow.set_tag("command", command)

            # Step 1: the source task.
            pretrain_started = time.perf_counter()
            if args.weights:
                weights, source_accuracy, source_images, epochs_run = args.weights, "-", 0, 0
            else:
                spec = pretraining.pretrain_spec({**common, "data": data, "classes": SOURCE,
                                                  "seed": args.pretrain_seed, "epochs": args.pretrain_epochs,
                                                  "patience": args.pretrain_patience})
                output = args.weights_out or work / "pretrained" / f"{args.base}-source.weights.h5"
                run_id, weights = pretraining.pretrain(spec, output=output, nested=True)
                source = mlflow.get_run(run_id)
                source_accuracy = f"{100 * source.data.metrics['test_accuracy']:.1f}%"
                epochs_run = int(source.data.metrics["epochs_run"])
                # Every source training image (the 10% validation split included), as the folder holds them.
                source_images = sum(len(list((Path(data) / "train" / name).iterdir())) for name in SOURCE.split(","))
                keras.backend.clear_session()
            pretrain_minutes = (time.perf_counter() - pretrain_started) / 60
            log.info("pre-trained base %s (%.1f min, source test accuracy %s)", weights, pretrain_minutes,
                     source_accuracy)

            # Steps 2 and 3 against no transfer, on the target task.
            client = mlflow.MlflowClient()
            for budget in budgets:
                for seed in seeds:
                    for arm, (variant, _) in ARMS.items():
                        overrides = {**common, "data": data, "classes": TARGET, "limit": budget * 5, "seed": seed,
                                     "epochs": args.epochs, "patience": args.patience}
                        if arm != "scratch":
                            overrides["weights"] = str(weights)
                        if arm == "finetune":
                            overrides.update(unfreeze=models.BASES[args.base].last_block,
                                             finetune_epochs=args.finetune_epochs)
                        spec = specs.load(variant, overrides)
                        run_started = time.perf_counter()
                        result = train(variant, spec, nested=True)
                        seconds = time.perf_counter() - run_started
                        for key, value in (("transfer_arm", arm), ("budget_per_class", budget), ("seed", seed)):
                            client.set_tag(result.run_id, key, str(value))
                        rows.append({"arm": arm, "budget": budget, "seed": seed, "run_id": result.run_id,
                                     "test_accuracy": result.test_accuracy, "test_images": len(result.test_predictions),
                                     "seconds": seconds})
                        log.info("%s, %d per class, seed %d: %.2f%% (%.0f s)", arm, budget, seed,
                                 100 * result.test_accuracy, seconds)
                        keras.backend.clear_session()  # drop the finished run's graph and weights

            header = {"base": args.base, "image_size": args.image_size, "source_accuracy": source_accuracy,
                      "source_train_images": source_images, "target_test_images": rows[0]["test_images"],
                      "pretrain_minutes": pretrain_minutes, "pretrain_epochs_run": epochs_run,
                      "wall_minutes": (time.perf_counter() - started) / 60, "command": command,
                      "protocol": (f"Every target run: {args.epochs} epochs (finetune: then {args.finetune_epochs} "
                                   f"more with the last block unfrozen), batch {args.batch_size}, "
                                   + (f"early stopping patience {args.patience}" if args.patience
                                      else "no early stopping") + ", no augmentation."),
                      "machine": f"{cpu_model()}, {os.cpu_count()} CPU cores shared with other jobs "
                                 f"(load average {os.getloadavg()[2]:.1f} over the last 15 min)",
                      "tensorflow": tf.__version__, "keras": keras.__version__, "mlflow": mlflow.__version__}
            table = markdown(rows, header)
            for budget in budgets:
                for arm in ARMS:
                    accuracies = [r["test_accuracy"] for r in rows if r["budget"] == budget and r["arm"] == arm]
                    mlflow.log_metric(f"test_accuracy_{arm}_{budget}", float(np.mean(accuracies)))
            mlflow.log_text(table, "transfer.md")
            mlflow.log_dict({"header": header, "rows": rows}, "results.json")
            parent_id = parent.info.run_id
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(table)
    print(table)
    print(f"parent run {parent_id}; table written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
