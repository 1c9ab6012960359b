"""A keras-tuner search over the head, every trial a nested MLflow run, in one process or many.

The seed's search (its cell 19): RandomSearch over the hidden Dense width, its L2 factor and the
learning rate, objective val_accuracy, 6 trials of up to 10 epochs with EarlyStopping(val_loss, 3).
The base is frozen, so a trial trains only the head (`trainable`: features -> probabilities) on the
cached features (features.py): the base runs once per search, not once per trial and epoch. After
the search the best trial's head goes back onto the frozen base, and that end-to-end network is
evaluated on the test set and logged as `model`, with the reports of a `train` run.

Runs. One parent run per search: the spec, the tuner settings, then the best hyperparameters as
params (under their spec names: they describe the logged model), test_accuracy / test_loss, the
reports, the model, and the tags best_trial_id / best_trial_run_id. One nested run per trial, tagged
trial_id, tuner_id and search_key: the trial's hyperparameters as params, its autologged per-epoch
metrics, `score` (the objective keras-tuner ranks by) and two artifacts, trial/checkpoint.weights.h5
(the best epoch) and trial/history.json. The parent's model is rebuilt from these artifacts, so the
chief needs nothing from a worker's disk. A trial that raises is marked FAILED and the search goes on.
MLflow autologs one `fit` per run: with executions_per_trial > 1 each execution gets its own run
nested under the trial's (its curves), and the trial's run holds the averaged score.

Many processes: keras-tuner's own distributed mode. The chief (KERASTUNER_TUNER_ID=chief) serves the
oracle over gRPC at KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT; workers (tuner0, tuner1, ...) ask it
for trials and run them. `workers=N` makes this process the chief and starts N workers beside it,
after computing the features, which the workers then read from the cache. A worker nests its trial
runs under the parent run named by TLKIT_PARENT_RUN_ID. Machines share only the oracle and the
tracking server (its artifact store included).

Resume. The search folder holds keras-tuner's oracle state and tlkit_search.json (what the search is
and its parent run). Running the same search again reopens that parent run and runs only the trials
that have not finished; a trial whose finished run exists is never trained or logged twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlkit.train import Result

log = logging.getLogger(__name__)

OBJECTIVE = "val_accuracy"  # the seed's; keras-tuner maximises it (its name says accuracy)

# The seed's search space. Each value overrides the spec key of the same name for one trial.
SEARCH_SPACE: dict[str, dict] = {
    "units": {"type": "int", "min_value": 256, "max_value": 1024, "step": 128},  # hidden Dense width
    "l2": {"type": "float", "min_value": 1e-4, "max_value": 1e-2, "sampling": "log"},  # L2 on its kernel
    "learning_rate": {"type": "float", "min_value": 1e-4, "max_value": 1e-2, "sampling": "log"},
}

# Search settings beside the spec, with the seed's values as defaults (it ran 6 trials, 1 execution each).
OPTIONS = {"max_trials": 6, "executions_per_trial": 1, "tuner": "random", "workers": 0}
TUNERS = ("random", "bayesian", "hyperband")
# Hyperband: max_epochs is the spec's epochs and each round keeps the best 1/3 for 3x the epochs
# (keras-tuner's default); max_trials caps its brackets like the other tuners' trial count.
HYPERBAND_FACTOR = 3

PARENT_ENV = "TLKIT_PARENT_RUN_ID"  # the parent run a worker nests its trial runs under
STATE_FILE = "tlkit_search.json"
FORMAT_VERSION = 1  # bump when the search identity, the state file or the trial artifacts change
POLL_SECONDS = 0.5  # how often the chief checks whether the search is over (keras-tuner's loop: 20 s)


class TuneError(RuntimeError):
    """The search ran but cannot finish: a worker died, or no trial completed. One line."""


@dataclass
class Context:
    """What a trial needs to know beyond its hyperparameters; the same in every process of a search."""

    parent_run_id: str
    experiment_id: str
    search_key: str
    seed: int
    feature_cache: str  # 'hit' or 'miss': how this process got the features the trials train on


# --------------------------------------------------------------------------- roles and checks

def role() -> str:
    """'single' (one process), 'chief' (serves the oracle) or 'worker': keras-tuner's variables decide."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    from tlkit.spec import SpecError

    for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(name):
            raise SpecError(f"KERASTUNER_ORACLE_IP is set but {name} is not: a distributed search needs both")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def check(spec: dict, *, max_trials: int, executions_per_trial: int, tuner: str, workers: int) -> None:
    from tlkit.spec import SpecError

    if tuner not in TUNERS:
        raise SpecError(f"tuner must be one of {', '.join(TUNERS)}, got {tuner!r}")
    for name, value, least in (("max_trials", max_trials, 1), ("executions_per_trial", executions_per_trial, 1),
                               ("workers", workers, 0)):
        if not isinstance(value, int) or value < least:
            raise SpecError(f"{name} must be an integer of at least {least}, got {value!r}")
    # The search trains heads on cached features: both of these need the base to run in training.
    if spec["augment"]:
        raise SpecError("tune searches the head on cached features: augment cannot be tuned (use train augment)")
    if spec["unfreeze"]:
        raise SpecError("tune searches the head on a frozen base: unfreeze cannot be tuned (use train finetune)")
    if spec.get("trainable_base"):
        raise SpecError("tune searches the head on a frozen base: trainable_base cannot be tuned")


