"""Every variant end to end: the CLI, the run in MLflow, the reports, the logged model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
import zipfile

import h5py
import mlflow
import numpy as np
import pytest

from tlkit import data, models, spec as specs, views
from tlkit.train import long_lived_objects_frozen, train

from conftest import FAST_ARGS, REPO, cli, invoke


def only_run(experiment: str = "Default"):
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.variant != ''",
                              output_format="list")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def pyfunc_accuracy(model_uri: str, dataset) -> tuple[float, list[str]]:
    predictions = mlflow.pyfunc.load_model(model_uri).predict(dataset.x_test)
    truth = [dataset.class_names[i] for i in dataset.y_test.argmax(axis=1)]
    labels = list(predictions["label"])
    return float(np.mean([p == t for p, t in zip(labels, truth)])), labels


@pytest.mark.e2e
@pytest.mark.parametrize("variant", specs.variant_names())
def test_every_variant_through_the_cli(variant, image_folder, tracking):
    result = cli("train", variant, "--data", str(image_folder), *FAST_ARGS)
    assert result.exit_code == 0, result.output
    run = only_run()
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant"] == variant
    assert run.data.tags["base"] == "VGG16"
    assert run.data.tags["dataset"] == image_folder.name
    assert len(run.data.tags["dataset_digest"]) == 64
    inputs = {d.dataset.name: d for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == [f"{image_folder.name}-{c}" for c in ("test", "train", "validation")]
    test_input_tags = {t.key: t.value for t in inputs[f"{image_folder.name}-test"].tags}
    assert test_input_tags["images"] == "12" and test_input_tags["class_names"] == "circle,square,stripes"
    metrics = run.data.metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert {"test_precision_circle", "test_recall_square", "test_f1_stripes"} <= set(metrics)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "reports")}
    assert artifacts == {"reports/confusion_matrix.png", "reports/classification_report.json",
                         "reports/training_curves.png"}
    assert run.data.params["epochs"] == "2"
    # Autologging recorded the per-epoch curves of the fit that ran in this run (or its stages).
    client = mlflow.MlflowClient()
    stage_runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                    output_format="list")
    fitted = stage_runs if variant == "finetune" else [run]
    for r in fitted:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "val_loss")) >= 1
    if variant == "finetune":
        assert sorted(r.data.tags["stage"] for r in stage_runs) == ["finetune", "head"]
        # The first stage trains the head alone on the cached base output: block5 does not run.
        summaries = {r.data.tags["stage"]: mlflow.artifacts.load_text(f"runs:/{r.info.run_id}/model_summary.txt")
                     for r in stage_runs}
        assert "block5" not in summaries["head"] and "head_dense" in summaries["head"]
        assert "block5" in summaries["finetune"]
    # The logged model takes raw pixels and scores exactly what the run logged.
    dataset = data.load(str(image_folder), seed=1995)
    accuracy, _ = pyfunc_accuracy(f"runs:/{run.info.run_id}/model", dataset)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    # model.keras is compiled for evaluation: Keras's own optimizer, unbuilt, so no training state
    # and nothing of tlkit's in it (a user's plain keras.saving.load_model reads it: see below).
    keras_file = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model/artifacts/model.keras")
    with zipfile.ZipFile(keras_file) as archive:
        optimizer = json.loads(archive.read("config.json"))["compile_config"]["optimizer"]
        with h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
            optimizer_state = [name for name in weights.get("optimizer/vars", {})]
        config = archive.read("config.json").decode()
    assert optimizer["module"] == "keras.optimizers" and "tlkit" not in json.dumps(optimizer), optimizer
    assert "tlkit" not in config  # the trainable part inside the network keeps no training compile either
    assert len(optimizer_state) <= 2, optimizer_state  # iterations and learning rate at most
    if variant == "baseline":  # plain Keras, in a process that never imported tlkit, loads it without a warning
        loaded = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c",
                                 "import sys, keras; keras.saving.load_model(sys.argv[1])", keras_file],
                                capture_output=True, text=True)
        assert loaded.returncode == 0, loaded.stderr[-2000:]


@pytest.mark.e2e
def test_logged_model_predicts_what_the_trained_network_predicts(image_folder, tracking):
    spec = specs.load("conv_head", {"data": str(image_folder), "weights": "none", "epochs": 2})
    result = train("conv_head", spec)
    dataset = data.load(str(image_folder), seed=spec["seed"])
    accuracy, labels = pyfunc_accuracy(result.model_uri, dataset)
    assert labels == [dataset.class_names[i] for i in result.test_predictions]
    assert accuracy == pytest.approx(result.test_accuracy, abs=1e-6)
    # Any size and grayscale work too: the pyfunc resizes and adds channels.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(result.model_uri)
    assert not [w for w in caught if "type hint" in str(w.message)]  # predict is annotated
    big_gray = np.random.default_rng(0).integers(0, 255, (2, 50, 70, 1)).astype(np.uint8)
    out = model.predict(big_gray)
    assert list(out.columns) == ["label", "probability", "probabilities"]
    assert set(out["label"]) <= set(dataset.class_names)
    assert np.allclose([sum(p) for p in out["probabilities"]], 1.0, atol=1e-4)
    # A small request goes through the network in one call, a big one in chunks of ONE_CALL_IMAGES:
    # the same numbers either way.
    few = dataset.x_test[:5]
    many = np.concatenate([few] * 20)  # 100 images: more than serving.ONE_CALL_IMAGES
    one_call, batched = model.predict(few), model.predict(many)
    np.testing.assert_allclose(np.stack(one_call["probabilities"]), np.stack(batched["probabilities"][:5]),
                               atol=1e-6)
    assert list(one_call["label"]) == list(batched["label"][:5])


@pytest.mark.e2e
def test_finetune_for_0_epochs_is_the_head_alone(image_folder, tracking):
    result = cli("train", "finetune", "--data", str(image_folder), *FAST_ARGS, "--finetune-epochs", "0")
    assert result.exit_code == 0, result.output
    run = only_run()
    stages = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'", output_format="list")
    assert [r.data.tags["stage"] for r in stages] == ["head"]
    accuracy, _ = pyfunc_accuracy(f"runs:/{run.info.run_id}/model", data.load(str(image_folder), seed=1995))
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)


def test_a_conv_on_a_1x1_map_trains_as_its_centre_tap():
    """The training view computes what the 3x3 conv computes and, under SGD (no sign-taking step
    to amplify rounding, as Adam's first steps do), trains it to the same weights."""
    import keras

    spec = specs.load("conv_head", {"weights": "none", "conv_filters": 8, "units": 8, "optimizer": "sgd",
                                    "momentum": 0.9, "learning_rate": 0.05})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 1, 16)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 64), 3)

    def head():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((1, 1, 16))
        return keras.Model(inputs, models.HEADS["conv"](inputs, spec, 3))

    plain, viewed = head(), head()
    before = viewed.get_layer("head_conv").kernel.numpy().copy()
    view = views.training_view(viewed)
    assert view is not viewed
    np.testing.assert_allclose(view.predict(x, verbose=0), viewed.predict(x, verbose=0), atol=1e-6)
    # Only the centre tap is trained: 16x8 kernel entries instead of 3x3x16x8.
    assert models.parameter_counts(view)[0] == models.parameter_counts(plain)[0] - 8 * 16 * 8
    for model in (plain, view):
        models.compile_for_training(model, spec, spec["learning_rate"], models.HEAD_STEPS_PER_EXECUTION)
        model.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    views.write_back(view)
    got, want = viewed.get_layer("head_conv").kernel.numpy(), plain.get_layer("head_conv").kernel.numpy()
    assert np.abs(got[1, 1] - before[1, 1]).max() > 1e-3  # it trained
    np.testing.assert_allclose(got, want, atol=1e-5)
    off_centre = np.ones((3, 3), bool)
    off_centre[1, 1] = False
    np.testing.assert_array_equal(got[off_centre], before[off_centre])  # as in the plain conv: never moved
    np.testing.assert_allclose(viewed.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("count, dtype", [(100, "float32"), (96, "float16")])
def test_training_batches_are_the_batches_keras_draws_from_arrays(count, dtype):
    """train.training_batches against Keras's own array pipeline (what model.fit(x, y, shuffle=True)
    trains on): the same batches in the same order, every iterator (epoch), the last one partial or
    not, float16 features cast to float32 as Keras casts them."""
    import keras
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from tlkit import train

    rng = np.random.default_rng(2)
    x = rng.normal(size=(count, 1, 1, 4)).astype(dtype)
    y = keras.utils.to_categorical(rng.integers(0, 3, count), 3)

    def epochs(dataset):
        return [[tuple(np.asarray(t) for t in batch) for batch in dataset] for _ in range(2)]

    keras.utils.set_random_seed(4)
    ours = epochs(train.training_batches(x, y, 8))
    keras.utils.set_random_seed(4)
    theirs = epochs(ArrayDataAdapter(x, y, batch_size=8, shuffle=True).get_tf_dataset())
    assert len(ours[0]) == len(theirs[0]) == -(-count // 8)
    for our_epoch, their_epoch in zip(ours, theirs):
        for (our_x, our_y), (their_x, their_y) in zip(our_epoch, their_epoch):
            assert our_x.dtype == their_x.dtype == np.float32 and our_y.dtype == their_y.dtype
            np.testing.assert_array_equal(our_x, their_x)
            np.testing.assert_array_equal(our_y, their_y)
    assert not np.array_equal(ours[0][0][0], x[:8].astype("float32"))  # shuffled


def test_fit_is_the_seeds_model_fit_to_the_last_digit():
    """train.fit states validation_steps (one validation iterator an epoch, not two), builds the
    optimizer and metrics before fit and trains a view: none may change a number against the
    seed's plain compile and model.fit. Partial last batches in both splits, shuffling on."""
    import types

    import keras

    from tlkit import train

    spec = specs.load("baseline", {"weights": "none", "units": 8, "batch_size": 8, "patience": 0})
    rng = np.random.default_rng(0)
    x = {"train": rng.normal(size=(100, 1, 1, 16)).astype("float32"),
         "val": rng.normal(size=(20, 1, 1, 16)).astype("float32")}
    dataset = types.SimpleNamespace(y_train=keras.utils.to_categorical(rng.integers(0, 3, 100), 3),
                                    y_val=keras.utils.to_categorical(rng.integers(0, 3, 20), 3))

    def head():
        keras.utils.set_random_seed(3)
        inputs = keras.Input((1, 1, 16))
        return keras.Model(inputs, models.HEADS["dense"](inputs, spec, 3))

    ours = train.fit(head(), x, dataset, spec, epochs=4, learning_rate=1e-2,
                     steps_per_execution=models.HEAD_STEPS_PER_EXECUTION)
    seeds = head()  # compiled as the seed compiles: Keras builds the optimizer and metrics inside fit
    seeds.compile(optimizer=models.optimizer(spec["optimizer"], 1e-2, spec["momentum"]),
                  loss="categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=models.HEAD_STEPS_PER_EXECUTION)
    keras.utils.set_random_seed(3)
    want = seeds.fit(x["train"], dataset.y_train, validation_data=(x["val"], dataset.y_val), epochs=4,
                     batch_size=8, verbose=0).history
    assert set(ours) == set(want) and len(want["val_loss"]) == 4
    for key in want:
        assert ours[key] == want[key], key


def test_score_is_what_keras_evaluate_and_predict_say():
    """train.score calls the model eagerly in chunks (models.infer); the numbers are model.evaluate's
    and model.predict's: inference mode (dropout off, BatchNorm's moving statistics), a partial last chunk."""
    import keras

    from tlkit import train

    keras.utils.set_random_seed(5)
    inputs = keras.Input((1, 1, 16))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.BatchNormalization()(keras.layers.Dense(32, activation="relu")(x))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Dropout(0.5)(x))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    x_train, x_test = (rng.normal(size=(n, 1, 1, 16)).astype("float32") for n in (64, models.INFERENCE_BATCH + 44))
    y_train, y_test = (keras.utils.to_categorical(rng.integers(0, 3, n), 3) for n in (64, len(x_test)))
    models.compile_for_training(model, specs.load("baseline", {"weights": "none"}), 1e-2)
    model.fit(x_train, y_train, epochs=2, verbose=0)  # moving statistics away from their initial values
    loss, accuracy, probabilities = train.score(model, x_test, y_test)
    want_loss, want_accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    np.testing.assert_allclose(probabilities, model.predict(x_test, verbose=0), atol=1e-6)
    assert loss == pytest.approx(want_loss, abs=1e-5) and accuracy == pytest.approx(want_accuracy, abs=1e-7)
    assert probabilities.shape == (len(x_test), 3)


@pytest.mark.parametrize("shape, regularized", [((5, 5, 16), False), ((1, 1, 16), True), ((2, 2, 16), True)])
def test_a_conv_without_a_faster_exact_form_trains_as_it_is(shape, regularized):
    import keras

    inputs = keras.Input(shape)
    conv = keras.layers.Conv2D(4, 3, padding="same", kernel_regularizer=keras.regularizers.l2(0.01) if regularized else None)
    model = keras.Model(inputs, conv(inputs))
    view = views.training_view(model)
    assert view is not model and conv in view.layers  # a model of its own over the conv itself
    assert not any(hasattr(layer, "write_back") for layer in view.layers)


@pytest.mark.e2e
def test_a_conv_on_a_small_map_trains_as_one_matrix_product_on_its_own_weights():
    """VGG16's block5 at 2x2 (and a 3x3 map) in fine-tuning's view: the same outputs, the conv's own
    variables trained in place, and under SGD (no sign-taking step to amplify rounding, as Adam's
    first steps do) the same weights after training as the plain Keras conv, to float rounding."""
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
            models.compile_for_training(model, spec, 1e-3)
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
    assert conv not in views.training_view(model).layers
    monkeypatch.setenv(views.PLAIN_KERAS_ENV, "1")
    view = views.training_view(model)
    assert view is not model and conv in view.layers


def test_long_lived_objects_are_frozen_once_and_thawed_after():
    import gc

    assert gc.get_freeze_count() == 0
    with long_lived_objects_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with long_lived_objects_frozen():  # a suite's search: the suite's freeze stands
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0


@pytest.mark.e2e
def test_a_weights_file_is_really_loaded(image_folder, tracking, tmp_path):
    import keras

    keras.utils.set_random_seed(7)
    donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    donor.save_weights(path)
    result = cli("train", "baseline", "--data", str(image_folder), "--weights", str(path), "--epochs", "1")
    assert result.exit_code == 0, result.output
    run = only_run()
    assert run.data.tags["feature_cache_key"]
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path / "dl"))
    logged = keras.saving.load_model(f"{local}/artifacts/model.keras", compile=False)
    frozen = logged.get_layer("vgg16_frozen")
    for name in ("block1_conv1", "block5_conv3"):
        for got, want in zip(frozen.get_layer(name).get_weights(), donor.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)


