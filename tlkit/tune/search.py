"""One search from start to finish: the features, the tracked tuner, the best network logged.

The tuner runs its trials in this process, or as the chief of workers, or as a worker (work); then
the best trial's network is evaluated and logged on the parent run."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tlkit import distribute, evaluate, fastpath, models, tracking, train
from tlkit.messages import first_line
from tlkit.spec import SpecError
from tlkit.train import Result
from tlkit.tune import distributed, resume, trials
from tlkit.tune.errors import TuneError
from tlkit.tune.space import OBJECTIVE, Search, check, differences, digest, hypermodel, identity, load


log = logging.getLogger(__name__)


@dataclass
class Prepared:
    dataset: object
    network: object
    features: object  # features.Features


def prepare(spec: dict, cache_dir: str | None, dataset=None) -> Prepared:
    """The data, the network and its frozen features (the cache's, or one pass of the base), the
    network made and run in the search's strategy's scope."""
    import keras

    dataset = dataset or train.load_dataset(spec)
    keras.utils.set_random_seed(spec["seed"])
    with distribute.entered():
        network = models.build(spec, len(dataset.class_names))
        return Prepared(dataset, network, train.frozen_features(network, dataset, spec, cache_dir))


def open_search(spec: dict, search: Search, prepared: Prepared, context: trials.Context, folder: Path):
    """The tracked tuner of this search, its state in `folder` (reloaded when there), and the
    arguments its search() takes. The one start of a search: one process, the chief and a worker."""
    d, f = prepared.dataset, prepared.features
    tracking.autolog()
    tuner = trials.make_tuner(search.tuner, hypermodel(spec, search, f.train.shape[1:], len(d.class_names)), context,
                              folder, max_trials=search.max_trials, executions_per_trial=search.executions_per_trial,
                              epochs=spec["epochs"])
    return tuner, train.fit_options(spec, f.train, d.y_train, f.val, d.y_val, spec["epochs"], f.train_mirrored)


def run_trials(tuner, fit_kwargs: dict) -> None:
    with train.long_lived_objects_frozen():
        tuner.search(**fit_kwargs)


def tune(spec: dict, search: Search | None = None, **options) -> Result:
    """Search the head over a validated spec, its layers in the spec's precision (models.precision)
    and on its strategy's devices (distribute.chosen: the tuner enters its scope for each trial, and
    prepare and finish for the rest); log the best network on the parent run. The options are _tune's."""
    with models.precision(spec), distribute.chosen(spec):
        return _tune(spec, search, **options)


