"""The fast path's door (tlkit/fastpath): each lever computes what plain Keras computes, and the
same heads trained both ways (TLKIT_PLAIN_KERAS=1 or not) end with the same histories."""

from __future__ import annotations

import types

import numpy as np
import pytest

from tlkit import fastpath, models, spec as specs, train
from tlkit.fastpath import batches, optimizers, views

# --------------------------------------------------------------------------- both ways

# The histories of a head trained the fast way and the plain Keras way agree to this relative
# tolerance. What differs is float32 rounding only: the same batches in the same order (test below),
# the same initial weights, the same update formulas; but TensorFlow's fused Adam kernel and the
# matrix-product conv round differently from Keras's ops (~1e-7 a step), and training carries those
# differences along. Measured over the 4 epochs below: at most 1.3e-6 apart (Adam), 2.2e-7 (the
# block5 products), 0 (SGD on a Dense head); 1e-5 leaves room for other CPUs' kernels.
HISTORY_RTOL = 1e-5


def plain_keras(monkeypatch, on: bool) -> None:
    monkeypatch.setenv(fastpath.PLAIN_KERAS_ENV, "1" if on else "")


def features_and_labels(shape, count=100, val=20, seed=0):
    import keras

    rng = np.random.default_rng(seed)
    inputs = {"train": rng.normal(size=(count, *shape)).astype("float32"),
              "val": rng.normal(size=(val, *shape)).astype("float32")}
    labels = types.SimpleNamespace(y_train=keras.utils.to_categorical(rng.integers(0, 3, count), 3),
                                   y_val=keras.utils.to_categorical(rng.integers(0, 3, val), 3))
    return inputs, labels


def head_of(spec, shape):
    import keras

    keras.utils.set_random_seed(3)
    return models.head_model(spec, shape, 3)


def both_ways(monkeypatch, build, inputs, labels, spec, *, on_features: bool, learning_rate=1e-2):
    histories = {}
    for plain in (False, True):
        plain_keras(monkeypatch, plain)
        model = build()
        import keras

        keras.utils.set_random_seed(3)
        histories[plain] = train.fit(model, inputs, labels, spec, epochs=4, learning_rate=learning_rate,
                                     on_features=on_features)
    return histories[False], histories[True]


def assert_same_history(fast: dict, plain: dict) -> None:
    assert set(fast) == set(plain) and len(plain["val_loss"]) == 4
    for key in plain:
        np.testing.assert_allclose(fast[key], plain[key], rtol=HISTORY_RTOL, err_msg=key)


@pytest.mark.e2e  # trains: seconds each
@pytest.mark.parametrize("variant, optimizer", [("baseline", "adam"), ("dropout", "adam"), ("sgd", "sgd")])
def test_a_dense_head_trains_the_same_both_ways(variant, optimizer, monkeypatch):
    spec = specs.load(variant, {"weights": "none", "units": 16, "batch_size": 8, "patience": 0})
    assert spec["optimizer"] == optimizer
    inputs, labels = features_and_labels((1, 1, 16))
    fast, plain = both_ways(monkeypatch, lambda: head_of(spec, (1, 1, 16)), inputs, labels, spec, on_features=True)
    assert_same_history(fast, plain)
    assert plain["loss"][-1] < plain["loss"][0]  # it trained


@pytest.mark.e2e  # trains: seconds each
def test_a_conv_head_on_a_1x1_map_trains_the_same_both_ways(monkeypatch):
    """The fast way trains the conv's centre tap alone (views.CentreTap); SGD, as Adam's first
    sign-taking steps would amplify the rounding of a product against a conv."""
    spec = specs.load("conv_head", {"weights": "none", "conv_filters": 8, "units": 8, "batch_size": 8,
                                    "patience": 0, "optimizer": "sgd", "momentum": 0.9})
    inputs, labels = features_and_labels((1, 1, 16))
    fast, plain = both_ways(monkeypatch, lambda: head_of(spec, (1, 1, 16)), inputs, labels, spec,
                            on_features=True, learning_rate=0.05)
    assert_same_history(fast, plain)