@pytest.mark.e2e
def test_the_feature_cache_is_hit_the_second_time(image_folder, tracking):
    for _ in range(2):
        assert cli("train", "baseline", "--data", str(image_folder), *FAST_ARGS).exit_code == 0
    runs = mlflow.search_runs(experiment_names=["Default"], order_by=["attributes.start_time ASC"],
                              output_format="list")
    assert [r.data.tags["feature_cache"] for r in runs] == ["miss", "hit"]
    assert runs[0].data.tags["feature_cache_key"] == runs[1].data.tags["feature_cache_key"]
    assert runs[0].data.metrics["test_accuracy"] == runs[1].data.metrics["test_accuracy"]


@pytest.mark.e2e
def test_experiment_option(image_folder, tracking):
    result = cli("train", "sgd", "--data", str(image_folder), *FAST_ARGS, "--experiment", "mine")
    assert result.exit_code == 0, result.output
    assert only_run("mine").data.params["optimizer"] == "sgd"


@pytest.mark.e2e
def test_mlflow_run_baseline(image_folder, tracking, tmp_path):
    """The user's command: `mlflow run . -e baseline --env-manager local`."""
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "baseline", "--env-manager", "local",
               "-P", f"data={image_folder}", "-P", "weights=none", "-P", "epochs=1", "-P", "batch_size=8",
               "--experiment-name", "projects"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = only_run("projects")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "baseline"
    assert "test_accuracy" in run.data.metrics
    # The project's model scores what the run logged (a model that loads but predicts wrongly fails here).
    accuracy, _ = pyfunc_accuracy(f"runs:/{run.info.run_id}/model", data.load(str(image_folder), seed=1995))
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)


