"""One experiment run: spec -> data -> network -> fit -> evaluate -> log.

With the base frozen, the head trains on features computed once (features.py) instead of pushing
every image through the base every epoch; the logged model is still the whole network with the
same weights. `augment` runs the whole network every epoch, since its inputs change per epoch.
`finetune` trains in two stages, each in a nested run: MLflow autologging records one `fit` per run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Result:
    run_id: str
    test_accuracy: float
    test_loss: float
    model_uri: str  # runs:/<id>/model
    test_predictions: np.ndarray  # predicted class index per test image, from the trained network
    val_accuracy: float = float("nan")  # of the model as logged: what searches select on


def fit_options(spec: dict, x_train, y_train, x_val, y_val, epochs: int, x_train_mirrored=None) -> dict:
    """model.fit's keywords, the seed's: the arrays, batch size, epochs, validation every epoch,
    early stopping when the spec's patience is above 0. train.fit and tune's trials fit with them
    through on_training_batches.

    The batches are the seed's, in the seed's order; what changes is what it costs to serve them.
    Keras builds two training iterators an epoch, one never used, unless the steps are stated
    (steps_per_epoch); the same for validation unless they are stated (validation_steps), and its
    array pipeline (shuffling, a parallel gather) costs more to start than the plain batched
    dataset the unshuffled validation needs. The same history to the last digit (tests/test_train.py).

    x_train_mirrored: the features of the training images mirrored (the spec's `flip`), which the
    batches then draw from at random (training_batches); not a model.fit keyword, it rides along
    to on_training_batches.
    """
    import keras
    import tensorflow as tf

    callbacks = []
    if spec["patience"] > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=spec["patience"], mode="min",
                                                       restore_best_weights=spec["restore_best_weights"], verbose=1))
    batch_size = spec["batch_size"]
    validation = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(batch_size)
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False  # as Keras's own pipeline: no rewrite
    fit = dict(x=x_train, y=y_train, batch_size=batch_size, validation_data=validation.with_options(options),
               validation_steps=math.ceil(len(y_val) / batch_size), steps_per_epoch=math.ceil(len(y_train) / batch_size),
               epochs=epochs, callbacks=callbacks, verbose=2)
    if x_train_mirrored is not None:
        fit[MIRRORED] = x_train_mirrored
    return fit


# fit_options' key for the mirrored training features: on_training_batches takes it out.
MIRRORED = "x_train_mirrored"


def on_training_batches(*args, **options) -> dict:
    """model.fit's arguments (fit_options, or as a caller of keras-tuner's search gives them) as
    keywords, with the arrays x, y replaced by training_batches of them. Call it right before the
    fit, as Keras builds its pipeline inside fit (the permutation's seed is drawn then), and fit
    inside shuffle_stays_logged(). batch_size stays: Keras ignores it beside a dataset, and
    autolog logs it, as before. Anything but arrays (a dataset, a validation_split to make) is
    left to Keras."""
    import inspect

    import keras

    mirror_images = options.pop(MIRRORED, None)
    options = inspect.signature(keras.Model.fit).bind_partial(None, *args, **options).arguments
    options.pop("self")
    options.update(options.pop("kwargs", {}))
    x, y = options.get("x"), options.get("y")
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)) or options.get("validation_split"):
        if mirror_images is not None:
            raise ValueError("mirrored training features need the training features as arrays")
        return options
    options["batch_size"] = options.get("batch_size") or 32  # Keras's default for arrays
    options["x"] = training_batches(x, options.pop("y"), options["batch_size"], mirror_images)
    return options


def training_batches(x, y, batch_size: int, x_mirrored=None):
    """The batches model.fit(x, y, batch_size, shuffle=True) trains on, in the same order, as a dataset.

    x_mirrored: x's rows for the mirrored images. Then every epoch each sample is drawn as itself
    or mirrored, with probability 1/2 each (a coin per sample per epoch, seeded from numpy's
    random state, which the run's seed sets): RandomFlip("horizontal")'s distribution, from the cache.

    Keras's array pipeline draws a permutation of the samples for each iterator (tf.random.shuffle,
    seeded from the global seed), cuts it into batches (the last one partial) and gathers each
    batch in a parallel map behind a prefetch buffer. This is that pipeline with the gather done
    in the calling thread: with steps of a millisecond or two (a head on cached features, 2 cores)
    the hand-off through the buffer cost more than the gather. Steady epochs of a 256-unit head on
    4,500 features 0.188 -> 0.149 s, of a 1,024-unit head 0.301 -> 0.261-0.281 s (median of three).
    """
    import keras
    import tensorflow as tf

    def as_tensor(array):
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and array.dtype != keras.backend.floatx():
            array = array.astype(keras.backend.floatx())  # as Keras casts float arrays (float16 features too)
        return tf.convert_to_tensor(array)

    count = len(y)
    in_full_batches = count // batch_size * batch_size
    if x_mirrored is not None:
        # The coins come from a generator whose state lives outside the dataset, so each iterator
        # (epoch) draws new ones: an op-seeded draw inside the dataset repeats itself in every new
        # iterator. Its seed is drawn from numpy's, which the run's seed sets.
        coin_source = tf.random.Generator.from_seed(int(np.random.randint(2**31 - 1)))

    def permutation(_):
        # As Keras draws it: the shuffle's seed comes from the global seed (set per run, per trial).
        indices = tf.random.shuffle(tf.range(count, dtype=tf.int64))
        if x_mirrored is None:
            return indices
        # Rows count.. of the stacked features are the mirror images: a coin per sample decides.
        coins = tf.cast(coin_source.uniform((count,)) < 0.5, tf.int64)
        return indices + count * coins

    def batched(indices):
        full = tf.data.Dataset.from_tensor_slices(tf.reshape(indices[:in_full_batches], (-1, batch_size)))
        if in_full_batches == count:
            return full
        return full.concatenate(tf.data.Dataset.from_tensors(indices[in_full_batches:]))

    # The arrays ride along in a repeated dataset rather than in the gather's closure (Keras's way:
    # a captured tensor would be copied into the function's graph).
    if x_mirrored is not None:
        if len(x_mirrored) != count:
            raise ValueError(f"{len(x_mirrored)} mirrored training features for {count} training features")
        x, y = np.concatenate([x, x_mirrored]), np.concatenate([y, y])
    arrays = tf.data.Dataset.from_tensors((as_tensor(x), as_tensor(y))).repeat()
    batches = tf.data.Dataset.zip((tf.data.Dataset.range(1).map(permutation).flat_map(batched), arrays))
    batches = batches.map(lambda indices, xy: (tf.gather(xy[0], indices), tf.gather(xy[1], indices)))
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE  # the shuffle
    # A known length makes Keras start a new iterator, so a new permutation draw, every epoch, as for arrays.
    return batches.with_options(options).apply(tf.data.experimental.assert_cardinality(math.ceil(count / batch_size)))


@contextlib.contextmanager
def shuffle_stays_logged():
    """Around a fit on training_batches: Keras warns that shuffle=True is ignored for a dataset.
    The dataset shuffles itself; shuffle stays True in the call so that autolog's logged `shuffle`
    says what happens."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`shuffle=True` was passed", category=UserWarning)
        yield


