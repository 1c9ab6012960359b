"""Pre-training, the seed's step 1: train a base on a source task and keep it for transfer.

The seed starts from ImageNet weights that it downloads; `pretrain` makes that step local. It trains
a keras.applications base (random weights, or a weights file to continue from) under a
classification top on any data source, the whole network trainable, with augmentation and early
stopping, autologged like every run. Then it writes the base alone (include_top=False) as Keras'
`.weights.h5`: the file that `weights=<path>` takes in every variant, since keras.applications' own
loader reads it (models.load_base). Convolutional weights do not depend on the input size, so the
file also loads into the same base built at another image_size.

The run logs: the spec (params and spec.json), the source data set, autologged per-epoch metrics,
test_accuracy / test_loss on the source test images, and the weights file as artifact
pretrained/<name>.weights.h5 (tag weights_sha256 = its content hash).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from tlkit import distribute, evaluate, features, models, spec as specs, tracking
from tlkit.spec import NOT_PRETRAIN_OPTIONS as NOT_OPTIONS, PRETRAIN
from tlkit.train import fit, load_dataset

log = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".weights.h5"  # Keras' save_weights refuses any other name
DEFAULT_FOLDER = "pretrained"


def pretrain_spec(overrides: dict | None = None) -> dict:
    """Defaults, then PRETRAIN, then overrides (None = not given); validated like a variant."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(set(given) & set(NOT_OPTIONS))
    if bad:
        raise specs.SpecError(f"pretrain trains the whole base in one stage: {', '.join(bad)} cannot be set")
    spec = specs.merge(given, specs.merge(PRETRAIN))
    specs.validate(spec)
    return spec


def check_output(output: str | os.PathLike | None) -> Path | None:
    """The --output path, checked before any training; None means pretrained/<base>-<sha>.weights.h5."""
    if output in (None, ""):
        return None
    path = Path(output)
    if not path.name.endswith(WEIGHTS_SUFFIX) or path.name == WEIGHTS_SUFFIX:
        raise specs.SpecError(f"output {output} must be a file name ending in {WEIGHTS_SUFFIX} (Keras' weights format)")
    if path.is_dir():
        raise specs.SpecError(f"output {output} is a folder; give a file name ending in {WEIGHTS_SUFFIX}")
    return path


def pretrain(spec: dict, *, output: str | os.PathLike | None = None, experiment: str | None = None,
             nested: bool = False) -> tuple[str, Path]:
    """Train spec's base on spec's data; write the base's weights. Returns (run_id, weights path).

    spec: from pretrain_spec(). output: the weights file (ending in .weights.h5); default
    ./pretrained/<base>-<first 12 hex of its sha256>.weights.h5, so a name never hides other weights.
    The file is written beside its final name and renamed into place: a reader never sees half a file.
    Nothing comes from the feature cache: the base changes every step.
    """
    # The base and top built in the spec's precision, and in its strategy's scope.
    with models.precision(spec), distribute.scope(spec):
        return _pretrain(spec, output, experiment, nested)


def _pretrain(spec: dict, output, experiment: str | None, nested: bool) -> tuple[str, Path]:
    import keras
    import mlflow

    chosen = check_output(output)
    folder = chosen.parent if chosen is not None else Path(DEFAULT_FOLDER)
    # Fail now, not after an hour of training, when the folder cannot be written.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".pretrain-{os.getpid()}-{uuid.uuid4().hex[:8]}{WEIGHTS_SUFFIX}"
        tmp.open("x").close()  # unlike mkstemp's 0600, the file gets the umask's permissions
    except OSError as err:
        raise OSError(f"cannot write weights into {folder}: {err.strerror or err}") from None
    try:
        tracking.use_experiment(experiment)
        tracking.check_reachable()
        keras.utils.set_random_seed(spec["seed"])
        # The base first: a weights file that does not fit fails before minutes of image decoding.
        base_model = models.load_base(spec["base"], spec["weights"], spec["image_size"], spec["seed"])
        dataset = load_dataset(spec)
        network = models.build(spec, len(dataset.class_names), base_model)
        tracking.autolog()
        tags = tracking.run_tags(spec, dataset, tool="pretrain", classes=",".join(dataset.class_names))
        with tracking.run(f"pretrain-{spec['base']}", nested=nested, tags=tags) as active:
            tracking.log_run_preamble(spec, dataset, tags)

            images = {"train": dataset.x_train, "val": dataset.x_val}
            history = fit(network.full, images, dataset, spec, epochs=spec["epochs"],
                          learning_rate=spec["learning_rate"], on_features=False)  # the whole base trains
            # The source task's outcome (its reports too); the run's product is the base's weights, not a model.
            evaluate.log_outcome(network.full, dataset.x_test, dataset, history=history, spec=spec,
                                 metrics={"epochs_run": float(len(history.get("loss", [])))})

            network.base.save_weights(tmp)
            digest = features.file_sha256(tmp)
            final = chosen if chosen is not None else folder / f"{spec['base']}-{digest[:12]}{WEIGHTS_SUFFIX}"
            os.replace(tmp, final)
            mlflow.log_artifact(str(final), "pretrained")
            mlflow.set_tags({"weights_sha256": digest, "weights_file": str(final.resolve())})
            log.info("wrote the %s base (%d parameters) to %s", spec["base"], network.base.count_params(), final)
            return active.info.run_id, final
    finally:
        tmp.unlink(missing_ok=True)