@pytest.mark.e2e  # trains: seconds each
def test_fine_tuning_block5_on_2x2_maps_trains_the_same_both_ways(monkeypatch):
    """VGG16's block5 and the head on block4_pool features (32 px images): the fast way trains the
    convs as matrix products (views.Im2colConv2D) with fused SGD."""
    import keras

    spec = specs.load("finetune", {"weights": "none", "units": 8, "batch_size": 8, "patience": 0, "optimizer": "sgd",
                                   "momentum": 0.9})
    inputs, labels = features_and_labels((2, 2, 512), count=32, val=8)

    def network():
        keras.utils.set_random_seed(3)
        built = models.build(spec, 3)
        models.set_unfrozen(built, True)
        return built.trainable

    fast, plain = both_ways(monkeypatch, network, inputs, labels, spec, on_features=True, learning_rate=1e-3)
    assert_same_history(fast, plain)


def test_plain_keras_is_keras_own_compile_fit_and_predict(monkeypatch):
    import keras

    spec = specs.load("baseline", {"weights": "none", "units": 8})
    plain_keras(monkeypatch, True)
    view = fastpath.compiled(head_of(spec, (1, 1, 16)), spec, 1e-3, on_features=True)
    assert type(view.optimizer) is keras.optimizers.Adam and not view.optimizer.built  # Keras builds it in fit
    options = train.fit_options(spec, np.zeros((10, 1, 1, 16), "float32"), np.zeros((10, 3), "float32"),
                                np.zeros((4, 1, 1, 16), "float32"), np.zeros((4, 3), "float32"), 1)
    served = fastpath.fit_arguments(**options)
    assert isinstance(served["x"], np.ndarray) and isinstance(served["validation_data"], tuple)
    assert "steps_per_epoch" not in served and "validation_steps" not in served
    plain_keras(monkeypatch, False)
    fast = fastpath.compiled(head_of(spec, (1, 1, 16)), spec, 1e-3, on_features=True)
    assert type(fast.optimizer) is optimizers.Adam and fast.optimizer.built
    assert not isinstance(fastpath.fit_arguments(**options)["x"], np.ndarray)


@pytest.mark.e2e  # trains: seconds each
def test_predict_is_the_same_both_ways(monkeypatch):
    """fastpath.predict calls the model eagerly in chunks; the numbers are model.predict's and
    model.evaluate's: inference mode (dropout off, BatchNorm's moving statistics), a partial last chunk."""
    import keras

    keras.utils.set_random_seed(5)
    inputs = keras.Input((1, 1, 16))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.BatchNormalization()(keras.layers.Dense(32, activation="relu")(x))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Dropout(0.5)(x))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    x_train, x_test = (rng.normal(size=(n, 1, 1, 16)).astype("float32") for n in (64, fastpath.INFERENCE_BATCH + 44))
    y_train, y_test = (keras.utils.to_categorical(rng.integers(0, 3, n), 3) for n in (64, len(x_test)))
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=2, verbose=0)  # moving statistics away from their initial values
    fast = fastpath.predict(model, x_test)
    plain_keras(monkeypatch, True)
    np.testing.assert_allclose(fastpath.predict(model, x_test), fast, atol=1e-6)
    from tlkit import evaluate

    loss, accuracy, probabilities = evaluate.score(model, x_test, y_test)
    want_loss, want_accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    assert loss == pytest.approx(want_loss, abs=1e-5) and accuracy == pytest.approx(want_accuracy, abs=1e-7)
    assert probabilities.shape == (len(x_test), 3)


# --------------------------------------------------------------------------- the levers, one by one

