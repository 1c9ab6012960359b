"""Which runs: the experiment a command means, its variant runs (or one suite's), the seeds of a
variant repeated at several seeds, and the models they logged.

compare.py ranks these runs and registry.py promotes among them; both read them from here, and
repeats.py writes the tags below. Every function talks to the tracking server named by MLflow's
own rules (MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

from tlkit import tracking

# A variant repeated at N seeds (tlkit/repeats.py): its parent run carries REPEATS (N); each run
# inside the group carries REPEAT_OF (the parent's id) and REPEAT (the seed's index 0..N-1, or
# SEARCH for a search variant's one search), a seed's run also REPEAT_SEED.
REPEATS = "tlkit.repeats"
REPEAT_OF = "tlkit.repeat_of"
REPEAT = "tlkit.repeat"
REPEAT_SEED = "tlkit.repeat_seed"
SEARCH = "search"


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
    """Runs tagged with a variant; with `suite`, only that suite run's children. A run inside a
    repeated variant's group (a seed's, its search) is left out: the group's parent stands for it
    (seed_runs lists them)."""
    import mlflow

    eid = experiment_id(experiment)
    where = "tags.variant != ''" + (f" and attributes.status = '{status}'" if status else "")
    if not suite:
        return [run for run in mlflow.search_runs(experiment_ids=[eid], filter_string=where, output_format="list")
                if REPEAT_OF not in run.data.tags]
    # A suite's children are nested under it; a child that reports a deeper run (a tuner returns its
    # best trial) is tagged `suite` by the driver. Both count.
    found = {}
    for extra in (f"tags.mlflow.parentRunId = '{suite}'", f"tags.suite = '{suite}'"):
        for run in mlflow.search_runs(experiment_ids=[eid], filter_string=f"{where} and {extra}",
                                      output_format="list"):
            found[run.info.run_id] = run
    return [run for run in found.values() if REPEAT_OF not in run.data.tags]


def is_repeated(run) -> bool:
    """A repeated variant's parent run (its seeds are its seed_runs)."""
    return REPEATS in run.data.tags


def seed_runs(parent) -> list:
    """The seeds' runs of a repeated variant's parent run (any status), by seed index; its search
    (a search variant's) is not one of them."""
    import mlflow

    found = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list",
                               filter_string=f"tags.`{REPEAT_OF}` = '{parent.info.run_id}'")
    seeds = [run for run in found if run.data.tags.get(REPEAT, "").isdigit()]
    return sorted(seeds, key=lambda run: int(run.data.tags[REPEAT]))


def best_val_accuracy(client, run) -> float | None:
    """The best epoch's val_accuracy; a fine-tuned run has its epochs in its stage runs."""
    import mlflow

    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    if not history:
        stages = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                    filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.stage != ''")
        history = [m for stage in stages for m in client.get_metric_history(stage.info.run_id, "val_accuracy")]
    return max((m.value for m in history), default=None)


def logged_models(experiment_ids: list[str]) -> dict[str, object]:
    """run id -> the READY model named `model` that the run logged (MLflow 3 LoggedModel)."""
    import mlflow

    models = {}
    for model in mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list"):
        status = str(getattr(model.status, "name", model.status))
        if model.name == "model" and status.endswith("READY") and model.source_run_id:
            models[model.source_run_id] = model
    return models