def fit(model, inputs, dataset, spec, *, epochs: int, learning_rate: float,
        steps_per_execution: int) -> dict[str, list[float]]:
    """Compile model for training and fit it on inputs['train'] against dataset's labels, validating
    on inputs['val'] every epoch; returns the history. One autologged fit: call it inside its own run."""
    from tlkit import models, views

    fitted = views.training_view(model)  # the same weights; small-map convs train as matrix products
    models.compile_for_training(fitted, spec, learning_rate, steps_per_execution)
    trainable, frozen = models.parameter_counts(fitted)
    log.info("training %s: %d trainable, %d frozen parameters, lr %g", model.name, trainable, frozen, learning_rate)
    options = fit_options(spec, inputs["train"], dataset.y_train, inputs["val"], dataset.y_val, epochs,
                          inputs.get("train_mirrored"))
    with shuffle_stays_logged():
        history = fitted.fit(**on_training_batches(**options))
    views.write_back(fitted)
    return history.history


def score(model, x, y) -> tuple[float, float, np.ndarray]:
    """Test loss (the seed's categorical cross-entropy, averaged), accuracy and class probabilities
    of model on inputs x with one-hot labels y, from models.infer: the numbers model.evaluate gives."""
    import keras

    from tlkit import models

    probabilities = models.infer(model, x)
    loss = float(np.mean(keras.ops.convert_to_numpy(keras.losses.categorical_crossentropy(y, probabilities))))
    accuracy = float(np.mean(probabilities.argmax(axis=1) == y.argmax(axis=1)))
    return loss, accuracy, probabilities


