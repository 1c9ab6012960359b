"""A trained network's outcome, scored and logged the same way by every run that trains one.

train, tune's parent run and pretrain call log_outcome: test loss and accuracy, the reports, the
end-to-end model."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    test_loss: float
    test_accuracy: float
    probabilities: np.ndarray  # class probabilities per test image, in the data set's order


def score(model, x, y) -> tuple[float, float, np.ndarray]:
    """Test loss (the seed's categorical cross-entropy, averaged), accuracy and class probabilities
    of model on inputs x with one-hot labels y, from fastpath.predict: the numbers model.evaluate gives."""
    import keras

    from tlkit import fastpath

    probabilities = fastpath.predict(model, x)
    loss = float(np.mean(keras.ops.convert_to_numpy(keras.losses.categorical_crossentropy(y, probabilities))))
    accuracy = float(np.mean(probabilities.argmax(axis=1) == y.argmax(axis=1)))
    return loss, accuracy, probabilities


def log_outcome(model, x_test, dataset, *, history: dict, spec: dict, stage_starts=(), logged_network=None,
                metrics: dict | None = None) -> Outcome:
    """Score `model` on x_test (the test images, or their cached features) against the data set's
    labels and log into the active run: test_accuracy, test_loss and `metrics`, the reports
    (reports/: confusion matrix, per-class scores, curves; per-class metrics), then
    `logged_network` (the end-to-end network that takes raw pixels) as the model, if given."""
    import mlflow

    from tlkit import reports, tracking

    test_loss, test_accuracy, probabilities = score(model, x_test, dataset.y_test)
    mlflow.log_metrics({"test_accuracy": test_accuracy, "test_loss": test_loss, **(metrics or {})})
    log.info("test accuracy %.2f%% (loss %.4f) on %d images", 100 * test_accuracy, test_loss, len(dataset.y_test))
    with tempfile.TemporaryDirectory() as tmp:
        per_class = reports.write_all(Path(tmp), dataset.y_test.argmax(axis=1), probabilities, dataset.class_names,
                                      history, stage_starts)
        tracking.log_reports(Path(tmp))
    mlflow.log_metrics(per_class)
    if logged_network is not None:
        tracking.log_model(logged_network, dataset.class_names, dataset.x_test[:2], spec)
    return Outcome(test_loss, test_accuracy, probabilities)
