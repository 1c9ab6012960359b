"""Which runs: the experiment a command means, its variant runs (or one suite's), and the models they logged.

compare.py ranks these runs and registry.py promotes among them; both read them from here. Every
function talks to the tracking server named by MLflow's own rules (MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

from tlkit import tracking


class RegistryError(ValueError):
    """Nothing to compare or promote, or an experiment or model URI that names nothing: one line
    saying which. Defined here, the lowest module that raises it (an --experiment that names no
    experiment); compare.py and registry.py raise it too."""


def experiment_id(name: str | None) -> str:
    """--experiment, else MLflow's current one ($MLFLOW_EXPERIMENT_NAME / _ID, else Default)."""
    import mlflow

    if name:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise RegistryError(f"no experiment named {name!r} at {mlflow.get_tracking_uri()}")
        return found.experiment_id
    return tracking.experiment_id()


def experiment_name(name: str | None) -> str:
    import mlflow

    return name or mlflow.get_experiment(experiment_id(None)).name


def variant_runs(experiment: str | None = None, suite: str | None = None, status: str | None = None) -> list:
    """Runs tagged with a variant; with `suite`, only that suite run's children."""
    import mlflow

    eid = experiment_id(experiment)
    where = "tags.variant != ''" + (f" and attributes.status = '{status}'" if status else "")
    if not suite:
        return mlflow.search_runs(experiment_ids=[eid], filter_string=where, output_format="list")
    # A suite's children are nested under it; a child that reports a deeper run (a tuner returns its
    # best trial) is tagged `suite` by the driver. Both count.
    found = {}
    for extra in (f"tags.mlflow.parentRunId = '{suite}'", f"tags.suite = '{suite}'"):
        for run in mlflow.search_runs(experiment_ids=[eid], filter_string=f"{where} and {extra}",
                                      output_format="list"):
            found[run.info.run_id] = run
    return list(found.values())


def logged_models(experiment_ids: list[str]) -> dict[str, object]:
    """run id -> the READY model named `model` that the run logged (MLflow 3 LoggedModel)."""
    import mlflow

    models = {}
    for model in mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list"):
        status = str(getattr(model.status, "name", model.status))
        if model.name == "model" and status.endswith("READY") and model.source_run_id:
            models[model.source_run_id] = model
    return models
