"""The tracked trials: a keras-tuner Tuner whose every trial is a nested MLflow run.

One nested run per trial, tagged trial_id, tuner_id and search_key: the trial's hyperparameters as
params, its autologged per-epoch metrics, `score` (the objective keras-tuner ranks by) and two
artifacts, trial/checkpoint.weights.h5 (the best epoch) and trial/history.json: the search's
result is rebuilt from these, so the chief needs nothing from a worker's disk. A trial that raises
is marked FAILED and the search goes on. MLflow autologs one `fit` per run: with
executions_per_trial > 1 each execution gets its own run nested under the trial's (its curves),
and the trial's run holds the averaged score. A trial whose finished run exists (a process died
before the oracle heard) is never trained or logged twice.

keras-tuner's private hooks overridden here (guarded by tests/test_private_apis.py; keras-tuner is
bounded below 1.5 in pyproject.toml): `run_trial` is public; `_build_and_fit_model` is the only
per-execution hook (where the door serves the arrays and an execution gets its run), and
`_get_checkpoint_fname` the only way to the checkpoint it wrote; `keras_tuner.src.engine.tuner_utils`
holds the score and best-epoch arithmetic the tuner itself uses, which no public name exposes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tlkit import distribute, fastpath, tracking
from tlkit.messages import first_line
from tlkit.tune.errors import TuneError
from tlkit.tune.space import HYPERBAND_FACTOR, OBJECTIVE


log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a trial needs to know beyond its hyperparameters; the same in every process of a search."""

    parent_run_id: str
    experiment_id: str
    search_key: str
    seed: int
    feature_cache: str  # 'hit' or 'miss': how this process got the features the trials train on


def trial_runs(context: Context, trial_id: str, status: str | None = None) -> list:
    import mlflow

    query = f"tags.search_key = '{context.search_key}' and tags.stage = 'trial' and tags.trial_id = '{trial_id}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return mlflow.search_runs(experiment_ids=[context.experiment_id], filter_string=query, output_format="list")


def download_trial_files(run_id: str, into: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="trial", dst_path=str(into)))


class TrackedTrials:
    """Mixed into a keras-tuner Tuner: each trial runs inside its own nested MLflow run.

    Only the `run_trial` hook is overridden, and `_build_and_fit_model`, keras-tuner's per-execution
    hook (it serves the arrays through fastpath.fit_arguments and, when a trial has several
    executions, nests a run per execution): the oracle decides, the tuner runs, we record.
    """

    def __init__(self, *args, context: Context, **kwargs):
        self.context = context
        self.trials_run = 0
        super().__init__(*args, **kwargs)

    def run_trial(self, trial, *args, **kwargs):
        import keras
        import mlflow
        from keras_tuner.src.engine import tuner_utils

        earlier = trial_runs(self.context, trial.trial_id)  # one query: FINISHED and RUNNING both matter
        finished = [r for r in earlier if r.info.status == "FINISHED"]
        if finished:
            # It ran to the end, but the oracle never heard (a process died in between): report its
            # logged score instead of training and logging the same trial twice.
            log.info("trial %s already has a finished run %s: reusing its score", trial.trial_id,
                     finished[0].info.run_id)
            return {OBJECTIVE: finished[0].data.metrics["score"]}
        for stale in (r for r in earlier if r.info.status == "RUNNING"):
            # The oracle hands a trial out again only once its last attempt is over: that process is gone.
            mlflow.MlflowClient().set_terminated(stale.info.run_id, "KILLED")

        hp = trial.hyperparameters
        self._fetch_start_weights(hp.values)
        # A trial's result does not depend on which process runs it, or in which order.
        keras.utils.set_random_seed(self.context.seed + int(trial.trial_id))
        self._execution = 0
        tags = {"stage": "trial", "trial_id": trial.trial_id, "tuner_id": self.tuner_id,
                "search_key": self.context.search_key, "feature_cache": self.context.feature_cache}
        try:
            with tracking.run(f"trial-{trial.trial_id}", nested=True, tags=tags,
                              parent_run_id=self.context.parent_run_id):
                mlflow.log_params(hp.values)
                results = super().run_trial(trial, *args, **kwargs)
                self._log_outcome(trial, results, tuner_utils)
        except Exception as err:
            log.warning("trial %s failed (%s); its run is marked FAILED and the search goes on", trial.trial_id,
                        first_line(err))
            raise
        self.trials_run += 1
        return results

    def _build_and_fit_model(self, trial, *args, **kwargs):
        # The batches are drawn for each fit, under the trial's seed, as model.fit(x, y) draws them.
        kwargs = fastpath.fit_arguments(*args, **kwargs)
        if self.executions_per_trial == 1:
            with fastpath.shuffle_stays_logged():
                return super()._build_and_fit_model(trial, **kwargs)

        self._execution += 1
        tags = {"stage": "execution", "trial_id": trial.trial_id, "execution": str(self._execution),
                "search_key": self.context.search_key}
        with tracking.run(f"trial-{trial.trial_id}-execution-{self._execution}", nested=True, tags=tags), \
                fastpath.shuffle_stays_logged():
            return super()._build_and_fit_model(trial, **kwargs)

    def _log_outcome(self, trial, results, tuner_utils) -> None:
        import mlflow

        metrics = tuner_utils.convert_to_metrics_dict(results, self.oracle.objective)
        mlflow.log_metrics({"score": float(metrics[OBJECTIVE]),
                            "best_epoch": float(tuner_utils.get_best_step(results, self.oracle.objective))})
        histories = [r.history for r in (results if isinstance(results, list) else [results])]
        # The checkpoint holds the best epoch over all executions: keep the curves of that execution.
        best = max(histories, key=lambda h: max(h.get(OBJECTIVE, [float("-inf")])))
        mlflow.log_dict({k: [float(v) for v in values] for k, values in best.items()}, "trial/history.json")
        for path in (self._get_checkpoint_fname(trial.trial_id), self._get_build_config_fname(trial.trial_id)):
            if os.path.exists(path):
                mlflow.log_artifact(path, "trial")

    def _fetch_start_weights(self, values: dict) -> None:
        """Hyperband continues a trial from an earlier one's checkpoint, which keras-tuner reads from the
        local search folder: on another machine than the one that ran it, fetch it from MLflow."""
        previous = values.get("tuner/trial_id")
        if previous is None or os.path.exists(self._get_checkpoint_fname(previous)):
            return
        runs = trial_runs(self.context, previous, "FINISHED")
        if not runs:
            raise TuneError(f"trial {previous}, which hyperband continues, has no finished run to take weights from")
        with tempfile.TemporaryDirectory() as tmp:
            folder = download_trial_files(runs[0].info.run_id, Path(tmp))
            for name in os.listdir(folder):
                shutil.copy(folder / name, Path(self.get_trial_dir(previous)) / name)


