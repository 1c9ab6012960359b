"""One variant at N seeds: each seed a run of its own, grouped under one parent run that logs the aggregate.

    <variant>  (parent run; tags tlkit.repeats=N, variant, dataset_digest)
      <variant>-seed1995, -seed1996, ... (ordinary train runs; tags tlkit.repeat=k, tlkit.repeat_seed)
      <variant>  the search, first       (a search variant, tune: tlkit.repeat=search; its best
                                          configuration is what the seeds then train)

Repeat k trains at seed + k: the validation split, the weight initialisation and the batch order
change, and sample_seed stays at the first seed, so every repeat trains on the same sampled images
and is tested on the same test images (one dataset digest): seed k of one variant pairs with seed
k of another image by image (stats.Stratified, compare.py, registry.py). Each seed's run is a
`tlkit train` run that reruns alone from its params (`--seed 1996 --sample-seed 1995`).

The parent logs, across its seeds: test_accuracy_mean, _sd, _ci_low, _ci_high (95% t-interval,
stats.mean_interval), the same of val_accuracy (each seed's best epoch), n_seeds, and
test_accuracy = the mean, the column MLflow's runs table shows: the aggregate stands in it beside
every seed's own. A seed that fails ends the group: the parent is marked FAILED and logs no
aggregate.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from tlkit import runs, spec as specs, stats, tracking, train, tune
from tlkit.runs import REPEAT, REPEAT_OF, REPEAT_SEED, REPEATS, SEARCH
from tlkit.spec import SpecError

log = logging.getLogger(__name__)


@dataclass
class RepeatsResult:
    run_id: str  # the parent run
    test_accuracy: float  # the mean over the seeds
    metrics: dict  # what the parent logged (aggregate)
    seeds: list = field(default_factory=list)  # train.Result per seed, in seed order
    search_run_id: str = ""  # a search variant's search, run once


def check(repeats) -> int:
    """The number of seeds, if it is a whole number of at least 1; else SpecError."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise SpecError(f"repeats must be a whole number of at least 1, got {repeats!r}")
    return repeats


def seed_spec(spec: dict, index: int) -> dict:
    """Repeat `index`'s spec: seed + index, the limit samples kept at the first seed."""
    return dict(spec, seed=spec["seed"] + index, sample_seed=spec["sample_seed"] or spec["seed"])


def seed_specs(spec: dict, repeats: int) -> list[dict]:
    return [seed_spec(spec, index) for index in range(check(repeats))]


def aggregate(test_accuracies, val_accuracies) -> dict:
    """The parent's metrics from its seeds' test accuracies and best validation accuracies (those
    only when every seed has one)."""
    metrics = {"n_seeds": float(len(test_accuracies))}
    measured = [("test_accuracy", test_accuracies)]
    if all(value is not None for value in val_accuracies):
        measured.append(("val_accuracy", val_accuracies))
    for name, values in measured:
        mean, sd, low, high = stats.mean_interval(values)
        metrics.update({f"{name}_mean": mean, f"{name}_sd": sd, f"{name}_ci_low": low, f"{name}_ci_high": high})
    metrics["test_accuracy"] = metrics["test_accuracy_mean"]  # the runs table's usual column
    return {k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}  # one seed: no sd


def run(variant: str, spec: dict, repeats: int, *, experiment: str | None = None, cache_dir: str | None = None,
        nested: bool = False, datasets: list | None = None, search_options: dict | None = None) -> RepeatsResult:
    """Train `variant` at `repeats` seeds under one parent run and log their aggregate on it.

    datasets: each seed's train.load_dataset(seed_spec(spec, k)) done already (a suite loads them
    for all its variants), else each is loaded when its seed runs. search_options: a search
    variant's tune options (tuner, max_trials, ...), for its one search."""
    import keras
    import mlflow

    seed_spec_list = seed_specs(spec, repeats)
    search = specs.variant_search(variant)
    if search is not None:
        search = tune.load_search(variant, **(search_options or {}))
        tune.check(spec, search)
    tracking.use_experiment(experiment)
    tracking.check_reachable()
    datasets = list(datasets) if datasets is not None else [None] * repeats
    datasets[0] = datasets[0] or train.load_dataset(seed_spec_list[0])
    first = datasets[0]
    name = Path(variant).stem
    tags = tracking.run_tags(spec, first, variant=name, **{REPEATS: str(repeats)})
    with tracking.run(name, nested=nested, tags=tags) as parent:
        parent_id = parent.info.run_id
        tracking.log_params_once({**spec, "repeats": repeats})
        trained_spec, search_run = spec, ""
        if search is not None:  # the search once, at the first seed; its best configuration at every seed
            log.info("repeats: %s's search, once", name)
            searched = tune.tune(seed_spec_list[0], search, variant=variant, cache_dir=cache_dir, nested=True,
                                 dataset=first, tags={REPEAT_OF: parent_id, REPEAT: SEARCH})
            search_run = searched.run_id
            trained_spec = mlflow.artifacts.load_dict(f"runs:/{search_run}/spec.json")  # the best configuration
            specs.validate(trained_spec)
            keras.backend.clear_session()
        results, test_accuracies, val_accuracies = [], [], []
        client = mlflow.MlflowClient()
        for index in range(repeats):
            one = seed_spec(trained_spec, index)
            log.info("repeats: %s seed %d (%d of %d)", name, one["seed"], index + 1, repeats)
            # The same images at this seed's split: no second load (a folder's scan, CIFAR-10's decode).
            dataset = datasets[index] or first.with_split(one["seed"])
            if dataset.digest != first.digest:  # sample_seed keeps the images; a guard, not a choice
                raise SpecError(f"seed {one['seed']} sampled other images (digest {dataset.digest[:12]}, not "
                                f"{first.digest[:12]}): the repeats cannot be paired")
            try:
                result = train.train(variant, one, cache_dir=cache_dir, nested=True, dataset=dataset,
                                     tags={REPEAT_OF: parent_id, REPEAT: str(index), REPEAT_SEED: str(one["seed"])},
                                     run_name=f"{name}-seed{one['seed']}")
            finally:
                datasets[index] = None  # one seed's split in memory at a time, unless the caller holds them
                keras.backend.clear_session()  # drop the finished seed's graph and weights
                gc.collect()
            results.append(result)
            test_accuracies.append(result.test_accuracy)
            val_accuracies.append(runs.best_val_accuracy(client, client.get_run(result.run_id)))
        metrics = aggregate(test_accuracies, val_accuracies)
        mlflow.log_metrics(metrics)
        if search_run:
            mlflow.set_tag("search_run_id", search_run)
        log.info("repeats: %s over %d seeds: test_accuracy %.4f (sd %.4f, 95%% interval %.4f-%.4f)", name, repeats,
                 metrics["test_accuracy_mean"], metrics["test_accuracy_sd"], metrics["test_accuracy_ci_low"],
                 metrics["test_accuracy_ci_high"])
    return RepeatsResult(run_id=parent_id, test_accuracy=metrics["test_accuracy_mean"], metrics=metrics,
                         seeds=results, search_run_id=search_run)
