"""A trained network's outcome, scored and logged the same way by every run that trains one.

train, tune's parent run and pretrain call log_outcome: test loss and accuracy, the reports, the
end-to-end model."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlkit import fastpath, reports, stats, tracking

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    test_loss: float
    test_accuracy: float
    probabilities: np.ndarray  # class probabilities per test image, in the data set's order


def predict(model, x, x_mirrored=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities of model on inputs x (fastpath.predict: what model.predict gives), and
    with x_mirrored (the same samples' mirror images, the spec's `tta`) the mean of each with its
    mirror's, as models.with_test_time_flips computes it in the logged network; else None. A tta run
    reports both from one prediction of each (train.py: the same weights with and without the flips)."""
    probabilities = fastpath.predict(model, x)
    if x_mirrored is None:
        return probabilities, None
    return probabilities, (probabilities + fastpath.predict(model, x_mirrored)) / 2  # keras.layers.Average's order


def loss_and_accuracy(probabilities: np.ndarray, y) -> tuple[float, float]:
    """The seed's categorical cross-entropy (averaged) and accuracy of probabilities against one-hot y:
    the numbers model.evaluate gives."""
    import keras

    loss = float(np.mean(keras.ops.convert_to_numpy(keras.losses.categorical_crossentropy(y, probabilities))))
    return loss, float(np.mean(probabilities.argmax(axis=1) == y.argmax(axis=1)))


def score(model, x, y, x_mirrored=None) -> tuple[float, float, np.ndarray]:
    """Loss, accuracy and class probabilities of model on x against one-hot y; with x_mirrored,
    those of each sample averaged with its mirror image's (predict)."""
    plain, flipped = predict(model, x, x_mirrored)
    probabilities = plain if flipped is None else flipped
    return (*loss_and_accuracy(probabilities, y), probabilities)


def log_outcome(model, x_test, dataset, *, history: dict, spec: dict, stage_starts=(), logged_network=None,
                metrics: dict | None = None, x_test_mirrored=None, probabilities: np.ndarray | None = None) -> Outcome:
    """Score `model` on x_test (the test images, or their cached features) against the data set's
    labels and log into the active run: test_accuracy, test_loss, test_images and `metrics`, the
    per-image predictions (stats.PREDICTIONS_ARTIFACT), the reports (reports/: confusion matrix,
    per-class scores, curves; per-class metrics), then
    `logged_network` (the end-to-end network that takes raw pixels) as the model, if given.
    x_test_mirrored: the test samples' mirror images, for test-time flips (score).
    probabilities: the test images' as score would give them, where the caller has them already."""
    import mlflow

    if probabilities is None:
        test_loss, test_accuracy, probabilities = score(model, x_test, dataset.y_test, x_test_mirrored)
    else:
        test_loss, test_accuracy = loss_and_accuracy(probabilities, dataset.y_test)
    truth = dataset.y_test.argmax(axis=1)
    mlflow.log_metrics({"test_accuracy": test_accuracy, "test_loss": test_loss, "test_images": float(len(truth)),
                        **(metrics or {})})
    low, high = stats.wilson_interval(int(np.sum(probabilities.argmax(axis=1) == truth)), len(truth))
    log.info("test accuracy %.2f%% (95%% interval %.2f-%.2f%%, loss %.4f) on %d images", 100 * test_accuracy,
             100 * low, 100 * high, test_loss, len(truth))
    with tempfile.TemporaryDirectory() as tmp:
        # Per image, in the data set's order: any two runs on this digest can be compared image by image.
        predictions = Path(tmp) / Path(stats.PREDICTIONS_ARTIFACT).name
        predictions.write_bytes(stats.predictions_bytes(truth, probabilities, dataset.class_names, dataset.digest))
        mlflow.log_artifact(str(predictions), str(Path(stats.PREDICTIONS_ARTIFACT).parent))
        folder = Path(tmp) / "reports"
        per_class = reports.write_all(folder, truth, probabilities, dataset.class_names, history, stage_starts)
        tracking.log_reports(folder)
    mlflow.log_metrics(per_class)
    if logged_network is not None:
        tracking.log_model(logged_network, dataset.class_names, dataset.x_test[:2], spec)
    return Outcome(test_loss, test_accuracy, probabilities)