def identity(spec: dict, dataset_digest: str, *, max_trials: int, executions_per_trial: int, tuner: str) -> dict:
    """What makes two searches the same one. The data is known by its digest, not its path, so a
    worker on another machine may keep the images elsewhere; `workers` is how, not what."""
    return {"format": FORMAT_VERSION, "spec": {k: v for k, v in spec.items() if k not in SEARCH_SPACE and k != "data"},
            "dataset_digest": dataset_digest, "search_space": SEARCH_SPACE, "objective": OBJECTIVE, "tuner": tuner,
            "max_trials": max_trials, "executions_per_trial": executions_per_trial}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def differences(want: dict, got: dict) -> list[str]:
    keys = sorted(set(want) | set(got))
    out = []
    for key in keys:
        if isinstance(want.get(key), dict) and isinstance(got.get(key), dict):
            out += [f"{key}.{k}" for k in differences(want[key], got[key])]
        elif want.get(key) != got.get(key):
            out.append(key)
    return out


def default_search_dir(cache_dir: str | None, tuner: str, key: str) -> Path:
    """Next to the feature cache, named by the search and by where its runs go (tracking store,
    experiment, enclosing run): the same search into the same place resumes; anything else starts afresh."""
    import mlflow

    from tlkit import features

    active = mlflow.active_run()
    where = _digest([mlflow.get_tracking_uri(), _experiment_id(), active.info.run_id if active else ""])
    root = Path(cache_dir) if cache_dir else features.default_cache_dir()
    return root / "searches" / f"{tuner}-{key[:12]}-{where[:8]}"


def _experiment_id() -> str:
    from mlflow.tracking.fluent import _get_experiment_id

    return _get_experiment_id()


# --------------------------------------------------------------------------- the model a trial trains

def _hyperparameter(hp, name: str, space: dict):
    options = {k: v for k, v in space.items() if k != "type"}
    return hp.Int(name, **options) if space["type"] == "int" else hp.Float(name, **options)


def head_model(spec: dict, feature_shape: tuple, num_classes: int, compile: bool = True):
    """The network's `trainable` part above a frozen base (compiled for training): what a trial trains.

    Built like models.build builds it (same layers, same names), so its weights drop into the
    end-to-end network; the base itself is never built for a trial.
    """
    import keras

    from tlkit import models, views

    features = keras.Input(shape=tuple(feature_shape), name="features")
    model = keras.Model(features, models.HEADS[spec["head"]](features, spec, num_classes), name="trainable")
    if compile:
        # What the trial trains, and what its checkpoint holds: views.training_view of the head.
        model = views.training_view(model)
        models.compile_for_training(model, spec, spec["learning_rate"], models.HEAD_STEPS_PER_EXECUTION)
    return model