@pytest.mark.parametrize("count, dtype", [(100, "float32"), (96, "float16")])
def test_training_batches_are_the_batches_keras_draws_from_arrays(count, dtype):
    """batches.training_batches against Keras's own array pipeline (what model.fit(x, y, shuffle=True)
    trains on): the same batches in the same order, every iterator (epoch), the last one partial or
    not, float16 features cast to float32 as Keras casts them."""
    import keras
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    rng = np.random.default_rng(2)
    x = rng.normal(size=(count, 1, 1, 4)).astype(dtype)
    y = keras.utils.to_categorical(rng.integers(0, 3, count), 3)

    def epochs(dataset):
        return [[tuple(np.asarray(t) for t in batch) for batch in dataset] for _ in range(2)]

    keras.utils.set_random_seed(4)
    ours = epochs(batches.training_batches(x, y, 8))
    keras.utils.set_random_seed(4)
    theirs = epochs(ArrayDataAdapter(x, y, batch_size=8, shuffle=True).get_tf_dataset())
    assert len(ours[0]) == len(theirs[0]) == -(-count // 8)
    for our_epoch, their_epoch in zip(ours, theirs):
        for (our_x, our_y), (their_x, their_y) in zip(our_epoch, their_epoch):
            assert our_x.dtype == their_x.dtype == np.float32 and our_y.dtype == their_y.dtype
            np.testing.assert_array_equal(our_x, their_x)
            np.testing.assert_array_equal(our_y, their_y)
    assert not np.array_equal(ours[0][0][0], x[:8].astype("float32"))  # shuffled


@pytest.mark.e2e  # trains: seconds each
def test_the_fast_fit_is_the_seeds_model_fit_to_the_last_digit(monkeypatch):
    """Stated steps (one validation iterator an epoch, not two), the optimizer and metrics built
    before fit, steps_per_execution and a view: none may change a number against a plain compile
    and model.fit with the same (fused) optimizer. Partial last batches in both splits, shuffling on."""
    import keras

    plain_keras(monkeypatch, False)
    spec = specs.load("baseline", {"weights": "none", "units": 8, "batch_size": 8, "patience": 0})
    inputs, labels = features_and_labels((1, 1, 16))
    keras.utils.set_random_seed(3)
    ours = train.fit(head_of(spec, (1, 1, 16)), inputs, labels, spec, epochs=4, learning_rate=1e-2, on_features=True)
    seeds = head_of(spec, (1, 1, 16))  # compiled as the seed compiles: Keras builds the optimizer and metrics in fit
    seeds.compile(optimizer=fastpath.optimizer(spec["optimizer"], 1e-2, spec["momentum"]),
                  loss="categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=fastpath.HEAD_STEPS_PER_EXECUTION)
    keras.utils.set_random_seed(3)
    want = seeds.fit(inputs["train"], labels.y_train, validation_data=(inputs["val"], labels.y_val), epochs=4,
                     batch_size=8, verbose=0).history
    assert set(ours) == set(want) and len(want["val_loss"]) == 4
    for key in want:
        assert ours[key] == want[key], key


@pytest.mark.parametrize("plain", [False, True])
def test_mirrored_batches_draw_each_sample_once_as_itself_or_mirrored(plain, monkeypatch):
    """`flip` from the cache, both ways (a dataset; Keras's PyDataset): every epoch each training
    sample comes once, as itself or as its mirror image (a fair coin per sample per epoch), with its label."""
    import keras

    count = 200
    x = np.arange(count, dtype="float32").reshape(count, 1, 1, 1)
    y = keras.utils.to_categorical(np.arange(count) % 3, 3)
    keras.utils.set_random_seed(4)
    make = batches.mirrored_draws if plain else batches.training_batches
    drawn = make(x, y, 8, x_mirrored=-x - 1000)
    coins = []
    for _ in range(2):  # a new iterator (a new epoch), a new draw
        pairs = [drawn[i] for i in range(len(drawn))] if plain else list(drawn)
        if plain:
            drawn.on_epoch_end()
        xs, ys = zip(*[(np.asarray(bx).ravel(), np.asarray(by)) for bx, by in pairs])
        xs, ys = np.concatenate(xs), np.concatenate(ys)
        flipped = xs < 0
        ids = np.where(flipped, -xs - 1000, xs).astype(int)
        assert sorted(ids) == list(range(count))
        np.testing.assert_array_equal(ys, y[ids])
        assert 60 < flipped.sum() < 140  # p = 1/2 each
        coins.append(flipped[np.argsort(ids)])
    assert not np.array_equal(coins[0], coins[1])
    with pytest.raises(ValueError, match="mirrored training features"):
        make(x, y, 8, x_mirrored=x[:10])


@pytest.mark.e2e  # trains: seconds each
def test_a_conv_on_a_1x1_map_trains_as_its_centre_tap():
    """The training view computes what the 3x3 conv computes and, under SGD (no sign-taking step
    to amplify rounding, as Adam's first steps do), trains it to the same weights."""
    import keras

    spec = specs.load("conv_head", {"weights": "none", "conv_filters": 8, "units": 8, "optimizer": "sgd",
                                    "momentum": 0.9, "learning_rate": 0.05})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 1, 16)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 64), 3)
    plain, viewed = head_of(spec, (1, 1, 16)), head_of(spec, (1, 1, 16))
    before = viewed.get_layer("head_conv").kernel.numpy().copy()
    view = views.training_view(viewed)
    assert view is not viewed
    np.testing.assert_allclose(view.predict(x, verbose=0), viewed.predict(x, verbose=0), atol=1e-6)
    # Only the centre tap is trained: 16x8 kernel entries instead of 3x3x16x8.
    assert models.parameter_counts(view)[0] == models.parameter_counts(plain)[0] - 8 * 16 * 8
    for model in (plain, view):
        model.compile(optimizer=fastpath.optimizer("sgd", 0.05, 0.9), loss="categorical_crossentropy")
        model.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    views.write_back(view)
    got, want = viewed.get_layer("head_conv").kernel.numpy(), plain.get_layer("head_conv").kernel.numpy()
    assert np.abs(got[1, 1] - before[1, 1]).max() > 1e-3  # it trained
    np.testing.assert_allclose(got, want, atol=1e-5)
    off_centre = np.ones((3, 3), bool)
    off_centre[1, 1] = False
    np.testing.assert_array_equal(got[off_centre], before[off_centre])  # as in the plain conv: never moved
    np.testing.assert_allclose(viewed.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("shape, regularized", [((5, 5, 16), False), ((1, 1, 16), True), ((2, 2, 16), True)])
def test_a_conv_without_a_faster_exact_form_trains_as_it_is(shape, regularized):
    import keras

    inputs = keras.Input(shape)
    conv = keras.layers.Conv2D(4, 3, padding="same", kernel_regularizer=keras.regularizers.l2(0.01) if regularized else None)
    model = keras.Model(inputs, conv(inputs))
    view = views.training_view(model)
    assert view is not model and conv in view.layers  # a model of its own over the conv itself
    assert not any(hasattr(layer, "write_back") for layer in view.layers)


@pytest.mark.e2e  # trains: seconds each
def test_a_conv_on_a_small_map_trains_as_one_matrix_product_on_its_own_weights():
    """VGG16's block5 at 2x2 (and a 3x3 map) in fine-tuning's view: the same outputs, the conv's own
    variables trained in place, and under SGD the same weights after training as the plain Keras
    conv, to float rounding."""
    import keras

    spec = specs.load("finetune", {"weights": "none", "units": 8, "optimizer": "sgd", "momentum": 0.9})
    rng = np.random.default_rng(0)
    y = keras.utils.to_categorical(rng.integers(0, 3, 32), 3)
    for size, positions in ((32, (2, 2)), (48, (3, 3))):
        def network():
            keras.utils.set_random_seed(3)
            built = models.build(dict(spec, image_size=size), 3)
            models.set_unfrozen(built, True)
            return built

        plain, viewed = network(), network()
        x = rng.normal(size=(32, *plain.trainable.input.shape[1:])).astype("float32")
        view = views.training_view(viewed.trainable)
        replaced = [layer for layer in view.get_layer(viewed.upper.name).layers if type(layer).__name__ == "Im2colConv2D"]
        assert [layer.conv.name for layer in replaced] == ["block5_conv1", "block5_conv2", "block5_conv3"]
        assert tuple(replaced[0].conv.input.shape[1:3]) == positions
        # The same variables, not copies: what trains is the logged network's block5.
        assert {id(v) for v in view.trainable_variables} == {id(v) for v in viewed.trainable.trainable_variables}
        np.testing.assert_allclose(view(x, training=False), viewed.trainable(x, training=False), rtol=1e-4, atol=1e-5)
        for model in (plain.trainable, view):
            model.compile(optimizer=fastpath.optimizer("sgd", 1e-3, 0.9), loss="categorical_crossentropy")
            model.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        got = viewed.base.get_layer("block5_conv3").kernel.numpy()
        want = plain.base.get_layer("block5_conv3").kernel.numpy()
        before = network().base.get_layer("block5_conv3").kernel.numpy()
        assert np.abs(want - before).max() > 1e-4  # it trained
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_plain_keras_switch_trains_the_layers_as_they_are(monkeypatch):
    import keras

    inputs = keras.Input((2, 2, 8))
    conv = keras.layers.Conv2D(4, 3, padding="same")
    model = keras.Model(inputs, conv(inputs))
    plain_keras(monkeypatch, False)
    assert conv not in fastpath.training_view(model).layers
    plain_keras(monkeypatch, True)
    view = fastpath.training_view(model)
    assert view is not model and conv in view.layers


# --------------------------------------------------------------------------- fused optimizers

SHAPES = [(64, 32), (32,), (32, 10), (10,)]


def apply_fifty_steps(optimizer):
    """Variables after 50 updates from fixed gradients, and the op types of one traced update."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=shape).astype("float32")) for shape in SHAPES]
    gradients = [[tf.constant(rng.normal(size=shape).astype("float32")) for shape in SHAPES] for _ in range(50)]
    optimizer.build(variables)

    @tf.function
    def update(grads):
        optimizer.apply_gradients(zip(grads, variables))

    for grads in gradients:
        update(grads)
    op_types = {op.type for op in update.get_concrete_function(gradients[0]).graph.get_operations()}
    return [v.numpy() for v in variables], op_types


@pytest.mark.parametrize("name, kwargs, kernel, exact", [
    ("Adam", {}, "ResourceApplyAdam", False),
    ("SGD", {"momentum": 0.9}, "ResourceApplyKerasMomentum", True),
    ("SGD", {}, "ResourceApplyGradientDescent", True),
])
def test_fused_updates_are_keras_updates(name, kwargs, kernel, exact):
    import keras

    want, keras_ops = apply_fifty_steps(getattr(keras.optimizers, name)(learning_rate=1e-2, **kwargs))
    got, fused_ops = apply_fifty_steps(getattr(optimizers, name)(learning_rate=1e-2, **kwargs))
    assert kernel in fused_ops and kernel not in keras_ops
    for g, w in zip(got, want):
        if exact:  # the kernel's formula is Keras's, operation for operation
            np.testing.assert_array_equal(g, w)
        else:  # Adam's vectorised kernel rounds differently: 50 steps of lr 1e-2 on values ~1
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", [("Adam", {"amsgrad": True}), ("SGD", {"momentum": 0.9, "nesterov": True})])
def test_what_the_kernels_do_not_cover_is_keras_own_update(name, kwargs):
    import keras

    want, _ = apply_fifty_steps(getattr(keras.optimizers, name)(learning_rate=1e-2, **kwargs))
    got, fused_ops = apply_fifty_steps(getattr(optimizers, name)(learning_rate=1e-2, **kwargs))
    assert not {op for op in fused_ops if op.startswith("ResourceApply")}
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_the_config_autologging_records_is_keras_own(monkeypatch):
    import keras

    plain_keras(monkeypatch, False)
    for name, momentum in (("adam", 0.0), ("sgd", 0.9)):
        ours = fastpath.optimizer(name, 1e-3, momentum)
        keras_own = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[name](1e-3, **(
            {"momentum": momentum} if name == "sgd" else {}))
        ours_config, keras_config = ours.get_config(), keras_own.get_config()
        # Keras numbers the names of later instances (adam_1): the default name is Keras's own.
        assert ours_config.pop("name").startswith(name) and keras_config.pop("name").startswith(name)
        assert ours_config == keras_config
        assert type(keras.optimizers.deserialize(keras.optimizers.serialize(ours))) is type(ours)


# --------------------------------------------------------------------------- features from disk

@pytest.mark.e2e  # trains: seconds each
@pytest.mark.parametrize("flip", [False, True])
def test_features_read_from_their_files_train_as_the_arrays_do(flip, tmp_path):
    """The memory path: a head on cached features read from their files a batch at a time
    (sources.FeatureFile, what the cache hands out) ends with the history of the same head on the
    same features held as arrays, at the same seed: the same batches, coins and steps."""
    import keras

    from tlkit import features, sources

    spec = specs.load("baseline", {"weights": "none", "flip": flip})
    inputs, labels = features_and_labels((2, 2, 8), count=150, val=30)
    mirrored = np.random.default_rng(9).normal(size=inputs["train"].shape).astype("float32")
    arrays = {"pool": np.concatenate([inputs["train"], inputs["val"]]), "test": mirrored}
    cache = features.FeatureCache(tmp_path)
    cache.write("k" * 24, {"for": "test"}, arrays)
    entry = cache.read("k" * 24).split(np.arange(150), np.arange(150, 180))
    on_disk = {"train": entry.train, "val": entry.val}
    assert all(x.in_memory() is None for x in on_disk.values())
    histories = []
    for these in ({**inputs, "train_mirrored": mirrored if flip else None},
                  {**on_disk, "train_mirrored": entry.test if flip else None}):
        keras.utils.set_random_seed(3)
        model = head_of(spec, (2, 2, 8))
        keras.utils.set_random_seed(3)
        histories.append(train.fit(model, these, labels, spec, epochs=3, learning_rate=1e-2, on_features=True))
    assert histories[0].keys() == histories[1].keys()
    for name in histories[0]:
        np.testing.assert_allclose(histories[1][name], histories[0][name], rtol=1e-6, err_msg=name)
    # And scoring reads the files the same way.
    np.testing.assert_allclose(fastpath.predict(model, entry.val), fastpath.predict(model, inputs["val"]), rtol=1e-6)
