"""Guards for the private or undocumented names tlkit uses (docs/development.md: "Private APIs"): an upgrade that
removes or changes one fails here, naming it, rather than somewhere deep in a run. pyproject.toml
bounds each package below its next minor version, so a fresh install gets the tested combination."""

from __future__ import annotations

import importlib

import pytest


def need(ok: bool, api: str, used_by: str) -> None:
    assert ok, f"private API {api} is gone or changed (used by {used_by}): pin the package or port the use"


def test_keras_optimizer_internals_that_the_fused_updates_read():
    import keras

    for cls, slots in ((keras.optimizers.Adam, ("_momentums", "_velocities")), (keras.optimizers.SGD, ("momentums",))):
        optimizer = cls(learning_rate=0.1, **({"momentum": 0.9} if cls is keras.optimizers.SGD else {}))
        variable = keras.Variable([1.0, 2.0])
        optimizer.build([variable])
        need(callable(getattr(optimizer, "_get_variable_index", None)), f"{cls.__name__}._get_variable_index",
             "tlkit/fastpath/optimizers.py")
        index = optimizer._get_variable_index(variable)
        for slot in slots:
            need(hasattr(optimizer, slot) and tuple(getattr(optimizer, slot)[index].shape) == (2,),
                 f"{cls.__name__}.{slot}", "tlkit/fastpath/optimizers.py")
    need(hasattr(keras.Variable([1.0]).value, "handle"), "keras.Variable.value.handle (TensorFlow backend)",
         "tlkit/fastpath/optimizers.py")


def test_mlflow_active_experiment_lookup():
    import mlflow.tracking.fluent as fluent

    need(callable(getattr(fluent, "_get_experiment_id", None)), "mlflow.tracking.fluent._get_experiment_id",
         "tlkit/tracking.py experiment_id()")


def test_mlflow_reports_a_dropped_background_batch_on_its_queue_logger(tracking):
    """autolog logs per-epoch metrics in the background and drops a batch that fails; the only trace
    is an ERROR on the queue's logger naming the run, which tracking.run turns into a failed run."""
    import mlflow
    from mlflow.entities import Metric

    from tlkit import tracking as tlkit_tracking

    tlkit_tracking.watch_background_logging()
    with mlflow.start_run() as run:
        # A metric name the store refuses (over 250 characters): the batch fails in the background.
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=[Metric("k" * 300, 1.0, 0, 0)], synchronous=False)
        mlflow.flush_async_logging()
    need(len(tlkit_tracking.dropped.of(run.info.run_id)) == 1,
         f"an ERROR naming the run on logger {tlkit_tracking.DroppedBatches.LOGGER} for a dropped batch",
         "tlkit/tracking.py DroppedBatches")


@pytest.mark.parametrize("module, names, used_by", [
    ("keras_tuner.src.engine.tuner_utils", ("convert_to_metrics_dict", "get_best_step"), "tlkit/tune/trials.py"),
    ("keras_tuner.src.protos", ("get_service_grpc",), "tlkit/tune/distributed.py"),
    ("keras_tuner.src.distribute.oracle_chief", ("OracleServicer", "exit_chief"), "tlkit/tune/distributed.py"),
])
def test_keras_tuner_modules_that_tune_imports(module, names, used_by):
    try:
        loaded = importlib.import_module(module)
    except ImportError:
        loaded = None
    need(loaded is not None, module, used_by)
    for name in names:
        need(hasattr(loaded, name), f"{module}.{name}", used_by)


def test_keras_tuner_hooks_that_tune_overrides():
    import keras_tuner

    for name in ("_build_and_fit_model", "_get_checkpoint_fname", "_get_build_config_fname", "run_trial"):
        need(callable(getattr(keras_tuner.Tuner, name, None)), f"keras_tuner.Tuner.{name}", "tlkit/tune/trials.py")


def test_keras_tuner_trial_status_is_the_string_finish_compares():
    import keras_tuner

    from tlkit.tune import search

    need(getattr(keras_tuner.engine.trial.TrialStatus, "COMPLETED", None) == "COMPLETED",
         "keras_tuner TrialStatus.COMPLETED == 'COMPLETED'", search.__name__)


def test_tensorflow_data_experimental_names_the_training_batches_use():
    import tensorflow as tf

    need(callable(getattr(tf.data.experimental, "assert_cardinality", None)), "tf.data.experimental.assert_cardinality",
         "tlkit/fastpath/batches.py")
    need(hasattr(tf.data.experimental.ExternalStatePolicy, "IGNORE"), "tf.data.experimental.ExternalStatePolicy.IGNORE",
         "tlkit/fastpath/batches.py")
