"""`tlkit export`: SavedModel, ONNX and LiteRT files of a registered model, each checked in its own
runtime against the logged model, and what --log leaves in the store.

The model is a real MobileNetV3Small (weights none, 32 px, its own preprocessing inside) logged
with tracking.log_model as training logs it, registered, and exported through the CLI in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import CLASSES, assert_clear, cli, invoke

from tlkit import export, serving


@pytest.fixture
def registered(tracking, image_folder):
    """models:/shapes-mobilenet/1: a MobileNetV3Small logged by a run whose data is image_folder."""
    import keras

    from tlkit import models, spec as specs, tracking as tracked

    spec = dict(specs.DEFAULTS, base="MobileNetV3Small", weights="none", preprocess="base", image_size=32, seed=3)
    keras.utils.set_random_seed(3)
    built = models.build(spec, len(CLASSES))
    # With random weights and BatchNorm's initial statistics the signal shrinks to ~1e-11 by the last
    # block and every image gets 1/3 per class: a check that would compare nothing. A moving variance
    # of 0.08 keeps the features at ~0.2, and the probabilities apart (0.22..0.42, measured).
    for layer in built.base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 0.08, "float32"))
    network = built.full
    with mlflow.start_run() as run:
        mlflow.log_params({"data": str(image_folder), "base": spec["base"]})
        info = tracked.log_model(network, list(CLASSES), np.zeros((1, 32, 32, 3), np.uint8), spec)
    version = mlflow.register_model(info.model_uri, "shapes-mobilenet")
    return f"models:/shapes-mobilenet/{version.version}", run.info.run_id


@pytest.mark.e2e
def test_every_format_passes_its_parity_check_and_is_logged(registered, tmp_path, image_folder):
    uri, run_id = registered
    dst = tmp_path / "shipped"
    result = cli("export", "--model", uri, "--format", "saved_model", "--format", "onnx,litert",
                 "--dst", str(dst), "--sample", "12", "--log")
    assert result.exit_code == 0, result.output
    print(result.output)
    assert "float32 (N, 32, 32, 3)" in result.output
    summary = json.loads((dst / "export.json").read_text())
    assert summary["class_names"] == list(CLASSES) and summary["image_size"] == 32
    checks = {c["format"]: c for c in summary["checks"]}
    assert set(checks) == {"saved_model", "onnx", "litert"}
    for c in checks.values():
        assert c["passed"] and c["images"] == 12 and c["max_difference"] < export.TOLERANCE
        assert c["decided"] > 0 and c["top1_agreement"] == 1.0, c  # a random network still has clear margins
    assert sorted(p.name for p in dst.iterdir()) == ["export.json", "model.onnx", "model.tflite", "saved_model"]

    # Each file again, in its runtime, on other pixels than the check's: the logged model's answers.
    model = mlflow.pyfunc.load_model(uri)
    images = np.random.default_rng(5).integers(0, 256, (4, 45, 40, 3)).astype(np.uint8)  # resized to 32
    logged = np.stack(model.predict(export.serving_rows(images))["probabilities"])
    pixels = serving.to_network_input(images, 32)
    for fmt, run_format in export.RUNTIMES.items():
        np.testing.assert_allclose(run_format(dst / export.FORMATS[fmt][0], pixels), logged, atol=1e-5)

    version = mlflow.MlflowClient().get_model_version("shapes-mobilenet", uri.rsplit("/", 1)[1])
    assert version.tags["export_formats"] == "saved_model,onnx,litert"
    assert float(version.tags["export_onnx_max_difference"]) < export.TOLERANCE
    assert version.tags["export_litert_top1_agreement"].startswith("1.0000 of ")
    description = mlflow.MlflowClient().get_registered_model("shapes-mobilenet").description
    assert "Exported formats (tlkit export): version 1: saved_model, onnx, litert" in description
    logged_files = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, export.EXPORTED_ARTIFACTS)}
    assert logged_files == {"exported/saved_model", "exported/model.onnx", "exported/model.tflite",
                            "exported/export.json"}


def test_a_file_that_answers_otherwise_fails_the_check():
    logged = np.array([[0.7, 0.2, 0.1], [0.34, 0.33, 0.33], [0.1, 0.1, 0.8]])
    same = export.compare("onnx", Path("m"), logged, logged + 1e-7, export.TOLERANCE)
    assert same.passed and same.decided == 3 and same.top1_agreement == 1.0
    # Off by more than rounding: fails, even where the top-1 classes agree.
    drifted = export.compare("onnx", Path("m"), logged, logged + np.array([0.0, 0.0, 1e-3]), export.TOLERANCE)
    assert not drifted.passed and drifted.max_difference == pytest.approx(1e-3)
    # A top-1 that moves on an image whose margin (0.2) exceeds the largest difference (0.11) fails,
    # at any tolerance; within a near tie (margin 0.01) it is not counted.
    clear = np.array([[0.6, 0.4, 0.0]])
    check = export.compare("onnx", Path("m"), clear, np.array([[0.49, 0.51, 0.0]]), 1.0)
    assert check.decided == 1 and check.top1_agreement == 0.0 and not check.passed
    near_tie = export.compare("onnx", Path("m"), logged[1:2], logged[1:2, [1, 0, 2]], 1.0)
    assert near_tie.decided == 0 and near_tie.passed


def test_without_the_exporters_it_says_what_to_install(monkeypatch):
    # The exporters are installed here (the test extra): their absence is shown to the one lookup made.
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name: None if name in ("tf2onnx", "ai_edge_litert") else object())
    result = invoke("export", "--model", "runs:/x/model", "--format", "onnx,litert", "--dst", "out")
    assert_clear(result, 1, "needs ai-edge-litert, tf2onnx, not installed: pip install 'tlkit[export]'")
    assert len(result.output.strip().splitlines()) == 1


def test_bad_input_is_one_line(tracking, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    assert_clear(invoke("export", "--model", "runs:/x/model", "--format", "tflite", "--dst", "o"), 2,
                 "--format tflite: choose from saved_model, onnx, litert")
    assert_clear(invoke("export", "--model", "runs:/x/model", "--format", "onnx", "--dst", str(tmp_path / "full")), 2,
                 "is not a new or empty folder")
    assert (tmp_path / "full" / "x").read_text() == "mine"