def _tune(spec: dict, search: Search | None = None, *, variant: str = "tune", workers: int = 0,
         search_dir: str | None = None, experiment: str | None = None, cache_dir: str | None = None,
         nested: bool = False, dataset=None, tags: dict | None = None, **settings) -> Result:
    """Search the head over a validated spec; log the best network on the parent run.

    search: the variant's search (space.load(variant)); settings (tuner, max_trials,
    executions_per_trial) override it. workers=0 runs every trial in this process (unless
    keras-tuner's variables make it a chief); workers=N serves the oracle here and runs the trials
    in N worker processes on this machine. Returns train.Result for the parent run: the best
    trial's end-to-end network on the test set. dataset: train.load_dataset(spec) done already.
    tags: more tags for the parent run (a search under repeats: tlkit/repeats.py).
    """
    import keras
    import mlflow

    search = _settled(search, variant, settings)
    check(spec, search, workers)
    place = distributed.role()
    if place == "worker":
        raise SpecError(f"KERASTUNER_TUNER_ID={os.environ['KERASTUNER_TUNER_ID']} makes this process a worker: "
                        "run it with `tlkit tune` (see tune.work)")
    tracking.use_experiment(experiment)
    tracking.check_reachable()
    prepared = prepare(spec, cache_dir, dataset)  # before any worker starts: they find the features in the cache
    dataset, network, cached = prepared.dataset, prepared.network, prepared.features
    what = identity(spec, dataset.digest, search)
    key = digest(what)
    folder = Path(search_dir) if search_dir else resume.default_search_dir(cache_dir, search.tuner, key)
    state = resume.read_state(folder)
    if state and state["key"] != key:
        raise SpecError(f"search folder {folder} holds another search (differs in "
                        f"{', '.join(differences(state['identity'], what))}): pass another --search-dir")
    parent_id = resume.resumable_parent(state, folder) if state else None
    if parent_id and not nested and os.environ.get("MLFLOW_RUN_ID"):
        parent_id = None  # under `mlflow run` the project's run is the parent; the trials stay as they are
    if state:
        log.info("resuming the search in %s", folder)

    tags = {"stage": "search", "variant": Path(variant).stem, "tuner": search.tuner, "base": spec["base"],
            "dataset": dataset.name, "dataset_digest": dataset.digest, "search_key": key,
            "search_dir": str(folder.resolve()), **train.feature_tags(cached, network), **distribute.tags(),
            **(tags or {})}
    with tracking.run(Path(variant).stem, nested=nested, tags=tags, run_id=parent_id) as active:
        parent = active.info.run_id
        resume.write_state(folder, {"key": key, "identity": what, "parent_run_id": parent,
                                    "experiment_id": active.info.experiment_id})
        settings = {"tuner": search.tuner, "max_trials": search.max_trials,
                    "executions_per_trial": search.executions_per_trial, "objective": OBJECTIVE}
        tracking.log_params_once({**{k: v for k, v in spec.items() if k not in search.space}, **settings})
        if parent_id is None:
            mlflow.log_dict(what, "search.json")  # what a worker checks its own settings against
            tracking.log_dataset(dataset)
        context = trials.Context(parent_run_id=parent, experiment_id=active.info.experiment_id, search_key=key,
                                 seed=spec["seed"], feature_cache="hit" if cached.hit else "miss")
        tuner, fit_kwargs = open_search(spec, search, prepared, context, folder)
        if place == "chief" or workers > 0:
            distributed.run_chief(tuner, spec, search, variant, folder, parent, workers=workers, cache_dir=cache_dir)
        else:
            run_trials(tuner, fit_kwargs)
        keras.utils.set_random_seed(spec["seed"])
        with distribute.entered():  # the best network built on the strategy's devices, as the trials were
            return finish(tuner.oracle, context, spec, search, prepared, parent)


def _settled(search: Search | None, variant: str, settings: dict) -> Search:
    """The search to run: the given one or the variant's, with the settings given on top."""
    import dataclasses

    if search is None:
        return load(variant, **settings)
    return dataclasses.replace(search, **{k: v for k, v in settings.items() if v is not None})


