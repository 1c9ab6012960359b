"""One experiment run: spec -> data -> network -> fit -> evaluate -> log.

With the base frozen, the head trains on features computed once (features.py) instead of pushing
every image through the base every epoch; the logged model is still the whole network with the
same weights. `augment` runs the whole network every epoch, since its inputs change per epoch.
`finetune` trains in two stages, each in a nested run: MLflow autologging records one `fit` per run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlkit import data, deadlines, distribute, evaluate, fastpath, features, models, spec as specs, tracking

log = logging.getLogger(__name__)


@dataclass
class Result:
    run_id: str
    test_accuracy: float
    test_loss: float
    model_uri: str  # runs:/<id>/model
    test_predictions: np.ndarray  # predicted class index per test image, from the trained network
    val_accuracy: float = float("nan")  # of the model as logged: what searches select on
    val_accuracy_without_tta: float | None = None  # with tta: the same weights scored without the flips


def _stop_at_deadline(at: float, early_stopping=None):
    """A callback that ends training after the epoch that ends past `at`, with the best epoch's
    weights where early stopping keeps them (it restores them only when its own patience ends)."""
    import time

    import keras

    class StopAtDeadline(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if time.time() > at and not self.model.stop_training:
                log.warning("the time budget is spent: training stops after epoch %d", epoch + 1)
                self.model.stop_training = True
                if early_stopping is not None and early_stopping.restore_best_weights and \
                        early_stopping.best_weights is not None:
                    self.model.set_weights(early_stopping.best_weights)

    return StopAtDeadline()


def fit_options(spec: dict, x_train, y_train, x_val, y_val, epochs: int, x_train_mirrored=None) -> dict:
    """model.fit's keywords, the seed's: the arrays, batch size, epochs, validation every epoch,
    early stopping when the spec's patience is above 0. train.fit and tune's trials pass them
    through fastpath.fit_arguments, which serves the arrays.

    x_train_mirrored: the features of the training images mirrored (the spec's `flip`), which the
    batches then draw from at random; not a model.fit keyword: it rides along to fit_arguments.
    """
    import keras

    callbacks = []
    if spec["patience"] > 0:
        mode = "min" if spec["monitor"] == "val_loss" else "max"
        callbacks.append(keras.callbacks.EarlyStopping(monitor=spec["monitor"], patience=spec["patience"], mode=mode,
                                                       restore_best_weights=spec["restore_best_weights"], verbose=1))
    if deadlines.current() is not None:  # the recipe's budget: epochs stop there
        callbacks.append(_stop_at_deadline(deadlines.current(), callbacks[0] if callbacks else None))
    fit = dict(x=x_train, y=y_train, batch_size=spec["batch_size"], validation_data=(x_val, y_val),
               epochs=epochs, callbacks=callbacks, verbose=2)
    if x_train_mirrored is not None:
        fit[fastpath.MIRRORED] = x_train_mirrored
    return fit


def fit(model, inputs, dataset, spec, *, epochs: int, learning_rate: float, on_features: bool) -> dict[str, list[float]]:
    """Train model on inputs['train'] against dataset's labels, validating on inputs['val'] every
    epoch (through fastpath.fit); returns the history. One autologged fit: call it inside its own run.
    on_features: model is a head (or a block and head) on cached features, not the whole network."""
    trainable, frozen = models.parameter_counts(model)
    log.info("training %s: %d trainable, %d frozen parameters, lr %s", model.name, trainable, frozen,
             f"{learning_rate:g}" if isinstance(learning_rate, float) else type(learning_rate).__name__)
    options = fit_options(spec, inputs["train"], dataset.y_train, inputs["val"], dataset.y_val, epochs,
                          inputs.get("train_mirrored"))
    return fastpath.fit(model, spec, options, learning_rate=learning_rate, on_features=on_features)


def _train_stages(network, model, inputs, dataset, spec, on_features: bool,
                  head_inputs: dict | None = None) -> tuple[dict, list[int]]:
    """Fit the head; for fine-tuning, then unfreeze the block and fit on. Returns curves, stage starts.

    head_inputs: the base's output for fine-tuning's first stage, when cached. While the block is
    frozen the head trains on its outputs, so the block need not run every step (full CIFAR-10,
    VGG16's block5: 45 s an epoch through the block).
    """
    import mlflow

    if not spec["unfreeze"]:
        return fit(model, inputs, dataset, spec, epochs=spec["epochs"], learning_rate=spec["learning_rate"],
                   on_features=on_features), []

    first, first_inputs = (network.head, head_inputs) if head_inputs is not None else (model, inputs)
    with tracking.run("head", nested=True, tags={"stage": "head"}):
        history = fit(first, first_inputs, dataset, spec, epochs=spec["epochs"],
                      learning_rate=spec["learning_rate"], on_features=on_features)
    starts = []
    if spec["finetune_epochs"] > 0:
        models.set_unfrozen(network, True)  # a change of `trainable` takes effect at the next compile
        starts.append(len(history["loss"]))
        with tracking.run("finetune", nested=True, tags={"stage": "finetune", "unfrozen": spec["unfreeze"]}):
            mlflow.log_param("unfrozen", spec["unfreeze"])
            more = fit(model, inputs, dataset, spec, epochs=spec["finetune_epochs"],
                       learning_rate=finetune_learning_rate(spec, len(dataset.y_train)), on_features=on_features)
        history = {k: history.get(k, []) + more.get(k, []) for k in set(history) | set(more)}
    return history, starts


def finetune_learning_rate(spec: dict, train_images: int):
    """The fine-tuning stage's learning rate: the spec's, constant, or a cosine decay from it to 0
    over the stage's steps (finetune_schedule)."""
    import math

    import keras

    if spec["finetune_schedule"] == "constant":
        return spec["finetune_learning_rate"]
    steps = spec["finetune_epochs"] * math.ceil(train_images / spec["batch_size"])
    return keras.optimizers.schedules.CosineDecay(spec["finetune_learning_rate"], decay_steps=max(steps, 1))


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
DATA_FIELDS = ("data", "image_size", "limit", "test_limit", "seed", "sample_seed", "classes")


def data_key(spec: dict) -> tuple:
    """Two specs with the same key load the same data set (load_dataset)."""
    return tuple(str(spec[k]) for k in DATA_FIELDS)


def load_dataset(spec: dict):
    """The spec's data: raw uint8 pixels, split and one-hot (data.load with the spec's fields). The
    seed splits off the validation images; sample_seed (0: the seed) draws the limit samples."""
    dataset = data.load(spec["data"], image_size=spec["image_size"], limit=spec["limit"],
                        test_limit=spec["test_limit"], seed=spec["sample_seed"] or spec["seed"],
                        split_seed=spec["seed"], classes=specs.class_list(spec))
    log.info("data %s: %d train, %d validation, %d test images, %d classes", dataset.name, len(dataset.x_train),
             len(dataset.x_val), len(dataset.x_test), len(dataset.class_names))
    return dataset


def frozen_features(network, dataset, spec: dict, cache_dir: str | None = None, cache_below: str = "",
                    engine=None):
    """The extractor's outputs for the train, val and test images: from the cache, or computed once.

    finetune and the frozen variants share one pass of the base. finetune caches below the block
    it unfreezes (VGG16: block4_pool) and, from those, also stores the base's output: the top block
    is cheap (VGG16's block5 at 2x2 is under a tenth of the pass). A network whose boundary is
    higher than an entry already made (a frozen variant after finetune, fine-tuning one block after
    a pass cut below two) derives its features from that entry instead of running the base again.

    With the spec's `flip`, the training images' mirror images get entries of their own (the
    training split alone, the key's `transform` 'hflip'), made and shared the same way: one more
    pass over the training images buys flips for every epoch of every variant after it.

    cache_below: an `unfreeze` value (a block prefix, 'top2'). Where the network's features are
    not cached, the pass stops below that block, stores those, and derives the network's own from
    them: fine-tuning runs down to that depth later find their features instead of making a pass
    of their own (the recipe search caches below its deepest fine-tuning candidate).

    engine: what runs a pass on a miss (features.LocalPass by default; cluster.RayPass makes the
    same entries on Ray, looked up here by the same rules, so a run after it finds them all).
    """
    cache = features.FeatureCache(cache_dir)
    # The pool (train and validation, before the split) and the test images: the entry serves every
    # split of the pool, which the data set's rows then take.
    images = {"pool": dataset.x_pool, "test": dataset.x_test}
    got = _cached_features(network, dataset, spec, cache, images, "", cache_below, engine)
    _take_split(got, dataset)
    # Mirror images, an entry for each split they are of: the pool's for flips in training (its
    # validation rows then serve tta too), the test images' for tta, and for tta without flips the
    # validation images' alone (a sixth of the pool's pass; that entry is the split's own).
    wanted = []
    if spec["flip"]:
        wanted.append("pool")
    if spec["tta"]:
        wanted += ["test"] if spec["flip"] else ["test", "val"]
    mirror_images = {"pool": dataset.x_pool, "test": dataset.x_test, "val": dataset.x_val}
    mirrored = {split: _cached_features(network, dataset, spec, cache, {split: mirror_images[split].mirror()}, "hflip",
                                        cache_below, engine, rows=dataset.val_rows if split == "val" else None)
                for split in wanted}
    for into, pick in ((got, lambda f: f), (got.base_output, lambda f: f.base_output)):
        if into is None or not mirrored:
            continue
        if spec["flip"]:
            into.train_mirrored = pick(mirrored["pool"]).pool.take(dataset.train_rows)
        if spec["tta"]:
            into.val_mirrored = pick(mirrored["pool"]).pool.take(dataset.val_rows) if spec["flip"] else \
                pick(mirrored["val"]).val
            into.test_mirrored = pick(mirrored["test"]).test
    return got


def _take_split(got, dataset) -> None:
    """The run's training and validation rows of the pool's features (and the base output's)."""
    got.split(dataset.train_rows, dataset.val_rows)
    if got.base_output is not None:
        got.base_output.split(dataset.train_rows, dataset.val_rows)


def feature_tags(cached, network) -> dict:
    """A run's tags for the features it trained on (frozen_features' result): found, derived or
    computed, their entry and boundary, and who ran the base over the images (this process, or
    `tlkit features --engine ray` before it) with how many workers."""
    made_by = cached.made_by
    return {"feature_cache": "derived" if cached.derived_from else "hit" if cached.hit else "miss",
            "feature_cache_key": cached.key, "feature_boundary": network.boundary,
            "feature_engine": made_by["engine"], "feature_workers": str(made_by.get("workers", 1))}


def _cached_features(network, dataset, spec: dict, cache, images: dict, transform: str = "",
                     cache_below: str = "", engine=None, rows=None):
    """frozen_features of `images` (the pool and the test images, or one of them transformed by `transform`)."""
    import keras

    base = network.base
    names = [layer.name for layer in base.layers]

    def fields_at(boundary: str) -> dict:
        fields = features.key_fields(spec, dataset.digest, models.layer_key(base, boundary))
        if transform:  # an entry of transformed images, of the splits it holds
            fields["transform"], fields["splits"] = transform, sorted(images)
        if rows is not None:  # of some rows of the pool (the validation split's): which
            fields["rows"] = hashlib.sha256(np.asarray(rows, dtype="<i8").tobytes()).hexdigest()[:24]
        return fields

    def derive(lower: features.Features, lower_at: str, upper_at: str, block=None) -> features.Features:
        """The features at `upper_at` computed from an entry at `lower_at` below it, and stored."""
        block = block or keras.Model(base.get_layer(lower_at).output, base.get_layer(upper_at).output)
        log.info("feature cache: deriving %s features from the %s entry", upper_at, lower_at)
        # A pass of the blocks above over the lower features, streamed batch by batch into the entry
        # as the base's pass is (nothing holds a split's features whole). Made by the pass that made
        # `lower` (the blocks above it are a small part of the work), and said so.
        through_block = features.LocalPass()
        through_block.made_by = {**lower.made_by, "derived_from": lower.key}
        derived = cache.get(fields_at(upper_at), block, {split: getattr(lower, split) for split in lower.splits},
                            engine=through_block)
        derived.derived_from = lower.key
        return derived

    def features_at(boundary: str, extractor) -> features.Features:
        """The features at `boundary`: found, derived from an entry below it, or from a pass."""
        if cache.has(features.key_of(fields_at(boundary))):
            return cache.get(fields_at(boundary), extractor, images, engine=engine)
        # Entries that can serve this boundary: below the asked depth, below the base's top block.
        below = [models.boundary_layer(base, unfreeze, spec["base"])
                 for unfreeze in (cache_below, models.BASES[spec["base"]].last_block) if unfreeze]
        below = [cut for cut in below if names.index(cut) < names.index(boundary)]
        for cut in below:
            lower = cache.read(features.key_of(fields_at(cut)))
            if lower is not None:
                return derive(lower, cut, boundary)
        if below and cache_below:  # pass to the deepest asked-for cut, and derive this one
            deepest = min(below, key=names.index)
            lower = cache.get(fields_at(deepest), models.extractor_to(network, spec, deepest), images, engine=engine)
            return derive(lower, deepest, boundary)
        return cache.get(fields_at(boundary), extractor, images, engine=engine)

    got = features_at(network.boundary, network.extractor)
    if network.upper is not None:
        # The base's output for fine-tuning's first stage, from these features through the block(s)
        # above, still at the loaded weights (fine-tuning has not started).
        output_layer = names[-1]
        got.base_output = cache.read(features.key_of(fields_at(output_layer))) or \
            derive(got, network.boundary, output_layer, network.upper)
    return got


def train(variant: str, spec: dict, *, experiment: str | None = None, cache_dir: str | None = None,
          nested: bool = False, dataset=None, cache_below: str = "", tags: dict | None = None,
          run_name: str = "") -> Result:
    """Run one variant with a validated spec and log everything to MLflow, its layers built in the
    spec's precision (models.precision) and its strategy's scope (distribute.scope). See _train."""
    with models.precision(spec), distribute.scope(spec):
        return _train(variant, spec, experiment=experiment, cache_dir=cache_dir, nested=nested, dataset=dataset,
                      cache_below=cache_below, extra_tags=tags or {}, run_name=run_name)


def _train(variant: str, spec: dict, *, experiment: str | None, cache_dir: str | None, nested: bool, dataset,
           cache_below: str, extra_tags: dict, run_name: str) -> Result:
    """Run one variant with a validated spec and log everything to MLflow.

    dataset: load_dataset(spec) done already (a suite loads once for all its children).
    cache_below: where the features are not cached, the pass stops below this block (an
    `unfreeze` value) and derives the network's own from there (frozen_features), for fine-tuning
    runs after it on the same images (the recipe search).
    extra_tags: set on the run as it starts (a repeat's index and seed: tlkit/repeats.py).
    run_name: the run's name (default: the variant's; a repeat's is `<variant>-seed<seed>`)."""
    import keras
    import mlflow

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

    tags = tracking.run_tags(spec, dataset, variant=Path(variant).stem, **extra_tags)
    with tracking.run(run_name or Path(variant).stem, nested=nested, tags=tags) as active:
        tracking.log_run_preamble(spec, dataset, tags, spec_file=specs.variant_path(variant))

        head_inputs = None
        if spec["augment"] or spec["trainable_base"]:
            # Random transforms, or a base whose weights change, cannot come from the feature cache.
            log.info("augment / trainable_base: the whole network runs every epoch")
            mlflow.set_tag("feature_cache", "unused")
            model, inputs = network.full, {"train": dataset.x_train, "val": dataset.x_val, "test": dataset.x_test}
            on_features = False
        else:
            cached = frozen_features(network, dataset, spec, cache_dir, cache_below)
            mlflow.set_tags(feature_tags(cached, network))
            model, inputs = network.trainable, {"train": cached.train, "val": cached.val, "test": cached.test,
                                                "train_mirrored": cached.train_mirrored,
                                                "val_mirrored": cached.val_mirrored, "test_mirrored": cached.test_mirrored}
            on_features = True
            if cached.base_output is not None:
                head_inputs = {"train": cached.base_output.train, "val": cached.base_output.val,
                               "train_mirrored": cached.base_output.train_mirrored}

        history, stage_starts = _train_stages(network, model, inputs, dataset, spec, on_features, head_inputs)
        # The validation accuracy of the model as it ends (early stopping may have restored an
        # earlier epoch): what the recipe search selects on, never the test accuracy.
        # With tta, both scores are those of the image and its mirror image (as the logged network answers).
        val_plain, val_flipped = evaluate.predict(model, inputs["val"], inputs.get("val_mirrored"))
        val_accuracy = evaluate.loss_and_accuracy(val_plain if val_flipped is None else val_flipped, dataset.y_val)[1]
        metrics = {"val_accuracy_final": val_accuracy, "epochs_run": float(len(history.get("loss", [])))}
        test_probabilities = None  # log_outcome predicts them
        if val_flipped is not None:
            # What the flips at test time bought, in the run itself: the same trained weights scored
            # without them, from the same predictions (the training is tta's either way).
            test_plain, test_probabilities = evaluate.predict(model, inputs["test"], inputs.get("test_mirrored"))
            metrics["val_accuracy_without_tta"] = evaluate.loss_and_accuracy(val_plain, dataset.y_val)[1]
            metrics["test_accuracy_without_tta"] = evaluate.loss_and_accuracy(test_plain, dataset.y_test)[1]
        outcome = evaluate.log_outcome(model, inputs["test"], dataset, history=history, spec=spec,
                                       x_test_mirrored=inputs.get("test_mirrored"), probabilities=test_probabilities,
                                       stage_starts=stage_starts, logged_network=network.full, metrics=metrics)
        run_id = active.info.run_id
    return Result(run_id=run_id, test_accuracy=outcome.test_accuracy, test_loss=outcome.test_loss,
                  model_uri=f"runs:/{run_id}/model", test_predictions=outcome.probabilities.argmax(axis=1),
                  val_accuracy=val_accuracy, val_accuracy_without_tta=metrics.get("val_accuracy_without_tta"))