def _train_stages(network, model, inputs, dataset, spec, steps_per_execution: int,
                  head_inputs: dict | None = None) -> tuple[dict, list[int]]:
    """Fit the head; for fine-tuning, then unfreeze the block and fit on. Returns curves, stage starts.

    head_inputs: the base's output for fine-tuning's first stage, when cached. While the block is
    frozen the head trains on its outputs, so the block need not run every step (full CIFAR-10,
    VGG16's block5: 45 s an epoch through the block).
    """
    import mlflow

    from tlkit import models, tracking

    if not spec["unfreeze"]:
        return fit(model, inputs, dataset, spec, epochs=spec["epochs"], learning_rate=spec["learning_rate"],
                   steps_per_execution=steps_per_execution), []

    first, first_inputs = (network.head, head_inputs) if head_inputs is not None else (model, inputs)
    with tracking.run("head", nested=True, tags={"stage": "head"}):
        history = fit(first, first_inputs, dataset, spec, epochs=spec["epochs"],
                      learning_rate=spec["learning_rate"], steps_per_execution=steps_per_execution)
    starts = []
    if spec["finetune_epochs"] > 0:
        models.set_unfrozen(network, True)  # a change of `trainable` takes effect at the next compile
        starts.append(len(history["loss"]))
        with tracking.run("finetune", nested=True, tags={"stage": "finetune", "unfrozen": spec["unfreeze"]}):
            mlflow.log_param("unfrozen", spec["unfreeze"])
            more = fit(model, inputs, dataset, spec, epochs=spec["finetune_epochs"],
                       learning_rate=spec["finetune_learning_rate"], steps_per_execution=steps_per_execution)
        history = {k: history.get(k, []) + more.get(k, []) for k in set(history) | set(more)}
    return history, starts


@contextlib.contextmanager
def long_lived_objects_frozen():
    """Full garbage collections that skip what lives through the block (TensorFlow, MLflow, a base).

    keras-tuner collects twice before every trial and a suite once after every child; with
    TensorFlow and MLflow loaded a full collection took 0.2-0.33 s here (25 of them, 5 s of a
    suite). Frozen, the objects made before the block are not scanned; what the block makes is
    collected as usual. Unfrozen at the end, so they can be collected again. An inner block inside
    an outer one (a suite's search) leaves the freezing to the outer.
    """
    import gc

    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# The spec fields load_dataset reads: children of a suite that agree on these share one load.
DATA_FIELDS = ("data", "image_size", "limit", "test_limit", "seed", "classes")


def load_dataset(spec: dict):
    """The spec's data: raw uint8 pixels, split and one-hot (data.load with the spec's fields)."""
    from tlkit import data, spec as specs

    dataset = data.load(spec["data"], image_size=spec["image_size"], limit=spec["limit"],
                        test_limit=spec["test_limit"], seed=spec["seed"], classes=specs.class_list(spec))
    log.info("data %s: %d train, %d validation, %d test images, %d classes", dataset.name, len(dataset.x_train),
             len(dataset.x_val), len(dataset.x_test), len(dataset.class_names))
    return dataset