_TUNER_CLASSES: dict[str, type] = {}


def tuner_class(kind: str) -> type:
    """TrackedTrials over the keras-tuner Tuner of that kind (one subclass per tuner, one mixin)."""
    if kind not in _TUNER_CLASSES:
        import keras_tuner

        base = {"random": keras_tuner.RandomSearch, "bayesian": keras_tuner.BayesianOptimization,
                "hyperband": keras_tuner.Hyperband}[kind]
        _TUNER_CLASSES[kind] = type(f"Tracked{base.__name__}", (TrackedTrials, base), {})
    return _TUNER_CLASSES[kind]


def make_tuner(kind: str, build, context: Context, folder: Path, *, max_trials: int, executions_per_trial: int,
               epochs: int, **tuner_options):
    """A tracked tuner whose state lives in `folder` (reloaded when it exists). tuner_options go to
    keras-tuner as they are (max_model_size, max_consecutive_failed_trials, ...).

    The search's strategy (distribute.current()) goes to keras-tuner, which builds each trial's model
    in its scope: a scope opened around the search would not last, since keras-tuner clears
    TensorFlow's graph (keras.backend.clear_session) before every trial."""
    options = dict(hypermodel=build, objective=OBJECTIVE, seed=context.seed, executions_per_trial=executions_per_trial,
                   directory=str(folder.parent), project_name=folder.name, overwrite=False,
                   distribution_strategy=distribute.current(), **tuner_options)
    if kind == "hyperband":
        options.update(max_epochs=epochs, factor=HYPERBAND_FACTOR)
    else:
        options["max_trials"] = max_trials
    # Named "chief" in one process too: the process that owns the oracle saves it under one name, so a
    # search started with workers resumes in one process and the other way round.
    # In the scope too: keras-tuner builds a model here to learn the space (trained never, but made
    # like every other model of the search).
    with _environment(KERASTUNER_TUNER_ID=os.environ.get("KERASTUNER_TUNER_ID", "chief")), distribute.entered():
        tuner = tuner_class(kind)(context=context, **options)
    if kind == "hyperband":
        tuner.oracle.max_trials = max_trials
    return tuner


@contextlib.contextmanager
def _environment(**values: str):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
