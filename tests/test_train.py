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

from tlkit import data, models, spec as specs
from tlkit.train import long_lived_objects_frozen, train

from conftest import FAST_ARGS, REPO, cli, image_rows, invoke


def only_run(experiment: str = "Default"):
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.variant != ''",
                              output_format="list")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def pyfunc_accuracy(model_uri: str, dataset) -> tuple[float, list[str]]:
    predictions = mlflow.pyfunc.load_model(model_uri).predict(image_rows(dataset.x_test))
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
    fitted = stage_runs if variant in ("finetune", "tune") else [run]  # stages; a search's trials
    if variant == "tune":
        assert {r.data.tags["stage"] for r in stage_runs} == {"trial"} and len(stage_runs) == 6  # the seed's 6
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
    out = model.predict(image_rows(big_gray))
    assert list(out.columns) == ["label", "probability", "probabilities"]
    assert set(out["label"]) <= set(dataset.class_names)
    assert np.allclose([sum(p) for p in out["probabilities"]], 1.0, atol=1e-4)
    # A small request goes through the network in one call, a big one in chunks of ONE_CALL_IMAGES:
    # the same numbers either way.
    few = dataset.x_test[:5]
    many = np.concatenate([few] * 20)  # 100 images: more than serving.ONE_CALL_IMAGES
    one_call, batched = model.predict(image_rows(few)), model.predict(image_rows(many))
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
    # This process made them (tests/test_cluster.py: features made by Ray say ray).
    assert {(r.data.tags["feature_engine"], r.data.tags["feature_workers"]) for r in runs} == {("local", "1")}


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


@pytest.mark.e2e
def test_flips_come_from_cached_features_of_the_mirror_images(image_folder, tracking, tmp_path):
    """finetune with flips: the mirror images of the training pool get entries of their own (the pool
    alone), at block4_pool and, derived, at the base's output; a frozen variant after it reuses them
    (no new pass); the stored features are the extractor's on the mirrored images."""
    result = cli("train", "finetune", "--data", str(image_folder), *FAST_ARGS, "--flip", "--finetune-epochs", "1")
    assert result.exit_code == 0, result.output
    metas = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/meta.json")}
    mirrored = {m["fields"]["boundary"]: key for key, m in metas.items() if m["fields"].get("transform") == "hflip"}
    assert sorted(mirrored) == ["block4_pool", "block5_pool"]
    assert all(set(metas[key]["sha256"]) == {"pool"} for key in mirrored.values())
    assert len(metas) == 4  # and the pool-and-test entries at both boundaries

    result = cli("train", "augment", "--data", str(image_folder), *FAST_ARGS)  # augment: flips from the cache
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 4  # nothing new computed
    run = mlflow.search_runs(filter_string="tags.variant = 'augment'", output_format="list")[0]
    assert run.data.tags["feature_cache"] == "hit" and run.data.params["flip"] == "True"

    spec = specs.load("baseline", {"data": str(image_folder), "weights": "none"})
    dataset = data.load(str(image_folder), seed=spec["seed"])
    network = models.build(spec, dataset.num_classes)
    want = network.extractor.predict(np.asarray(dataset.x_pool)[:, :, ::-1], verbose=0)
    got = np.load(tmp_path / "cache" / mirrored["block5_pool"] / "pool.npy")
    unflipped = network.extractor.predict(np.asarray(dataset.x_pool), verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert np.abs(got - unflipped).max() > 100 * np.abs(got - want).max()  # the mirror images' own


@pytest.mark.parametrize("extra, message", [(["--flip", "--augment"], "flip comes from the feature cache"),
                                            (["--flip", "--trainable-base"], "use --no-flip")])
def test_flip_with_a_whole_network_variant_is_refused(extra, message, image_folder, tracking):
    result = invoke("train", "baseline", "--data", str(image_folder), *FAST_ARGS, *extra)
    assert result.exit_code == 2 and message in result.output


def trained_with_flips(variant: str, spec: dict, image_folder, tmp_path):
    """Train `spec` into tmp_path's cache; the logged model must predict what the run's test
    accuracy says. (result, dataset, predicted labels, the cache entries' meta.json)."""
    result = train(variant, spec, cache_dir=str(tmp_path / "cache"))
    dataset = data.load(str(image_folder), seed=spec["seed"])
    accuracy, labels = pyfunc_accuracy(result.model_uri, dataset)
    assert labels == [dataset.class_names[i] for i in result.test_predictions]
    assert accuracy == pytest.approx(result.test_accuracy, abs=1e-6)
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/meta.json")]
    return result, dataset, labels, metas


@pytest.mark.e2e
def test_test_time_flips_with_flips_and_fine_tuning(image_folder, tracking, tmp_path):
    """finetune with flips and tta: the mirrored pool's validation rows and the mirrored test images
    (and the base output derived from them) score the two stages; the logged model answers the same."""
    spec = specs.load("finetune", {"data": str(image_folder), "weights": "none", "epochs": 1, "finetune_epochs": 1,
                                   "flip": True, "tta": True})
    result, dataset, _, metas = trained_with_flips("finetune", spec, image_folder, tmp_path)
    mirrored = sorted((m["fields"]["boundary"], sorted(m["sha256"])) for m in metas
                      if m["fields"].get("transform") == "hflip")
    assert mirrored == [("block4_pool", ["pool"]), ("block4_pool", ["test"]),
                        ("block5_pool", ["pool"]), ("block5_pool", ["test"])]


@pytest.mark.e2e
def test_test_time_flips_score_what_the_logged_model_answers(image_folder, tracking, tmp_path):
    """tta: the validation and test scores are the mean of each image's probabilities and its mirror
    image's, from cached mirrored features (an entry for the validation images, one for the test); the
    logged model computes the same from raw pixels, so predict answers what test_accuracy says, and
    the mirror of an image gets the very same answer."""
    spec = specs.load("baseline", {"data": str(image_folder), "weights": "none", "epochs": 2, "tta": True})
    result, dataset, labels, metas = trained_with_flips("baseline", spec, image_folder, tmp_path)
    # tta without flips: the mirrored test images, and the mirrored validation images alone.
    assert sorted(sorted(m["sha256"]) for m in metas if m["fields"].get("transform") == "hflip") == [["test"], ["val"]]
    model = mlflow.pyfunc.load_model(result.model_uri)
    images = np.asarray(dataset.x_test[:4])
    both = [np.stack(model.predict(image_rows(x))["probabilities"]) for x in (images, images[:, :, ::-1])]
    np.testing.assert_allclose(both[0], both[1], atol=1e-6)  # symmetric by construction

    untta = train("baseline", {**spec, "tta": False}, cache_dir=str(tmp_path / "cache"))
    # The same weights (the same seed), scored without the mirror images: other probabilities.
    assert untta.test_loss != pytest.approx(result.test_loss, abs=1e-7)
    # ... and the tta run logs what those weights score without the flips: the run without tta's scores.
    logged = mlflow.get_run(result.run_id).data.metrics
    assert logged["test_accuracy_without_tta"] == pytest.approx(untta.test_accuracy)
    assert logged["val_accuracy_without_tta"] == pytest.approx(untta.val_accuracy)
    assert "val_accuracy_without_tta" not in mlflow.get_run(untta.run_id).data.metrics