def mirrored(images: np.ndarray) -> np.ndarray:
    """Each image mirrored left to right (the width axis of (n, height, width, channels))."""
    return np.ascontiguousarray(images[:, :, ::-1])


def frozen_features(network, dataset, spec: dict, cache_dir: str | None = None, cache_below_top: bool = False):
    """The extractor's outputs for the train, val and test images: from the cache, or computed once.

    finetune and the frozen variants share one pass of the base. finetune caches below the block
    it unfreezes (VGG16: block4_pool) and, from those, also stores the base's output: the top block
    is cheap (VGG16's block5 at 2x2 is under a tenth of the pass). A frozen variant that finds the
    lower entry derives its features from it the same way instead of running the base again.

    With the spec's `flip`, the training images' mirror images get entries of their own (the
    training split alone, the key's `transform` 'hflip'), made and shared the same way: one more
    pass over the training images buys flips for every epoch of every variant after it.

    cache_below_top: where a frozen variant's features are not cached, its pass stops below the
    top block (as finetune's does), stores those, and derives its own from them: a fine-tuning
    run on the same images later finds its features instead of making a second pass.
    """
    from tlkit import features

    cache = features.FeatureCache(cache_dir)
    images = {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test}
    got = _cached_features(network, dataset, spec, cache, images, "", cache_below_top)
    if spec["flip"]:
        flipped = _cached_features(network, dataset, spec, cache, {"train": mirrored(dataset.x_train)}, "hflip",
                                   cache_below_top)
        got.train_mirrored = flipped.train
        if got.base_output is not None:
            got.base_output.train_mirrored = flipped.base_output.train
    return got


def _cached_features(network, dataset, spec: dict, cache, images: dict, transform: str = "",
                     cache_below_top: bool = False):
    """frozen_features of `images` (all three splits, or the training images transformed by `transform`)."""
    import keras

    from tlkit import features, models

    def fields_at(boundary: str) -> dict:
        fields = features.key_fields(spec, dataset.digest, boundary)
        if transform:  # untransformed entries keep the keys they always had
            fields["transform"] = transform
        return fields

    fields = fields_at(network.boundary)
    base = network.base
    output_layer = base.layers[-1].name
    shared_cut = models.boundary_layer(base, models.BASES[spec["base"]].last_block)
    top_fields = fields_at(output_layer)

    def derive(lower: features.Features, top) -> features.Features:
        arrays = {split: models.infer(top, getattr(lower, split)) for split in lower.splits}
        cache.write(features.key_of(top_fields), top_fields, arrays)
        derived = cache.read(features.key_of(top_fields))
        derived.hit, derived.derived_from = False, lower.key
        return derived

    if network.boundary == output_layer:
        if not cache.has(features.key_of(fields)):
            lower = cache.read(features.key_of(fields_at(shared_cut)))
            if lower is None and cache_below_top and shared_cut != output_layer:
                lower = cache.get(fields_at(shared_cut), models.extractor_to(network, spec, shared_cut), images)
            if lower is not None:
                log.info("feature cache: deriving %s features from the %s entry", output_layer, shared_cut)
                return derive(lower, keras.Model(base.get_layer(shared_cut).output, base.output))
        return cache.get(fields, network.extractor, images)

    got = cache.get(fields, network.extractor, images)
    if network.upper is not None:
        # The base's output for fine-tuning's first stage, from these features through the block(s)
        # above, still at the loaded weights (fine-tuning has not started).
        got.base_output = cache.read(features.key_of(top_fields)) or derive(got, network.upper)
    return got