def test_mlproject_is_generated_from_the_specs():
    from tlkit import mlproject

    assert (REPO / "MLproject").read_text() == mlproject.render(), "run: python -m tlkit.mlproject > MLproject"


def test_help_is_fast_and_states_defaults():
    done = subprocess.run([sys.executable, "-c", "import sys, tlkit.cli; "
                           "sys.exit(int('tensorflow' in sys.modules or 'mlflow' in sys.modules))"])
    assert done.returncode == 0, "tlkit.cli must not import TensorFlow or MLflow at import time"
    out = cli("train", "--help").output
    assert "baseline: 1995" in out and "baseline: 'VGG16'" in out


@pytest.mark.e2e
@pytest.mark.parametrize("args, message", [
    (["train", "nope"], "unknown variant 'nope'"),
    (["train", "baseline", "--epochs", "0"], "epochs must be a positive integer"),
    (["train", "baseline", "--learning-rate", "-1"], "learning_rate must be greater than 0"),
    (["train", "dropout", "--dropout", "1.0"], "dropout must be in [0, 1)"),
    (["train", "baseline", "--base", "VGG19"], "unknown base 'VGG19'"),
    (["train", "baseline", "--image-size", "16"], "image_size 16 is too small for VGG16"),
    (["train", "baseline", "--weights", "/no/such.h5"], "weights file /no/such.h5 does not exist"),
    (["train", "baseline", "--data", "/no/such/folder", "--weights", "none"], "/no/such/folder"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tracking):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.e2e
def test_finetune_and_frozen_variants_share_one_pass_of_the_base(image_folder, tracking, tmp_path):
    """finetune caches below block5 and stores the base's output too; baseline then derives nothing
    and runs no base: its features equal those of a pass of the whole base."""
    from tlkit import features, models
    from tlkit.train import frozen_features, load_dataset

    shared = str(tmp_path / "shared")
    for variant in ("finetune", "baseline"):
        result = cli("train", variant, "--data", str(image_folder), *FAST_ARGS, "--cache-dir", shared)
        assert result.exit_code == 0, result.output
    runs = {r.data.tags["variant"]: r for r in mlflow.search_runs(
        experiment_names=["Default"], filter_string="tags.variant != ''", output_format="list")}
    assert runs["finetune"].data.tags["feature_cache"] == "miss"
    assert runs["finetune"].data.tags["feature_boundary"] == "block4_pool"
    assert runs["baseline"].data.tags["feature_cache"] == "hit"  # finetune stored the base's output
    assert len(list((tmp_path / "shared").iterdir())) == 2

    # The other order: baseline finds only the lower entry and derives its features from it.
    spec = specs.load("baseline", {"data": str(image_folder), "weights": "none"})
    dataset = load_dataset(spec)
    network = models.build(spec, len(dataset.class_names))
    key = features.key_of(features.key_fields(spec, dataset.digest, network.boundary))
    entry = tmp_path / "shared" / key
    direct = np.array(features.FeatureCache(shared).read(key).test)
    import shutil
    shutil.rmtree(entry)
    derived = frozen_features(network, dataset, spec, shared)
    assert derived.derived_from and not derived.hit
    np.testing.assert_allclose(np.array(derived.test), direct, rtol=1e-4, atol=1e-5)
    fresh = frozen_features(network, dataset, spec, str(tmp_path / "fresh"))
    assert not fresh.hit and not fresh.derived_from
    np.testing.assert_allclose(np.array(fresh.test), direct, rtol=1e-4, atol=1e-5)


def test_mirrored_batches_draw_each_sample_once_as_itself_or_mirrored():
    """`flip` from the cache: every epoch each training sample comes once, as itself or as its
    mirror image (a fair coin per sample per epoch), with its own label."""
    import keras

    from tlkit import train

    count = 200
    x = np.arange(count, dtype="float32").reshape(count, 1, 1, 1)
    y = keras.utils.to_categorical(np.arange(count) % 3, 3)
    keras.utils.set_random_seed(4)
    batches = train.training_batches(x, y, 8, x_mirrored=-x - 1000)
    coins = []
    for _ in range(2):  # a new iterator, a new draw: as Keras starts one an epoch
        xs, ys = zip(*[(np.asarray(bx).ravel(), np.asarray(by)) for bx, by in batches])
        xs, ys = np.concatenate(xs), np.concatenate(ys)
        flipped = xs < 0
        ids = np.where(flipped, -xs - 1000, xs).astype(int)
        assert sorted(ids) == list(range(count))
        np.testing.assert_array_equal(ys, y[ids])
        assert 60 < flipped.sum() < 140  # p = 1/2 each
        coins.append(flipped[np.argsort(ids)])
    assert not np.array_equal(coins[0], coins[1])
    with pytest.raises(ValueError, match="mirrored training features"):
        train.training_batches(x, y, 8, x_mirrored=x[:10])


@pytest.mark.e2e
def test_flips_come_from_cached_features_of_the_mirror_images(image_folder, tracking, tmp_path):
    """finetune with flips: the mirror images of the training split get entries of their own (train
    alone), at block4_pool and, derived, at the base's output; a frozen variant after it reuses them
    (no new pass); the stored features are the extractor's on the mirrored images."""
    import keras

    result = cli("train", "finetune", "--data", str(image_folder), *FAST_ARGS, "--flip", "--finetune-epochs", "1")
    assert result.exit_code == 0, result.output
    metas = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/meta.json")}
    mirrored = {m["fields"]["boundary"]: key for key, m in metas.items() if m["fields"].get("transform") == "hflip"}
    assert sorted(mirrored) == ["block4_pool", "block5_pool"]
    assert all(set(metas[key]["sha256"]) == {"train"} for key in mirrored.values())
    assert len(metas) == 4  # and the three-split entries at both boundaries

    result = cli("train", "augment", "--data", str(image_folder), *FAST_ARGS)  # augment: flips from the cache
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 4  # nothing new computed
    run = mlflow.search_runs(filter_string="tags.variant = 'augment'", output_format="list")[0]
    assert run.data.tags["feature_cache"] == "hit" and run.data.params["flip"] == "True"

    spec = specs.load("baseline", {"data": str(image_folder), "weights": "none"})
    dataset = data.load(str(image_folder), seed=spec["seed"])
    network = models.build(spec, dataset.num_classes)
    want = network.extractor.predict(dataset.x_train[:, :, ::-1], verbose=0)
    got = np.load(tmp_path / "cache" / mirrored["block5_pool"] / "train.npy")
    unflipped = network.extractor.predict(dataset.x_train, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert np.abs(got - unflipped).max() > 100 * np.abs(got - want).max()  # the mirror images' own


@pytest.mark.parametrize("extra, message", [(["--flip", "--augment"], "flip comes from the feature cache"),
                                            (["--flip", "--trainable-base"], "use --no-flip")])
def test_flip_with_a_whole_network_variant_is_refused(extra, message, image_folder, tracking):
    result = invoke("train", "baseline", "--data", str(image_folder), *FAST_ARGS, *extra)
    assert result.exit_code == 2 and message in result.output
