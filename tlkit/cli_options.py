"""The options that several `tlkit` commands share, made once: one per spec field, the experiment,
the feature cache, the registered model's name and the promotion gate.

Nothing here imports TensorFlow or MLflow: the factories run while click builds the commands, so
their imports are on `tlkit --help`'s path (tlkit/cli.py).
"""

from __future__ import annotations

import click

from tlkit.mlproject import COMMON
from tlkit.spec import FIELDS, NOT_PRETRAIN_OPTIONS, PRETRAIN, flag


def _stacked(options):
    """A decorator adding `options` to a command, in their order on its --help."""

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def field_options(names, defaults: dict | None = None, shown_as: str = "the variant's; baseline"):
    """A decorator adding one option per spec field in `names`: --kebab-name (--name/--no-name for a
    bool), typed like the field's default, unset (None) unless given. Help shows `defaults`' value
    (default: the field's) as "[default: <shown_as>: value]"."""

    def decorate(command):
        for name in reversed(list(names)):
            default, help_text = FIELDS[name]
            value = (defaults or {}).get(name, default)
            shown = repr(value) if isinstance(value, str) else value
            note = f"  [default: {shown_as}: {shown}]" if shown_as else f"  [default: {shown}]"
            if isinstance(default, bool):
                option = click.option(f"{flag(name)}/{flag(name).replace('--', '--no-', 1)}", name, default=None,
                                      help=help_text + note)
            else:
                option = click.option(flag(name), name, type=type(default), default=None, help=help_text + note)
            command = option(command)
        return command

    return decorate


# One option per spec field: what `train`, `tune` and `recipe` take.
spec_options = field_options(FIELDS)


def pretrain_options(command):
    """One option per spec field that pre-training uses, its default shown as pretrain's own."""
    return field_options([n for n in FIELDS if n not in NOT_PRETRAIN_OPTIONS], PRETRAIN, shown_as="")(command)


def common_options(command):
    """One option per parameter that every suite child shares (mlproject.COMMON), unset unless given."""
    return field_options(COMMON, shown_as="each variant's; baseline")(command)


experiment_option = click.option("--experiment", default=None,
                                 help="MLflow experiment name  [default: $MLFLOW_EXPERIMENT_NAME or MLflow's]")
cache_dir_option = click.option("--cache-dir", default=None, envvar="TLKIT_CACHE_DIR",
                                help="frozen-feature cache folder  [default: $TLKIT_CACHE_DIR or ~/.cache/tlkit/features]")
model_name_option = click.option("--model-name", default=None,
                                 help="registered model name  [default: <dataset>-<base>, e.g. cifar10-vgg16]")

# `train`, `tune` and `suite`: every variant at several seeds (tlkit/repeats.py).
repeats_option = click.option(
    "--repeats", type=click.IntRange(min=1), default=1,
    help="train each variant at this many seeds: seed, seed+1, ... for the validation split, initialisation and "
         "batch order (the limit samples keep the seed: the same test images), each a run nested under one parent "
         "run per variant that logs mean, sd and a 95% t-interval across seeds; 1 = one run, as before")

# The promotion gate, shared by `suite` and `promote` (registry.promote).
_gate_options = [
    click.option("--min-gain", type=float, default=0.0,
                 help="points of test accuracy the best run (with --repeats: the best mean over seeds) must gain "
                      "over @champion to replace it"),
    click.option("--significance", type=float, default=0.05,
                 help="the paired test's p must be below this to replace @champion: McNemar's exact test on the two "
                      "runs' per-image test predictions, or, for variants run with --repeats, its stratified form "
                      "(Cochran-Mantel-Haenszel, exact conditional p) over the seed pairings; 1 = any gain"),
]

gate_options = _stacked(_gate_options)


# `tlkit features`' Ray engine: where the pass runs and what each actor gets.
_ray_options = [
    click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
                 help="where the pass runs: this process, or Ray Data's actors (pip install 'tlkit[cluster]')"),
    click.option("--address", default=None,
                 help="Ray: 'local' starts Ray here with --workers CPUs; 'auto' joins the cluster of this node; "
                      "ray://HEAD:10001 a remote one  [default: local]"),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="Ray actors, each loading the base once  [default: 2]"),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                 help="GPUs Ray gives each actor (a fraction shares one)  [default: 0]"),
    click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="CPUs Ray gives each actor (decoding and, without a GPU, the base)  [default: 1]"),
    click.option("--retries", type=click.IntRange(min=0), default=None,
                 help="times Ray restarts a worker that dies and retries its batch before the pass fails  [default: 3]"),
]

ray_options = _stacked(_ray_options)


# `tlkit tune`'s search: trials, executions, the tuner, workers and its state's folder.
_search_options = [
    click.option("--max-trials", type=click.IntRange(min=1), default=None,
                 help="trials to run (hyperband: a cap on its brackets)  [default: the variant's; tune: 6, the seed's]"),
    click.option("--executions-per-trial", type=click.IntRange(min=1), default=None,
                 help="fits per trial from fresh weights; the trial's score is their mean  [default: the variant's; tune: 1]"),
    click.option("--tuner", type=click.Choice(["random", "bayesian", "hyperband"]), default=None,
                 help="keras-tuner's search algorithm  [default: the variant's; tune: random]"),
    click.option("--workers", type=click.IntRange(min=0), default=0,
                 help="worker processes on this machine; this one serves the oracle over gRPC. 0 = one process"),
    click.option("--search-dir", default=None,
                 help="keras-tuner's state: run again with the same folder to resume  "
                      "[default: <cache-dir>/searches/<tuner>-<search key>-<where>]"),
]

search_options = _stacked(_search_options)
