"""Guards for the private or undocumented names tlkit uses (README: "Private APIs"): an upgrade that
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
             "tlkit/optimizers.py")
        index = optimizer._get_variable_index(variable)
        for slot in slots:
            need(hasattr(optimizer, slot) and tuple(getattr(optimizer, slot)[index].shape) == (2,),
                 f"{cls.__name__}.{slot}", "tlkit/optimizers.py")
    need(hasattr(keras.Variable([1.0]).value, "handle"), "keras.Variable.value.handle (TensorFlow backend)",
         "tlkit/optimizers.py")


def test_mlflow_active_experiment_lookup():
    import mlflow.tracking.fluent as fluent

    need(callable(getattr(fluent, "_get_experiment_id", None)), "mlflow.tracking.fluent._get_experiment_id",
         "tlkit/registry.py, tracking.py, tune.py")


@pytest.mark.parametrize("module, names", [
    ("keras_tuner.src.engine.tuner_utils", ()),
    ("keras_tuner.src.engine.trial", ("TrialStatus",)),
    ("keras_tuner.src.protos", ("get_service_grpc",)),
    ("keras_tuner.src.distribute.oracle_chief", ("OracleServicer",)),
])
def test_keras_tuner_modules_that_tune_imports(module, names):
    try:
        loaded = importlib.import_module(module)
    except ImportError:
        loaded = None
    need(loaded is not None, module, "tlkit/tune.py")
    for name in names:
        need(hasattr(loaded, name), f"{module}.{name}", "tlkit/tune.py")


def test_keras_tuner_hooks_that_tune_overrides():
    import keras_tuner

    for name in ("_build_and_fit_model", "_get_checkpoint_fname", "_get_build_config_fname", "run_trial"):
        need(callable(getattr(keras_tuner.Tuner, name, None)), f"keras_tuner.Tuner.{name}", "tlkit/tune.py")
