"""Xception as a base: trained, logged and served from raw pixels (its own preprocessing inside the
model), its minimum input checked in one line, and the real ImageNet weights file transferring."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from PIL import Image

from conftest import FAST_ARGS, REPO, assert_clear, cli, image_rows, invoke

XCEPTION_WEIGHTS = REPO.parent / "shared" / "data" / "xception-imagenet-notop.weights.h5"


def test_xception_refuses_an_input_below_71_px_in_one_line(image_folder, tracking):
    assert_clear(invoke("train", "baseline", "--data", str(image_folder), "--base", "Xception", *FAST_ARGS,
                        "--image-size", "64"), 2, "image_size 64 is too small for Xception: it needs at least 71")


@pytest.mark.e2e
def test_xception_trains_fine_tunes_logs_and_serves_raw_pixels(image_folder, tracking):
    result = cli("train", "finetune", "--data", str(image_folder), "--base", "Xception", *FAST_ARGS,
                 "--image-size", "71", "--preprocess", "base", "--unfreeze", "top2", "--finetune-epochs", "1",
                 "--units", "8")
    assert result.exit_code == 0, result.output
    run = mlflow.search_runs(filter_string="tags.mlflow.runName = 'finetune'", output_format="list",
                             order_by=["attributes.start_time ASC"])[0]
    assert run.data.params["base"] == "Xception" and run.data.params["unfreeze"] == "top2"
    assert 0 <= run.data.metrics["test_accuracy"] <= 1
    # The logged model takes raw pixels of any size: resized and scaled inside.
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((image_folder / "test").rglob("*.png"))[:4]]
    probabilities = model.predict(image_rows(images))
    assert probabilities.shape[0] == 4


@pytest.mark.e2e
def test_the_real_xception_weights_transfer_to_cifar10(cifar_sample, tracking):
    if not XCEPTION_WEIGHTS.exists():
        pytest.skip(f"{XCEPTION_WEIGHTS} not present (../shared/data/README.md)")
    result = cli("train", "baseline", "--data", str(cifar_sample), "--base", "Xception", "--weights",
                 str(XCEPTION_WEIGHTS), "--image-size", "71", "--preprocess", "base", "--limit", "1000",
                 "--test-limit", "300", "--epochs", "4")
    assert result.exit_code == 0, result.output
    run = mlflow.search_runs(output_format="list")[0]
    # Random weights classify CIFAR-10 at about 16%; the ImageNet features transfer.
    assert run.data.metrics["test_accuracy"] > 0.35, run.data.metrics