def hypermodel(spec: dict, feature_shape: tuple, num_classes: int):
    """keras-tuner's build(hp): the spec's head with the trial's units, l2 and learning rate."""

    def build(hp):
        trial_spec = dict(spec, **{name: _hyperparameter(hp, name, space) for name, space in SEARCH_SPACE.items()})
        return head_model(trial_spec, feature_shape, num_classes)

    return build


# --------------------------------------------------------------------------- tracked trials

def _trial_runs(context: Context, trial_id: str, status: str | None = None) -> list:
    import mlflow

    query = f"tags.search_key = '{context.search_key}' and tags.stage = 'trial' and tags.trial_id = '{trial_id}'"
    if status:
        query += f" and attributes.status = '{status}'"
    return mlflow.search_runs(experiment_ids=[context.experiment_id], filter_string=query, output_format="list")


def _download_trial_files(run_id: str, into: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="trial", dst_path=str(into)))


class TrackedTrials:
    """Mixed into a keras-tuner Tuner: each trial runs inside its own nested MLflow run.

    Only the `run_trial` hook is overridden, and `_build_and_fit_model`, keras-tuner's per-execution
    hook (it serves the arrays as train.training_batches and, when a trial has several executions,
    nests a run per execution): the oracle decides, the tuner runs, we record.
    """

    def __init__(self, *args, context: Context, **kwargs):
        self.context = context
        self.trials_run = 0
        super().__init__(*args, **kwargs)

    def run_trial(self, trial, *args, **kwargs):
        import keras
        import mlflow
        from keras_tuner.src.engine import tuner_utils

        from tlkit import tracking

        earlier = _trial_runs(self.context, trial.trial_id)  # one query: FINISHED and RUNNING both matter
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
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("trial %s failed (%s); its run is marked FAILED and the search goes on", trial.trial_id, first)
            raise
        self.trials_run += 1
        return results

    def _build_and_fit_model(self, trial, *args, **kwargs):
        from tlkit import tracking, train

        # The batches are drawn for each fit, under the trial's seed, as model.fit(x, y) draws them.
        kwargs = train.on_training_batches(*args, **kwargs)
        if self.executions_per_trial == 1:
            with train.shuffle_stays_logged():
                return super()._build_and_fit_model(trial, **kwargs)

        self._execution += 1
        tags = {"stage": "execution", "trial_id": trial.trial_id, "execution": str(self._execution),
                "search_key": self.context.search_key}
        with tracking.run(f"trial-{trial.trial_id}-execution-{self._execution}", nested=True, tags=tags), \
                train.shuffle_stays_logged():
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
        runs = _trial_runs(self.context, previous, "FINISHED")
        if not runs:
            raise TuneError(f"trial {previous}, which hyperband continues, has no finished run to take weights from")
        with tempfile.TemporaryDirectory() as tmp:
            folder = _download_trial_files(runs[0].info.run_id, Path(tmp))
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
    keras-tuner as they are (max_model_size, max_consecutive_failed_trials, ...)."""
    options = dict(hypermodel=build, objective=OBJECTIVE, seed=context.seed, executions_per_trial=executions_per_trial,
                   directory=str(folder.parent), project_name=folder.name, overwrite=False, **tuner_options)
    if kind == "hyperband":
        options.update(max_epochs=epochs, factor=HYPERBAND_FACTOR)
    else:
        options["max_trials"] = max_trials
    # Named "chief" in one process too: the process that owns the oracle saves it under one name, so a
    # search started with workers resumes in one process and the other way round.
    with _environment(KERASTUNER_TUNER_ID=os.environ.get("KERASTUNER_TUNER_ID", "chief")):
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


# --------------------------------------------------------------------------- one search

@dataclass
class Prepared:
    dataset: object
    network: object
    features: object  # features.Features


def _prepare(spec: dict, cache_dir: str | None, dataset=None) -> Prepared:
    import keras

    from tlkit import models, train

    dataset = dataset or train.load_dataset(spec)
    keras.utils.set_random_seed(spec["seed"])
    network = models.build(spec, len(dataset.class_names))
    return Prepared(dataset, network, train.frozen_features(network, dataset, spec, cache_dir))


def _fit_kwargs(prepared: Prepared, spec: dict) -> dict:
    from tlkit import train

    d, f = prepared.dataset, prepared.features
    return train.fit_options(spec, f.train, d.y_train, f.val, d.y_val, spec["epochs"], f.train_mirrored)


def _read_state(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_state(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, folder / STATE_FILE)


def _resumable_parent(state: dict, folder: Path) -> str:
    """The stored parent run, if this tracking store and experiment still hold it."""
    import mlflow

    from tlkit.spec import SpecError

    run_id = state["parent_run_id"]
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise SpecError(f"search folder {folder} belongs to run {run_id}, which {mlflow.get_tracking_uri()} "
                        "does not hold: pass another --search-dir")
    if run.info.experiment_id != _experiment_id():
        raise SpecError(f"search folder {folder} belongs to run {run_id} of experiment {run.info.experiment_id}: "
                        "use that experiment or another --search-dir")
    return run_id


def tune(spec: dict, *, max_trials: int = 6, executions_per_trial: int = 1, tuner: str = "random",
         workers: int = 0, search_dir: str | None = None, experiment: str | None = None,
         cache_dir: str | None = None, nested: bool = False, dataset=None) -> Result:
    """Search the head's units, l2 and learning rate over a validated base spec; log the best network.

    workers=0 runs every trial in this process (unless keras-tuner's variables make it a chief);
    workers=N serves the oracle here and runs the trials in N worker processes on this machine.
    Returns train.Result for the parent run: the best trial's end-to-end network on the test set.
    dataset: train.load_dataset(spec) done already (a suite loads once for all its children).
    """
    import keras
    import mlflow

    from tlkit import tracking, train
    from tlkit.spec import SpecError

    check(spec, max_trials=max_trials, executions_per_trial=executions_per_trial, tuner=tuner, workers=workers)
    place = role()
    if place == "worker":
        raise SpecError(f"KERASTUNER_TUNER_ID={os.environ['KERASTUNER_TUNER_ID']} makes this process a worker: "
                        "run it with `tlkit tune` (see tune.work)")
    tracking.use_experiment(experiment)
    tracking.check_reachable()
    prepared = _prepare(spec, cache_dir, dataset)  # before any worker starts: they find the features in the cache
    dataset, network, cached = prepared.dataset, prepared.network, prepared.features
    what = identity(spec, dataset.digest, max_trials=max_trials, executions_per_trial=executions_per_trial, tuner=tuner)
    key = _digest(what)
    folder = Path(search_dir) if search_dir else default_search_dir(cache_dir, tuner, key)
    state = _read_state(folder)
    if state and state["key"] != key:
        raise SpecError(f"search folder {folder} holds another search (differs in "
                        f"{', '.join(differences(state['identity'], what))}): pass another --search-dir")
    parent_id = _resumable_parent(state, folder) if state else None
    if parent_id and not nested and os.environ.get("MLFLOW_RUN_ID"):
        parent_id = None  # under `mlflow run` the project's run is the parent; the trials stay as they are
    if state:
        log.info("resuming the search in %s", folder)

    tags = {"stage": "search", "tuner": tuner, "base": spec["base"], "dataset": dataset.name,
            "dataset_digest": dataset.digest, "search_key": key, "search_dir": str(folder.resolve()),
            "feature_cache": "hit" if cached.hit else "miss", "feature_cache_key": cached.key,
            "feature_boundary": network.boundary}
    with tracking.run("tune", nested=nested, tags=tags, run_id=parent_id) as active:
        parent = active.info.run_id
        _write_state(folder, {"key": key, "identity": what, "parent_run_id": parent,
                              "experiment_id": active.info.experiment_id})
        given = mlflow.get_run(parent).data.params
        base = {k: v for k, v in spec.items() if k not in SEARCH_SPACE}
        settings = {"tuner": tuner, "max_trials": max_trials, "executions_per_trial": executions_per_trial,
                    "objective": OBJECTIVE}
        mlflow.log_params({k: v for k, v in {**base, **settings}.items() if k not in given})
        if parent_id is None:
            mlflow.log_dict(what, "search.json")  # what a worker checks its own settings against
            tracking.log_dataset(dataset)
        context = Context(parent_run_id=parent, experiment_id=active.info.experiment_id, search_key=key,
                          seed=spec["seed"], feature_cache="hit" if cached.hit else "miss")
        build = hypermodel(spec, cached.train.shape[1:], len(dataset.class_names))
        tracking.autolog()
        search = make_tuner(tuner, build, context, folder, max_trials=max_trials,
                            executions_per_trial=executions_per_trial, epochs=spec["epochs"])
        fit_kwargs = _fit_kwargs(prepared, spec)
        if place == "chief" or workers > 0:
            _run_chief(search, spec, folder, parent, workers=workers, max_trials=max_trials,
                       executions_per_trial=executions_per_trial, tuner=tuner, cache_dir=cache_dir)
        else:
            with train.long_lived_objects_frozen():
                search.search(**fit_kwargs)
        keras.utils.set_random_seed(spec["seed"])
        return _finish(search.oracle, context, spec, prepared, parent)


def _finish(oracle, context: Context, spec: dict, prepared: Prepared, parent: str) -> Result:
    """Put the best trial's head on the frozen base, evaluate it on the test set, log it on the parent."""
    import mlflow
    from keras_tuner.src.engine import trial as trial_module

    from tlkit import models, reports, tracking, train, views
    from tlkit.train import Result

    trials = list(oracle.trials.values())
    completed = [t for t in trials if t.status == trial_module.TrialStatus.COMPLETED]
    log.info("search over: %d trials, %d completed", len(trials), len(completed))
    if not completed:
        raise TuneError(f"no trial completed: see the FAILED trial runs under run {parent}")
    # Ties (common on small data) go to the earliest trial: the same choice after every reload.
    sign = -1 if oracle.objective.direction == "max" else 1
    best = min(completed, key=lambda t: (sign * t.score, int(t.trial_id)))
    runs = _trial_runs(context, best.trial_id, "FINISHED")
    if not runs:
        raise TuneError(f"the best trial {best.trial_id} has no finished run in the tracking store")
    best_run = runs[0]
    values = {name: best.hyperparameters.get(name) for name in SEARCH_SPACE}
    best_spec = dict(spec, **values)
    dataset, cached = prepared.dataset, prepared.features

    with tempfile.TemporaryDirectory() as tmp:
        files = _download_trial_files(best_run.info.run_id, Path(tmp) / "download")
        head = head_model(best_spec, cached.train.shape[1:], len(dataset.class_names), compile=False)
        trained = views.training_view(head)  # the form the trial trained and saved
        trained.load_weights(files / "checkpoint.weights.h5")  # uncompiled: the trial's optimizer state stays out
        views.write_back(trained)  # into head's convs (the trained centre taps), if it has any
        history = json.loads((files / "history.json").read_text())
        # On exactly the base the cached features came from (its layers, not a second build of it),
        # the best epoch of the best trial's head.
        network = models.build(best_spec, len(dataset.class_names), prepared.network.base)
        network.trainable.set_weights(head.get_weights())
        test_loss, test_accuracy, probabilities = train.score(head, cached.test, dataset.y_test)
        log.info("best trial %s (%s): val_accuracy %.4f, test accuracy %.2f%% (loss %.4f)", best.trial_id,
                 ", ".join(f"{k}={v:.4g}" for k, v in values.items()), best.score, 100 * test_accuracy, test_loss)

        current = mlflow.get_run(parent).data
        if current.tags.get("best_trial_run_id") != best_run.info.run_id:  # not logged by an earlier run of it
            clash = [k for k, v in values.items() if k in current.params and current.params[k] != str(v)]
            if clash:
                raise TuneError(f"run {parent} already records another best {', '.join(clash)}: the search "
                                "folder and the tracking store disagree; pass another --search-dir")
            mlflow.log_params({k: v for k, v in values.items() if k not in current.params})
            mlflow.log_metrics({"test_accuracy": float(test_accuracy), "test_loss": float(test_loss),
                                "best_score": float(best.score), "trials_completed": float(len(completed)),
                                "trials_failed": float(len(trials) - len(completed))})
            folder = Path(tmp) / "reports"
            folder.mkdir()
            per_class = reports.write_all(folder, dataset.y_test.argmax(axis=1), probabilities,
                                          dataset.class_names, history, [])
            tracking.log_reports(folder)
            mlflow.log_metrics(per_class)
            mlflow.log_dict(best_spec, "spec.json")
            tracking.log_model(network.full, dataset.class_names, dataset.x_test[:2], best_spec)
            # Last: its presence says the parent is complete, so a rerun of a finished search logs nothing.
            mlflow.set_tags({"best_trial_id": best.trial_id, "best_trial_run_id": best_run.info.run_id})
    return Result(run_id=parent, test_accuracy=float(test_accuracy), test_loss=float(test_loss),
                  model_uri=f"runs:/{parent}/model", test_predictions=probabilities.argmax(axis=1))


# --------------------------------------------------------------------------- chief and workers

def spec_arguments(spec: dict) -> list[str]:
    """The spec as `tlkit tune` options (less the searched keys, which it refuses): how the chief
    starts its workers with the same search."""
    out = []
    for name, value in spec.items():
        if name in SEARCH_SPACE:
            continue
        flag = name.replace("_", "-")
        out += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return out


def _oracle_address() -> tuple[str, str]:
    """Where the chief listens: keras-tuner's variables, else a free port on this machine only."""
    import socket

    if role() == "chief":
        return os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1", str(s.getsockname()[1])


def _run_chief(search, spec: dict, folder: Path, parent: str, *, workers: int, max_trials: int,
               executions_per_trial: int, tuner: str, cache_dir: str | None) -> None:
    import mlflow

    ip, port = _oracle_address()
    search.save()
    command = [sys.executable, "-m", "tlkit.cli", "tune", *spec_arguments(spec), "--tuner", tuner,
               "--max-trials", str(max_trials), "--executions-per-trial", str(executions_per_trial),
               "--search-dir", str(folder)]
    if cache_dir:
        command += ["--cache-dir", str(cache_dir)]
    connect = "127.0.0.1" if ip in ("0.0.0.0", "::", "[::]") else ip
    env = dict(os.environ, KERASTUNER_ORACLE_IP=connect, KERASTUNER_ORACLE_PORT=port, **{PARENT_ENV: parent},
               MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    env.pop("MLFLOW_RUN_ID", None)  # the project's run is the parent, not a worker's run
    logs = folder / "logs"
    if workers:
        logs.mkdir(parents=True, exist_ok=True)
    processes = []
    # Workers first, then the server: gRPC's threads should not be running when this process forks.
    for i in range(workers):
        path = logs / f"tuner{i}.log"
        with open(path, "ab") as out:
            processes.append((f"tuner{i}", path, subprocess.Popen(
                command, env={**env, "KERASTUNER_TUNER_ID": f"tuner{i}"}, stdout=out, stderr=subprocess.STDOUT)))
    log.info("oracle at %s:%s, parent run %s; %d worker(s) here%s", ip, port, parent, workers,
             f", logs in {logs}" if workers else "")
    log.info("more workers, on any machine that reaches the oracle and the tracking server: "
             "MLFLOW_TRACKING_URI=<tracking server> %s=%s KERASTUNER_ORACLE_IP=<this machine> "
             "KERASTUNER_ORACLE_PORT=%s KERASTUNER_TUNER_ID=tuner<K> tlkit tune <the same options>",
             PARENT_ENV, parent, port)
    try:
        _serve(search.oracle, f"{ip}:{port}", [p for _, _, p in processes])
        codes = [(name, path, process.wait()) for name, path, process in processes]
    except BaseException:
        for _, _, process in processes:
            if process.poll() is None:
                process.terminate()  # SIGTERM: the worker marks its trial run KILLED and exits
        for _, _, process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    # keras-tuner saves the oracle before it forgets the last ongoing trial, and only a worker (which
    # saves no oracle) ends trials here: save the end state, or a resume would run that trial again.
    search.save()
    for name, path, code in codes:
        log.info("worker %s exited with %d", name, code)
        if code != 0:
            tail = path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise TuneError(f"worker {name} exited with {code} ({tail[0][:200]}); its log: {path}")


def _serve(oracle, address: str, local_workers: list) -> None:
    """keras-tuner's chief server (oracle_chief.start_server) with its stopping rule changed.

    keras-tuner stops once some worker was told "no more trials" while no trial runs and no other
    worker has asked: on a search that is (nearly) done, a worker still importing TensorFlow has not
    asked yet, and then waits an hour for a server that is gone. So while a worker started here runs,
    we serve; once all have exited, one that failed ends it (its trial would never end), else
    keras-tuner's rule does (for workers elsewhere). And it is over within POLL_SECONDS, not 20 s.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise TuneError(f"cannot serve the oracle on {address}: is the port in use?")
    server.start()
    try:
        while True:
            time.sleep(POLL_SECONDS)
            codes = [p.poll() for p in local_workers]
            if None in codes:
                continue
            if any(codes) or (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
                return
    finally:
        server.stop(grace=2)


def work(spec: dict, *, max_trials: int = 6, executions_per_trial: int = 1, tuner: str = "random",
         search_dir: str | None = None, cache_dir: str | None = None) -> tuple[str, int]:
    """Run trials for the chief named by keras-tuner's variables until its oracle says stop.

    Returns (parent run id, trials run here). The settings must be the chief's: they are checked
    against the search.json of the parent run.
    """
    import mlflow

    from tlkit import tracking, train
    from tlkit.spec import SpecError

    check(spec, max_trials=max_trials, executions_per_trial=executions_per_trial, tuner=tuner, workers=0)
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        raise SpecError(f"a worker needs {PARENT_ENV}: the parent run id that the chief prints")
    tracking.check_reachable()
    try:
        run = mlflow.MlflowClient().get_run(parent)
        chief = mlflow.artifacts.load_dict(f"runs:/{parent}/search.json")
    except mlflow.exceptions.MlflowException as err:
        raise SpecError(f"{PARENT_ENV}={parent} is not a search run on {mlflow.get_tracking_uri()}: "
                        f"{str(err).splitlines()[0][:200]}") from None
    dataset = train.load_dataset(spec)
    what = identity(spec, dataset.digest, max_trials=max_trials, executions_per_trial=executions_per_trial,
                    tuner=tuner)
    if what != chief:
        raise SpecError(f"this worker's search differs from the chief's in {', '.join(differences(chief, what))}")
    prepared = _prepare(spec, cache_dir, dataset)
    key = _digest(what)
    folder = Path(search_dir) if search_dir else default_search_dir(cache_dir, tuner, key)
    context = Context(parent_run_id=parent, experiment_id=run.info.experiment_id, search_key=key, seed=spec["seed"],
                      feature_cache="hit" if prepared.features.hit else "miss")
    tracking.autolog()
    search = make_tuner(tuner, hypermodel(spec, prepared.features.train.shape[1:], len(prepared.dataset.class_names)),
                        context, folder, max_trials=max_trials, executions_per_trial=executions_per_trial,
                        epochs=spec["epochs"])
    fit_kwargs = _fit_kwargs(prepared, spec)
    with train.long_lived_objects_frozen():
        search.search(**fit_kwargs)
    return parent, search.trials_run


def entry_point(common: list[str]) -> tuple[str, dict, str]:
    """The MLproject `tune` entry point: the common parameters (less the searched ones) and OPTIONS."""
    from tlkit import spec as specs

    params = {name: specs.DEFAULTS[name] for name in common if name not in SEARCH_SPACE} | OPTIONS
    options = " ".join(f"--{name.replace('_', '-')} {{{name}}}" for name in params)
    return ("keras-tuner search of units, l2 and learning rate, one nested run per trial (the seed: 60.04%)",
            params, f"python -m tlkit.cli tune {options}")
