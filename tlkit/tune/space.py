"""What a search is: its space of hyperparameters, its settings, the model a trial trains.

The space and settings are a variant's [search] table (experiments/tune.toml); a trial trains the
spec's head with the trial's values, built by models.head_model like every variant's head."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from tlkit import fastpath, models, spec as specs
from tlkit.spec import SpecError

OBJECTIVE = "val_accuracy"  # the seed's; keras-tuner maximises it (its name says accuracy)
TUNERS = ("random", "bayesian", "hyperband")
# Hyperband: max_epochs is the spec's epochs and each round keeps the best 1/3 for 3x the epochs
# (keras-tuner's default); max_trials caps its brackets like the other tuners' trial count.
HYPERBAND_FACTOR = 3
FORMAT_VERSION = 1  # bump when the search identity, the state file or the trial artifacts change

SEARCH_VARIANT = "tune"  # experiments/tune.toml: the seed's search, what `tlkit tune` runs by default


@dataclass(frozen=True)
class Search:
    """A search's settings beside the spec: a variant's [search] table, command-line options on top."""

    space: dict  # spec field -> keras-tuner hp.Int / hp.Float arguments and "type" ("int" or "float")
    tuner: str = "random"
    max_trials: int = 6
    executions_per_trial: int = 1


def load(variant: str = SEARCH_VARIANT, **options) -> Search:
    """The variant's search, options (tuner, max_trials, executions_per_trial; None = the variant's)
    on top, checked: a SpecError names what is wrong."""
    table = specs.variant_search(variant)
    if table is None:
        raise specs.SpecError(f"variant {variant} has no [search] table: it trains one model (tlkit train {variant})")
    table = dict(table)
    unknown = sorted(set(table) - {"space", "tuner", "max_trials", "executions_per_trial"})
    if unknown:
        raise specs.SpecError(f"variant {variant}: unknown search setting(s) {', '.join(unknown)}")
    table.update({k: v for k, v in options.items() if v is not None})
    search = Search(**table) if "space" in table else None
    if search is None:
        raise specs.SpecError(f"variant {variant}: [search.space] names no hyperparameter")
    check_settings(search)
    return search


def check_settings(search: Search) -> None:
    if search.tuner not in TUNERS:
        raise specs.SpecError(f"tuner must be one of {', '.join(TUNERS)}, got {search.tuner!r}")
    for name, least in (("max_trials", 1), ("executions_per_trial", 1)):
        value = getattr(search, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise specs.SpecError(f"{name} must be an integer of at least {least}, got {value!r}")
    if not isinstance(search.space, dict) or not search.space:
        raise specs.SpecError("[search.space] names no hyperparameter")
    for name, space in search.space.items():
        kind = specs.DEFAULTS.get(name)
        if name not in specs.DEFAULTS or isinstance(kind, (bool, str)):
            raise specs.SpecError(f"search.space.{name}: not a numeric spec field")
        if not isinstance(space, dict) or space.get("type") not in ("int", "float"):
            raise specs.SpecError(f"search.space.{name} must be a table with type 'int' or 'float'")
        if (space["type"] == "int") != isinstance(kind, int):
            raise specs.SpecError(f"search.space.{name}: {name} is {type(kind).__name__}, the space says {space['type']}")
        allowed = {"type", "min_value", "max_value", "step", "sampling"}
        if set(space) - allowed or not {"min_value", "max_value"} <= set(space):
            raise specs.SpecError(f"search.space.{name} takes min_value, max_value and optionally step, sampling; "
                                  f"got {', '.join(sorted(space))}")
        if not space["min_value"] <= space["max_value"]:
            raise specs.SpecError(f"search.space.{name}: min_value {space['min_value']} is above max_value "
                                  f"{space['max_value']}")


def check(spec: dict, search: Search, workers: int = 0) -> None:
    """Everything that makes a spec and its search unrunnable, before anything is loaded."""
    check_settings(search)
    if not isinstance(workers, int) or workers < 0:
        raise SpecError(f"workers must be an integer of at least 0, got {workers!r}")
    # The search trains heads on cached features: both of these need the base to run in training.
    if spec["augment"]:
        raise SpecError("tune searches the head on cached features: augment cannot be tuned (use train augment)")
    if spec["unfreeze"]:
        raise SpecError("tune searches the head on a frozen base: unfreeze cannot be tuned (use train finetune)")
    if spec.get("trainable_base"):
        raise SpecError("tune searches the head on a frozen base: trainable_base cannot be tuned")


def identity(spec: dict, dataset_digest: str, search: Search) -> dict:
    """What makes two searches the same one. The data is known by its digest, not its path, so a
    worker on another machine may keep the images elsewhere; `workers` is how, not what, and so is
    `strategy` (the same global batches on any devices: tlkit/distribute.py), so a search resumes
    or takes workers on a machine with other GPUs."""
    how = ("data", "strategy")
    return {"format": FORMAT_VERSION, "spec": {k: v for k, v in spec.items() if k not in search.space and k not in how},
            "dataset_digest": dataset_digest, "search_space": search.space, "objective": OBJECTIVE,
            "tuner": search.tuner, "max_trials": search.max_trials, "executions_per_trial": search.executions_per_trial}


def digest(value) -> str:
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


def _hyperparameter(hp, name: str, space: dict):
    options = {k: v for k, v in space.items() if k != "type"}
    return hp.Int(name, **options) if space["type"] == "int" else hp.Float(name, **options)


def trial_model(spec: dict, feature_shape: tuple, num_classes: int):
    """What a trial trains and its checkpoint holds: the spec's head (models.head_model, the builder
    of every variant's head), compiled for training through the fast path's door."""
    head = models.head_model(spec, feature_shape, num_classes)
    return fastpath.compiled(head, spec, spec["learning_rate"], on_features=True)


def hypermodel(spec: dict, search: Search, feature_shape: tuple, num_classes: int):
    """keras-tuner's build(hp): the spec's head with the trial's values of the searched fields."""

    def build(hp):
        trial_spec = dict(spec, **{name: _hyperparameter(hp, name, space) for name, space in search.space.items()})
        return trial_model(trial_spec, feature_shape, num_classes)

    return build
