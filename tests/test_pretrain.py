"""Pre-training (the seed's step 1) and `classes`: a source task and a target task from one data set.

The base is MobileNetV3Small (0.9M parameters, the fastest keras.applications base here) on the
tiny shapes folder: real training, real MLflow, a few seconds per run.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import subprocess
import sys
import warnings

import h5py
import mlflow
import numpy as np
import pytest

from tlkit import models, pretrain as pretraining, spec as specs
from tlkit.features import file_sha256

from conftest import REPO, cli, image_rows

SMALL = ["--base", "MobileNetV3Small", "--preprocess", "base"]


def file_arrays(path) -> list[np.ndarray]:
    """Every array in a .weights.h5 file, read with h5py: not through the Keras loader under test."""
    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def fingerprints(arrays) -> collections.Counter:
    # Keras keys the file by layer class and position, not by layer name: compare the arrays as a multiset.
    return collections.Counter((a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()) for a in arrays)


def logged_base(run_id: str, tmp_path) -> collections.Counter:
    """Fingerprints of the base's weights in the network that run `run_id` logged as `model`."""
    import keras

    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / run_id))
    network = keras.saving.load_model(f"{local}/artifacts/model.keras", compile=False)
    return fingerprints(network.get_layer("MobileNetV3Small_frozen").get_weights())