def train(variant: str, spec: dict, *, experiment: str | None = None, cache_dir: str | None = None,
          nested: bool = False, dataset=None, cache_below_top: bool = False) -> Result:
    """Run one variant with a validated spec and log everything to MLflow.

    dataset: load_dataset(spec) done already (a suite loads once for all its children).
    cache_below_top: a frozen variant's pass stores the features below the base's top block too
    (frozen_features), for a fine-tuning run after it on the same images (the recipe search)."""
    import keras
    import mlflow

    from tlkit import features, models, reports, spec as specs, tracking

    tracking.use_experiment(experiment)
    tracking.check_reachable()
    if not (spec["augment"] or spec["trainable_base"]):
        features.FeatureCache(cache_dir).check_writable()  # now, not after the base's pass over the data
    keras.utils.set_random_seed(spec["seed"])
    # The base first: a weights file that does not fit fails before minutes of image decoding.
    base_model = models.load_base(spec["base"], spec["weights"], spec["image_size"], spec["seed"])
    dataset = dataset or load_dataset(spec)
    network = models.build(spec, len(dataset.class_names), base_model)
    tracking.autolog()

    tags = {"variant": Path(variant).stem, "base": spec["base"], "dataset": dataset.name,
            "dataset_digest": dataset.digest}
    if dataset.skipped_files:  # unreadable images, skipped with a warning: the run says how many
        tags["skipped_files"] = str(len(dataset.skipped_files))
    with tracking.run(Path(variant).stem, nested=nested, tags=tags) as active:
        mlflow.set_tags(tags)
        # Under `mlflow run` the project already logged the parameters it was given, as typed
        # ("1e-3"); MLflow refuses to change a param, so log only the rest of the spec.
        given = mlflow.get_run(active.info.run_id).data.params
        mlflow.log_params({k: v for k, v in spec.items() if k not in given})
        mlflow.log_dict(spec, "spec.json")
        mlflow.log_artifact(str(specs.variant_path(variant)), "spec")
        tracking.log_dataset(dataset)

        head_inputs = None
        if spec["augment"] or spec["trainable_base"]:
            # Random transforms, or a base whose weights change, cannot come from the feature cache.
            log.info("augment / trainable_base: the whole network runs every epoch")
            mlflow.set_tag("feature_cache", "unused")
            model, inputs = network.full, {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test}
            steps_per_execution = 1
        else:
            cached = frozen_features(network, dataset, spec, cache_dir, cache_below_top)
            outcome = "derived" if cached.derived_from else "hit" if cached.hit else "miss"
            mlflow.set_tags({"feature_cache": outcome, "feature_cache_key": cached.key,
                             "feature_boundary": network.boundary})
            model, inputs = network.trainable, {"train": cached.train, "val": cached.val, "test": cached.test,
                                                "train_mirrored": cached.train_mirrored}
            steps_per_execution = models.HEAD_STEPS_PER_EXECUTION
            if cached.base_output is not None:
                head_inputs = {"train": cached.base_output.train, "val": cached.base_output.val,
                               "train_mirrored": cached.base_output.train_mirrored}

        history, stage_starts = _train_stages(network, model, inputs, dataset, spec, steps_per_execution, head_inputs)
        test_loss, test_accuracy, probabilities = score(model, inputs["test"], dataset.y_test)
        # The validation accuracy of the model as it ends (early stopping may have restored an
        # earlier epoch): what the recipe search selects on, never the test accuracy.
        _, val_accuracy, _ = score(model, inputs["val"], dataset.y_val)
        mlflow.log_metrics({"test_accuracy": float(test_accuracy), "test_loss": float(test_loss),
                            "val_accuracy_final": float(val_accuracy),
                            "epochs_run": float(len(history.get("loss", [])))})
        log.info("test accuracy %.2f%% (loss %.4f) on %d images", 100 * test_accuracy, test_loss, len(dataset.x_test))

        with tempfile.TemporaryDirectory() as tmp:
            per_class = reports.write_all(Path(tmp), dataset.y_test.argmax(axis=1), probabilities,
                                          dataset.class_names, history, stage_starts)
            tracking.log_reports(Path(tmp))
        mlflow.log_metrics(per_class)
        tracking.log_model(network.full, dataset.class_names, dataset.x_test[:2], spec)
        run_id = active.info.run_id
    return Result(run_id=run_id, test_accuracy=float(test_accuracy), test_loss=float(test_loss),
                  model_uri=f"runs:/{run_id}/model", test_predictions=probabilities.argmax(axis=1),
                  val_accuracy=float(val_accuracy))
