"""The speed machinery behind one door: how tlkit trains and runs a network faster than plain Keras.

Everything here computes what Keras's compile + fit + predict compute, the same numbers to float
rounding, in less time on a CPU (figures: docs/performance.md; benchmarks/fast_path.py times the two
ways against each other). The rest of tlkit trains through `fit` (or, where keras-tuner makes the fit
call itself, `compiled` and `fit_arguments`) and infers through `predict`, and never sees the levers:

- views.py: training views of the network; a 'same' conv on a 1x1 map trains as its centre tap,
  on a map of at most 9 positions as one matrix product (VGG16's block5 at 2x2 and 3x3);
- optimizers.py: Keras's Adam and SGD with each variable's update one fused TensorFlow kernel;
- batches.py: model.fit(x, y)'s shuffled batches without the parallel hand-off; the validation
  batches as a plain dataset; cached flips drawn per epoch;
- here: the optimizer's slots and the metrics built before the first trace (one trace, not two),
  HEAD_STEPS_PER_EXECUTION steps per call on cached features, eager chunked inference.

TLKIT_PLAIN_KERAS=1 turns every lever off: `compile` with Keras's own optimizers and no prebuilt
state, `fit` on the arrays through Keras's own data adapter (cached flips through a PyDataset),
`predict`, the layers as built. Any result can be checked that way (tests/test_fastpath.py trains
the same heads both ways and compares the histories). A tf.distribute strategy in use (the spec's
`strategy`, tlkit/distribute.py) turns them off too: they are single-device tricks, and Keras's
own ways distribute (tests/test_distribute.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import numpy as np

from tlkit import distribute, sources, stream
from tlkit.fastpath import batches, optimizers, views

PLAIN_KERAS_ENV = "TLKIT_PLAIN_KERAS"

# Steps per call into TensorFlow when a head trains on cached features: a step of a Dense head is
# microseconds of arithmetic and milliseconds of dispatch, callbacks and metric reads. The same
# losses to the last digit (the same batches in the same order). Training through the whole base
# keeps 1 step: a step there takes seconds, and Ctrl-C is only seen between calls.
HEAD_STEPS_PER_EXECUTION = 32

# Inputs per eager call when a trained network runs in inference: Keras's predict would trace a
# graph for a model it sees once, and again for the last, partial batch.
INFERENCE_BATCH = 256

# fit_options' key for the mirrored training features (the spec's `flip`); fit_arguments takes it out.
MIRRORED = "x_train_mirrored"


def plain_keras() -> bool:
    """Whether to train the plain Keras way (every lever off): TLKIT_PLAIN_KERAS asks for it, or a
    tf.distribute strategy is in use (distribute.in_use()). The levers were made and measured for
    one device (fused kernels on one copy of a variable, state built before Keras's distributed
    set-up, batches drawn outside Keras's split between replicas, eager inference on one device);
    Keras's own compile, fit and predict run on every replica."""
    return os.environ.get(PLAIN_KERAS_ENV, "").strip().lower() in ("1", "true", "yes") or distribute.in_use()


def optimizer(name: str, learning_rate: float, momentum: float = 0.0):
    """The spec's optimizer: Keras's Adam or SGD; fused (optimizers.py) unless plain_keras()."""
    import keras

    module = keras.optimizers if plain_keras() else optimizers
    if name == "sgd":
        return module.SGD(learning_rate=learning_rate, momentum=momentum)
    return module.Adam(learning_rate=learning_rate)


def training_view(model):
    """The form in which `model` trains (views.training_view, or the same layers under
    plain_keras()): what a trial's checkpoint was saved from, so what it loads into."""
    return views.training_view(model, rewrite=not plain_keras())


def compiled(model, spec: dict, learning_rate: float, *, on_features: bool):
    """`model` compiled for training with the seed's loss and metric and the spec's optimizer: a
    training view of it (views.training_view: a model of its own over the same layers, so `model`
    keeps no training compile). on_features: the model trains on cached features (a head), not
    through the base; such steps are cheap, and run HEAD_STEPS_PER_EXECUTION to a call.
    After fitting, finish(view) puts what the view trained into `model`'s layers."""
    plain = plain_keras()
    view = training_view(model)
    steps = HEAD_STEPS_PER_EXECUTION if on_features and not plain else 1
    # jit: XLA for the training steps; off, Keras's own choice ("auto": XLA on a GPU, none on a CPU).
    import keras

    smoothing = spec.get("label_smoothing", 0.0)
    # The seed's loss by its name where nothing changes it, so autolog logs what it always did.
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing) if smoothing else "categorical_crossentropy"
    view.compile(optimizer=optimizer(spec["optimizer"], learning_rate, spec["momentum"]),
                 loss=loss, metrics=["accuracy"], steps_per_execution=steps,
                 jit_compile=True if spec.get("jit") else "auto")
    if not plain:
        _build_training_state(view)
    return view


def finish(view) -> None:
    """Copy what the view's own layers trained (centre taps) into the network's layers."""
    views.write_back(view)