@pytest.mark.e2e
def test_pretrain_writes_a_base_that_every_variant_loads(image_folder, tracking, tmp_path):
    result = cli("pretrain", "--data", str(image_folder), *SMALL, "--epochs", "2", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    path = tmp_path / result.output.strip().splitlines()[-1]  # the last line is the file, under ./pretrained
    sha = file_sha256(path)
    assert path.parent == tmp_path / "pretrained" and path.name == f"MobileNetV3Small-{sha[:12]}.weights.h5"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it

    run = mlflow.search_runs(experiment_names=["Default"], filter_string="tags.tool = 'pretrain'",
                             output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["weights_sha256"] == sha and run.data.tags["classes"] == "circle,square,stripes"
    assert run.data.params["trainable_base"] == "True" and run.data.params["augment"] == "True"
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2  # autologged, one per epoch
    logged = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/pretrained/{path.name}",
                                                 dst_path=str(tmp_path / "artifact"))
    assert file_sha256(logged) == sha

    # The base trained with BatchNorm in training mode: moving means left their initial zeros.
    with h5py.File(path, "r") as f:
        means = [f[f"layers/{name}/vars/2"][()] for name in f["layers"] if name.startswith("batch_normalization")]
    assert means and any(np.abs(m).max() > 0 for m in means)

    # `baseline` with weights=<file>: the logged network's base holds exactly the file's weights.
    result = cli("train", "baseline", "--data", str(image_folder), *SMALL, "--weights", str(path), "--epochs", "1")
    assert result.exit_code == 0, result.output
    train_run = mlflow.search_runs(experiment_names=["Default"], filter_string="tags.variant = 'baseline'",
                                   output_format="list")[0]
    assert logged_base(train_run.info.run_id, tmp_path) == fingerprints(file_arrays(path))
    fresh = models.load_base("MobileNetV3Small", "none", 32)
    assert fingerprints(fresh.get_weights()) != fingerprints(file_arrays(path))

    # The convolutional weights do not depend on the input size: the file loads at 48x48 too.
    assert fingerprints(models.load_base("MobileNetV3Small", str(path), 48).get_weights()) == \
        fingerprints(file_arrays(path))
    # Every variant takes the file (finetune: unfreeze this base's last block; scratch: then trains it whole).
    for variant in specs.variant_names():
        overrides = {"data": str(image_folder), "base": "MobileNetV3Small", "preprocess": "base", "weights": str(path)}
        if specs.load(variant)["unfreeze"]:
            overrides["unfreeze"] = models.BASES["MobileNetV3Small"].last_block
        built = models.build(specs.load(variant, overrides), 3)
        assert fingerprints(built.base.get_weights()) == fingerprints(file_arrays(path)), variant

    # A file of another base is a one-line error (exit 2), not a half-loaded network. (Keras warns
    # once per unmatched container first: expected here.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = cli("train", "baseline", "--data", str(image_folder), "--base", "MobileNetV2", "--weights", str(path))
    assert result.exit_code == 2
    assert f"weights file {path} does not fit MobileNetV2" in result.output


@pytest.mark.e2e
def test_tune_and_suite_take_the_file(image_folder, tracking, tmp_path):
    spec = pretraining.pretrain_spec({"data": str(image_folder), "base": "MobileNetV3Small", "preprocess": "base",
                                      "epochs": 1, "batch_size": 8})
    _, path = pretraining.pretrain(spec, output=tmp_path / "base.weights.h5")
    expected = fingerprints(file_arrays(path))
    given = ["--data", str(image_folder), *SMALL, "--weights", str(path), "--epochs", "1", "--batch-size", "8"]

    result = cli("tune", *given, "--max-trials", "1")
    assert result.exit_code == 0, result.output
    tune_run = re.search(r"\brun (\w+): test_accuracy", result.output).group(1)
    assert logged_base(tune_run, tmp_path) == expected

    result = cli("suite", "--variants", "baseline", *given, "--no-promote")
    assert result.exit_code == 0, result.output
    child = mlflow.search_runs(experiment_names=["Default"], output_format="list",
                               filter_string="tags.variant = 'baseline' and tags.mlflow.parentRunId != ''")
    assert len(child) == 1 and logged_base(child[0].info.run_id, tmp_path) == expected


def test_scratch_trains_the_whole_base(image_folder, tracking):
    spec = specs.load("scratch", {"data": str(image_folder), "base": "MobileNetV3Small", "preprocess": "base"})
    assert spec["weights"] == "none" and spec["trainable_base"]
    network = models.build(spec, 3)
    frozen_base = models.build(dict(spec, trainable_base=False), 3)
    base_trainable, _ = models.parameter_counts(network.base)
    # The base's weights train on top of the head's (BatchNorm's moving statistics are never "trainable").
    assert base_trainable > 0
    assert models.parameter_counts(network.full)[0] == models.parameter_counts(frozen_base.full)[0] + base_trainable
    # Its BatchNorm statistics follow the batches within tens of steps (keras.applications' 0.999 does not).
    momenta = {layer.momentum for layer in network.base.layers if hasattr(layer, "moving_mean")}
    assert momenta and max(momenta) <= 0.9
    with pytest.raises(specs.SpecError, match="trainable_base"):
        specs.load("scratch", {"unfreeze": "block5"})


@pytest.mark.e2e
def test_classes_select_and_order_end_to_end(image_folder, tracking):
    result = cli("train", "baseline", "--data", str(image_folder), "--classes", "stripes,circle",
                 "--weights", "none", "--epochs", "1", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    run = mlflow.search_runs(experiment_names=["Default"], output_format="list")[0]
    assert run.data.params["classes"] == "stripes,circle"
    class_tags = {t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "class_names"}
    assert class_tags == {"stripes,circle"}  # in the order given
    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/reports/classification_report.json")
    assert [report[name]["support"] for name in ("stripes", "circle")] == [4, 4] and "square" not in report
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.metadata["class_names"] == ["stripes", "circle"]
    out = model.predict(image_rows(np.zeros((3, 32, 32, 3), np.uint8)))
    assert set(out["label"]) <= {"stripes", "circle"} and all(len(p) == 2 for p in out["probabilities"])
    assert {"test_f1_stripes", "test_f1_circle"} <= set(run.data.metrics)
    assert not any("square" in name for name in run.data.metrics)


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["train baseline", "pretrain"])
def test_an_unknown_class_is_one_line_and_exit_2(command, image_folder, tracking):
    result = cli(*command.split(), "--data", str(image_folder), "--classes", "circle,hexagon", *SMALL,
                 "--weights", "none")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {image_folder}: unknown class 'hexagon' in classes (available: circle, square, stripes)")
    assert mlflow.search_runs(experiment_names=["Default"], output_format="list") == []


@pytest.mark.parametrize("args, message", [
    (["--output", "base.h5"], "must be a file name ending in .weights.h5"),
    (["--output", "."], "must be a file name ending in .weights.h5"),
    (["--base", "MobileNetV3Small"], "MobileNetV3Small scales raw pixels itself"),
    (["--unfreeze", "block5"], "No such option '--unfreeze'"),
])
def test_pretrain_rejects_bad_options_before_training(args, message, image_folder, tracking, tmp_path):
    result = cli("pretrain", "--data", str(image_folder), *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "pretrained").exists()
    with pytest.raises(specs.SpecError, match="unfreeze cannot be set"):
        pretraining.pretrain_spec({"unfreeze": "block5"})


@pytest.mark.e2e
def test_mlflow_run_pretrain_with_classes(image_folder, tracking, tmp_path):
    """The MLproject entry point, with a source task of two classes out of three."""
    output = tmp_path / "out" / "source.weights.h5"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "pretrain", "--env-manager", "local",
               "-P", f"data={image_folder}", "-P", "classes=stripes,circle", "-P", "base=MobileNetV3Small",
               "-P", "preprocess=base", "-P", "epochs=1", "-P", "batch_size=8", "-P", f"output={output}",
               "--experiment-name", "projects"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["projects"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "pretrain"
    assert run.data.tags["classes"] == "stripes,circle"
    assert output.is_file() and run.data.tags["weights_sha256"] == file_sha256(output)