def finish(oracle, context: trials.Context, spec: dict, search: Search, prepared: Prepared, parent: str) -> Result:
    """Put the best trial's head on the frozen base, evaluate it on the test set, log it on the parent."""
    import mlflow

    everything = list(oracle.trials.values())
    completed = [t for t in everything if t.status == "COMPLETED"]  # keras-tuner's TrialStatus.COMPLETED
    log.info("search over: %d trials, %d completed", len(everything), len(completed))
    if not completed:
        raise TuneError(f"no trial completed: see the FAILED trial runs under run {parent}")
    # Ties (common on small data) go to the earliest trial: the same choice after every reload.
    sign = -1 if oracle.objective.direction == "max" else 1
    best = min(completed, key=lambda t: (sign * t.score, int(t.trial_id)))
    runs = trials.trial_runs(context, best.trial_id, "FINISHED")
    if not runs:
        raise TuneError(f"the best trial {best.trial_id} has no finished run in the tracking store")
    best_run = runs[0]
    values = {name: best.hyperparameters.get(name) for name in search.space}
    best_spec = dict(spec, **values)
    dataset, cached = prepared.dataset, prepared.features

    with tempfile.TemporaryDirectory() as tmp:
        files = trials.download_trial_files(best_run.info.run_id, Path(tmp) / "download")
        # On exactly the base the cached features came from (its layers, not a second build of it),
        # the best epoch of the best trial's head, loaded through the form the trial trained and saved.
        network = models.build(best_spec, len(dataset.class_names), prepared.network.base)
        trained = fastpath.training_view(network.head)
        trained.load_weights(files / "checkpoint.weights.h5")  # uncompiled: the trial's optimizer state stays out
        fastpath.finish(trained)  # into the head's convs (trained centre taps), if it has any
        history = json.loads((files / "history.json").read_text())
        log.info("best trial %s (%s): %s %.4f", best.trial_id, ", ".join(f"{k}={v:.4g}" for k, v in values.items()),
                 OBJECTIVE, best.score)

        current = mlflow.get_run(parent).data
        if current.tags.get("best_trial_run_id") != best_run.info.run_id:  # not logged by an earlier run of it
            clash = [k for k, v in values.items() if k in current.params and current.params[k] != str(v)]
            if clash:
                raise TuneError(f"run {parent} already records another best {', '.join(clash)}: the search "
                                "folder and the tracking store disagree; pass another --search-dir")
            tracking.log_params_once(values)
            mlflow.log_dict(best_spec, "spec.json")
            outcome = evaluate.log_outcome(network.head, cached.test, dataset, history=history, spec=best_spec,
                                           x_test_mirrored=cached.test_mirrored, logged_network=network.full, metrics={
                                               "best_score": float(best.score),
                                               "trials_completed": float(len(completed)),
                                               "trials_failed": float(len(everything) - len(completed))})
            # Last: its presence says the parent is complete, so a rerun of a finished search logs nothing.
            mlflow.set_tags({"best_trial_id": best.trial_id, "best_trial_run_id": best_run.info.run_id})
        else:
            outcome = evaluate.Outcome(*evaluate.score(network.head, cached.test, dataset.y_test, cached.test_mirrored))
    return Result(run_id=parent, test_accuracy=outcome.test_accuracy, test_loss=outcome.test_loss,
                  model_uri=f"runs:/{parent}/model", test_predictions=outcome.probabilities.argmax(axis=1))


def work(spec: dict, search: Search | None = None, **options) -> tuple[str, int]:
    """A worker's trials (_work), its layers in the spec's precision, on its strategy's devices."""
    with models.precision(spec), distribute.chosen(spec):
        return _work(spec, search, **options)


def _work(spec: dict, search: Search | None = None, *, variant: str = "tune", search_dir: str | None = None,
          cache_dir: str | None = None, **settings) -> tuple[str, int]:
    """Run trials for the chief named by keras-tuner's variables until its oracle says stop.

    Returns (parent run id, trials run here). The settings must be the chief's: they are checked
    against the search.json of the parent run.
    """
    import mlflow

    search = _settled(search, variant, settings)
    check(spec, search)
    parent = os.environ.get(distributed.PARENT_ENV)
    if not parent:
        raise SpecError(f"a worker needs {distributed.PARENT_ENV}: the parent run id that the chief prints")
    tracking.check_reachable()
    try:
        run = mlflow.MlflowClient().get_run(parent)
        chief = mlflow.artifacts.load_dict(f"runs:/{parent}/search.json")
    except mlflow.exceptions.MlflowException as err:
        raise SpecError(f"{distributed.PARENT_ENV}={parent} is not a search run on {mlflow.get_tracking_uri()}: "
                        f"{first_line(err, 200)}") from None
    dataset = train.load_dataset(spec)
    what = identity(spec, dataset.digest, search)
    if what != chief:
        raise SpecError(f"this worker's search differs from the chief's in {', '.join(differences(chief, what))}")
    prepared = prepare(spec, cache_dir, dataset)
    key = digest(what)
    folder = Path(search_dir) if search_dir else resume.default_search_dir(cache_dir, search.tuner, key)
    context = trials.Context(parent_run_id=parent, experiment_id=run.info.experiment_id, search_key=key,
                             seed=spec["seed"], feature_cache="hit" if prepared.features.hit else "miss")
    tuner, fit_kwargs = open_search(spec, search, prepared, context, folder)
    run_trials(tuner, fit_kwargs)
    return parent, tuner.trials_run