def _build_training_state(model) -> None:
    """Create the optimizer's slots and the metrics' totals now, as Keras would inside fit.

    Keras (TensorFlow backend, no distribution strategy) leaves them to the first trace of the
    train function, and a tf.function that creates variables is traced twice, once to create them
    and once more to run. Built beforehand, with the values Keras would give them (zeros; no random
    draw), the function is traced once and trains the same numbers (tests/test_fastpath.py)."""
    model.optimizer.build(model.trainable_variables)
    zeros = [np.zeros((1, *output.shape[1:]), "float32") for output in model.outputs]
    y = zeros[0] if len(zeros) == 1 else zeros
    model.compute_loss(y=y, y_pred=y)
    model.compute_metrics(None, y, y)
    model.reset_metrics()


def fit_arguments(*args, **options) -> dict:
    """model.fit's arguments (train.fit_options' plain Keras keywords, or as keras-tuner's search
    passes them on) as keywords, with the arrays served the fast way: the training arrays as
    batches.training_batches, the validation arrays as a plain batched dataset, the steps stated
    (else Keras builds a second iterator an epoch that it never uses). Call it right before the
    fit: Keras draws the permutation's seed inside fit, and so do the training batches. Under
    plain_keras() the arrays stay arrays; cached flips come from a PyDataset either way.
    batch_size stays in the call beside a dataset: Keras ignores it there, and autolog logs it."""
    import inspect

    import keras

    mirror_images = options.pop(MIRRORED, None)
    options = inspect.signature(keras.Model.fit).bind_partial(None, *args, **options).arguments
    options.pop("self")
    options.update(options.pop("kwargs", {}))
    x, y = sources.of(options.get("x")), options.get("y")
    if x is None or sources.of(y) is None or options.get("validation_split"):
        if mirror_images is not None:
            raise ValueError("mirrored training features need the training features as a source")
        return options  # a dataset or a split to make: Keras's to serve
    batch_size = options["batch_size"] = options.get("batch_size") or 32  # Keras's default for arrays
    validation = options.get("validation_data")
    x_val = sources.of(validation[0]) if isinstance(validation, tuple) and len(validation) == 2 else None
    if x.in_memory() is None:
        # Samples read a batch at a time (cached features' files, images' files: stream.py), both
        # ways: Keras's own array pipeline needs them in memory, and a tf.data dataset is what plain
        # Keras streams from (cached flips: the PyDataset, reading its rows from the files too).
        if x_val is not None and x_val.in_memory() is None:
            options["validation_data"] = stream.batches(x_val, batch_size, labels=validation[1])
            options["validation_steps"] = math.ceil(len(validation[1]) / batch_size)
        if plain_keras() and mirror_images is not None:
            options["x"] = batches.mirrored_draws(x, options.pop("y"), batch_size, mirror_images)
            options.pop("batch_size")  # Keras refuses a batch size beside a PyDataset
            return options
        options["steps_per_epoch"] = math.ceil(len(y) / batch_size)
        options["x"] = batches.training_batches(x, options.pop("y"), batch_size, mirror_images)
        return options
    if plain_keras():
        if mirror_images is not None:
            options["x"] = batches.mirrored_draws(x.in_memory(), options.pop("y"), batch_size, mirror_images)
            options.pop("batch_size")  # Keras refuses a batch size beside a PyDataset
        return options
    if x_val is not None and x_val.in_memory() is not None and sources.of(validation[1]) is not None:
        options["validation_data"] = batches.validation_batches(x_val.in_memory(), validation[1], batch_size)
        options["validation_steps"] = math.ceil(len(validation[1]) / batch_size)
    options["steps_per_epoch"] = math.ceil(len(y) / batch_size)
    options["x"] = batches.training_batches(x, options.pop("y"), batch_size, mirror_images)
    return options


@contextlib.contextmanager
def shuffle_stays_logged():
    """Around a fit on a dataset from fit_arguments: Keras warns that shuffle=True is ignored for a
    dataset. The dataset shuffles itself; shuffle stays True in the call so that autolog's logged
    `shuffle` says what happens."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`shuffle=True` was passed", category=UserWarning)
        yield


def fit(model, spec: dict, options: dict, *, learning_rate: float, on_features: bool) -> dict[str, list[float]]:
    """Train `model` (its trainable layers) with train.fit_options' keywords; returns the history.
    The one call through which tlkit trains a network; one autologged fit, so call it inside its run."""
    view = compiled(model, spec, learning_rate, on_features=on_features)
    with shuffle_stays_logged():
        history = view.fit(**fit_arguments(**options))
    finish(view)
    return history.history


def predict(model, x) -> np.ndarray:
    """model's outputs on x in inference mode (dropout off, BatchNorm's moving statistics): by eager
    calls on chunks of INFERENCE_BATCH, or model.predict under plain_keras(); the same numbers
    (tests/test_fastpath.py)."""
    import keras

    x = sources.of(x)
    pixels = x.in_memory()
    if pixels is None:  # samples read a batch at a time (files: stream.py)
        inputs = stream.batches(x, INFERENCE_BATCH)
        if plain_keras():
            return np.asarray(model.predict(inputs, verbose=0))
        return np.concatenate([keras.ops.convert_to_numpy(model(batch, training=False)) for batch in inputs])
    if plain_keras():
        return np.asarray(model.predict(pixels, batch_size=INFERENCE_BATCH, verbose=0))
    return np.concatenate([keras.ops.convert_to_numpy(model(pixels[i:i + INFERENCE_BATCH], training=False))
                           for i in range(0, len(pixels), INFERENCE_BATCH)])
