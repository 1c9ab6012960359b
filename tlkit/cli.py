"""The `tlkit` command. MLproject entry points call these commands.

tlkit's library modules import what they use at their heads; this one imports each command's modules
inside the command, so `tlkit --help` loads only click, spec.py, mlproject.py and models.py's
tables: 0.14 s median wall, 0.12 s CPU over 15 runs (`time tlkit --help`, AMD EPYC Zen 4, 2 cores,
load 2.8), where importing train.py's chain at start would load TensorFlow and MLflow (8-14 s).
Exit codes: 2 for bad input (a parameter, a spec, a data source), 1 for a failure while running;
one line on stderr, no traceback unless --debug.

One module for every command: a command is its options and a few lines that call into the module
that does the work; the option groups are made in tlkit/cli_options.py, the exit codes in tlkit/cli_errors.py.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import click

from tlkit import __version__
from tlkit.cli_errors import friendly_errors, terminate_as_interrupt
from tlkit.cli_options import (cache_dir_option, common_options, experiment_option, gate_options, model_name_option,
                               pretrain_options, ray_options, repeats_option, search_options, spec_options)

log = logging.getLogger("tlkit")


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) hides our own messages.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # So do its Python INFO lines, which reach the root handler main sets up: MirroredStrategy logs
    # a reduction plan dozens of times a run (tlkit/distribute.py logs the strategy chosen, once).
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="tlkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug: bool) -> None:
    """Run, track and compare transfer-learning experiments with Keras and MLflow."""
    _quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="tlkit: %(message)s")
    signal.signal(signal.SIGTERM, terminate_as_interrupt)


@main.command("variants")
def variants_command() -> None:
    """List the experiment variants in experiments/ with what each changes."""
    from tlkit import spec as specs

    for name in specs.variant_names():
        diff, description = specs.read_variant(name)
        click.echo(f"{name:12s} {description}")


@main.command("train")
@click.argument("variant")
@spec_options
@repeats_option
@experiment_option
@cache_dir_option
@friendly_errors
def train_command(variant: str, repeats: int, experiment: str | None, cache_dir: str | None, **overrides) -> None:
    """Train VARIANT (a name from `tlkit variants`, or a .toml spec file) and log it to MLflow.

    A variant with a [search] table (tune) runs its search, as `tlkit tune VARIANT` does. With
    --repeats N, N runs at seed, seed+1, ... under one parent run that logs their mean, sd and
    95% t-interval (a search runs once, its best configuration at the N seeds).

    Example: tlkit train conv_head --data /data/cifar10 --epochs 5 --repeats 3
    """
    from tlkit import spec as specs

    if specs.variant_search(variant) is not None:  # a search variant (tune): its settings as the file says
        _search(variant, overrides, {}, experiment=experiment, cache_dir=cache_dir, repeats=repeats)
        return
    spec = specs.load(variant, overrides)  # every check happens before data is loaded or a run is made
    if repeats > 1:
        _repeat(variant, spec, repeats, {}, experiment=experiment, cache_dir=cache_dir)
        return
    from tlkit.train import train

    result = train(variant, spec, experiment=experiment, cache_dir=cache_dir)
    click.echo(f"run {result.run_id}: test_accuracy {result.test_accuracy:.4f}  model {result.model_uri}")


def _repeat(variant: str, spec: dict, repeats: int, search_options: dict, *, experiment: str | None,
            cache_dir: str | None) -> None:
    """VARIANT at `repeats` seeds (tlkit/repeats.py): a line per seed's run, then the parent's aggregate."""
    from tlkit import repeats as repeating

    result = repeating.run(variant, spec, repeats, experiment=experiment, cache_dir=cache_dir,
                           search_options=search_options)
    for seed in result.seeds:
        click.echo(f"run {seed.run_id}: test_accuracy {seed.test_accuracy:.4f}  model {seed.model_uri}")
    m = result.metrics
    click.echo(f"run {result.run_id}: test_accuracy mean {m['test_accuracy_mean']:.4f} over {repeats} seeds "
               f"(sd {m['test_accuracy_sd']:.4f}, 95% t-interval {m['test_accuracy_ci_low']:.4f}-"
               f"{m['test_accuracy_ci_high']:.4f})")


# --- features: the base's pass, here or across a Ray cluster (tlkit/cluster.py) --------------------

@main.command("features")
@click.argument("variant")
@spec_options
@ray_options
@cache_dir_option
@friendly_errors
def features_command(variant: str, engine: str, address: str | None, workers: int | None,
                     gpus_per_worker: float | None, cpus_per_worker: float | None, retries: int | None,
                     cache_dir: str | None, **overrides) -> None:
    """Compute VARIANT's frozen features into the cache, here or on a Ray cluster.

    Makes every cache entry `tlkit train VARIANT` with the same options looks up (the base's output;
    for finetune the cut below the block and the output derived from it; with --flip the mirrored
    training images'), so that run finds them all (feature_cache=hit) and trains on this machine;
    it is tagged with the engine and workers that made them. Paths (data, weights) must be readable
    at the same place on every node.

    Example: tlkit features finetune --engine ray --address ray://head:10001 --workers 8
    --gpus-per-worker 1 --data /shared/photos --image-size 224
    """
    from tlkit import cluster, spec as specs

    ray_options = {"--address": address, "--workers": workers, "--gpus-per-worker": gpus_per_worker,
                   "--cpus-per-worker": cpus_per_worker, "--retries": retries}
    if engine == "local" and any(value is not None for value in ray_options.values()):
        given = [name for name, value in ray_options.items() if value is not None]
        raise specs.SpecError(f"{', '.join(given)}: for --engine ray only")
    spec = specs.load(variant, overrides)  # every check before data is loaded or Ray started
    made = cluster.make_features(
        variant, spec, engine=engine, address=address or "local", workers=workers or 2,
        gpus_per_worker=gpus_per_worker or 0.0, cpus_per_worker=cpus_per_worker or 1.0,
        retries=cluster.RETRIES if retries is None else retries, cache_dir=cache_dir)
    for done in made.passes:
        what = f"{done.boundary} ({done.transform})" if done.transform else done.boundary
        click.echo(f"{engine}: {done.images} images at {what} in {done.seconds:.1f} s "
                   f"({done.images / max(done.seconds, 1e-9):.0f} images/s) -> entry {done.key}")
    by = made.made_by
    click.echo(f"features for {specs.variant_path(variant).stem}: entry {made.key} at {made.boundary} ({made.outcome}; "
               f"made by {by.get('engine', 'local')}, {by.get('workers', 1)} worker(s))")


# --- pretrain: the seed's step 1 (tlkit/pretrain.py) ---------------------------------------------

@main.command("pretrain")
@pretrain_options
@click.option("--output", default=None,
              help="weights file to write, ending in .weights.h5  [default: ./pretrained/<base>-<sha256[:12]>.weights.h5]")
@experiment_option
@friendly_errors
def pretrain_command(output: str | None, experiment: str | None, **overrides) -> None:
    """Pre-train a base on a source data set; write its weights for `--weights <file>`.

    The whole network (base + dense top) trains from random weights (or --weights FILE), with
    augmentation and early stopping; the base alone (include_top=False) is saved as Keras'
    .weights.h5 and logged as an artifact of the run. The last line printed is the file's path.

    Example: tlkit pretrain --data ./cifar10 --classes airplane,automobile,bird,cat,deer
    --base MobileNetV3Small --preprocess base --epochs 15
    """
    from tlkit import pretrain as pretraining

    spec = pretraining.pretrain_spec(overrides)  # every check before data is loaded or a run is made
    pretraining.check_output(output)
    run_id, path = pretraining.pretrain(spec, output=output, experiment=experiment)
    click.echo(f"run {run_id}: pretrained {spec['base']} weights")
    click.echo(str(path))



# --- tune: keras-tuner search, one nested run per trial (tlkit/tune/) --------------------------

@main.command("tune")
@click.argument("variant", default="tune")
@spec_options
@search_options
@repeats_option
@experiment_option
@cache_dir_option
@friendly_errors
def tune_command(variant: str, max_trials: int | None, executions_per_trial: int | None, tuner: str | None,
                 workers: int, search_dir: str | None, repeats: int, experiment: str | None, cache_dir: str | None,
                 **overrides) -> None:
    """Search the head with keras-tuner: VARIANT is a variant with a [search] table (default: tune,
    the seed's search of units 256..1024, l2 and learning rate 1e-4..1e-2, log).

    The spec options set everything the search does not (the variant's values by default). One
    parent run, one nested run per trial; the best trial's whole network is evaluated and logged
    as `model`. With KERASTUNER_ORACLE_IP, _PORT and _TUNER_ID=tunerK (and TLKIT_PARENT_RUN_ID) set,
    this runs as a worker for that chief instead; with _TUNER_ID=chief it serves the oracle there.
    With --repeats N the search runs once (in this process) and its best configuration trains at
    N seeds under one parent run.

    Example: tlkit tune --data /data/cifar10 --max-trials 12 --tuner bayesian --workers 2
    """
    _search(variant, overrides, dict(max_trials=max_trials, executions_per_trial=executions_per_trial, tuner=tuner),
            workers=workers, search_dir=search_dir, experiment=experiment, cache_dir=cache_dir, repeats=repeats)


def _search(variant: str, overrides: dict, settings: dict, *, workers: int = 0, search_dir: str | None = None,
            experiment: str | None, cache_dir: str | None, repeats: int = 1) -> None:
    """A search variant, as `tlkit tune` and `tlkit train` run it."""
    from tlkit import spec as specs, tune

    search = tune.load_search(variant, **settings)
    searched = [specs.flag(name) for name in search.space if overrides.get(name) is not None]
    if searched:
        raise specs.SpecError(f"{', '.join(searched)}: the search sets these (the variant's [search.space])")
    spec = specs.load(variant, overrides)  # every check before data is loaded or a run is made
    if repeats > 1:
        if workers or search_dir or tune.role() != "single":
            raise specs.SpecError("--repeats runs its one search in this process: without --workers, "
                                  "--search-dir or keras-tuner's chief/worker variables")
        _repeat(variant, spec, repeats, settings, experiment=experiment, cache_dir=cache_dir)
        return
    if tune.role() == "worker":
        if workers:
            raise specs.SpecError("a worker cannot start workers: --workers must be 0")
        parent, count = tune.work(spec, search, variant=variant, search_dir=search_dir, cache_dir=cache_dir)
        click.echo(f"worker {os.environ['KERASTUNER_TUNER_ID']}: {count} trial(s) under run {parent}")
        return
    result = tune.tune(spec, search, variant=variant, workers=workers, search_dir=search_dir, experiment=experiment,
                       cache_dir=cache_dir)
    click.echo(f"run {result.run_id}: test_accuracy {result.test_accuracy:.4f}  model {result.model_uri}")


# --- recipe: the search over the levers that lift accuracy (tlkit/recipe.py) ------------------------

@main.command("recipe")
@spec_options
@click.option("--budget", default=None, metavar="DURATION",
              help="wall time the search may take, from the command's start: e.g. 90s, 45m, 2h, 1h30m  "
                   "[default: 30m]; what it leaves out is listed with its estimated cost")
@click.option("--output", default=None,
              help="write the chosen configuration here as a variant file  [default: ./recipe-<run id>.toml]")
@experiment_option
@cache_dir_option
@friendly_errors
def recipe_command(budget: str | None, output: str | None, experiment: str | None, cache_dir: str | None,
                   **overrides) -> None:
    """Search bases, image sizes, preprocessing, heads, flips and fine-tuning within a time budget.

    Measures what each costs here, prints its plan, screens every candidate on a sample, gives the
    best more images and epochs, then flips and fine-tuning (tlkit/recipe.py); each configuration
    is a nested run, chosen on validation accuracy. Several bases: --base VGG16,Xception --weights
    VGG16=PATH,Xception=PATH. Writes the chosen configuration as a variant file:
    `tlkit train <file> --data ... --weights ...` reruns it alone.

    Example: tlkit recipe --data /data/cifar10 --weights /abs/vgg16-imagenet-notop.weights.h5 --budget 45m
    """
    from tlkit import budget as budgets, recipe, spec as specs

    seconds = budgets.parse_budget(budget or recipe.DEFAULT_BUDGET)
    bases = recipe.parse_bases(overrides.get("base") or specs.DEFAULTS["base"], overrides.get("weights") or "imagenet")
    if output and not output.endswith(".toml"):
        raise specs.SpecError(f"--output {output} must end in .toml (it is a variant file)")
    result = recipe.search(overrides, bases=bases, budget=seconds, experiment=experiment, cache_dir=cache_dir,
                           output=output or "")
    path = output or f"recipe-{result.run_id}.toml"
    if not output:  # the text search() logged as chosen.toml: no download, no file of the user's overwritten
        Path(path).write_text(result.variant_text)
    click.echo(recipe.table(result.tried, result.chosen, result.left_out))
    click.echo(f"run {result.run_id}: chosen {result.chosen.name}, val_accuracy {result.chosen.val_accuracy:.4f}, "
               f"test_accuracy {result.chosen.test_accuracy:.4f}, {result.seconds / 60:.1f} min; variant file {path}")


# --- suite, compare, promote, predict, download: the main job (tlkit/suite.py, tlkit/registry.py) ---

def _echo_promotion(promotion) -> None:
    click.echo(promotion.message)
    per_class = (promotion.report or {}).get("per_class")
    if per_class:
        click.echo("per-class accuracy change (candidate - champion, points): " + ", ".join(
            f"{row['class']} {row['change_points']:+.1f}" for row in per_class))
    click.echo(f"models:/{promotion.name}@champion -> version {promotion.champion or '-'}")


@main.command("suite")
@click.option("--variants", default="all",
              help="comma-separated variants to run, in order; 'all' = finetune,baseline,conv_head,l2,sgd,"
                   "dropout,tune,augment")
@common_options
@repeats_option
@experiment_option
@cache_dir_option
@click.option("--promote/--no-promote", default=True, help="register the best variant's model and "
              "move @champion to it if it beats the champion")
@model_name_option
@gate_options
@friendly_errors
def suite_command(variants: str, repeats: int, experiment: str | None, cache_dir: str | None, promote: bool,
                  model_name: str | None, min_gain: float, significance: float, **overrides) -> None:
    """Run every variant as a child of one suite run, compare them, promote the best.

    The options given pass to every variant; each keeps its own value of the rest. Prints the
    comparison table (also logged on the suite run with a chart). Exits 1 if any variant failed,
    after comparing and promoting among the others. With --repeats N each variant is a parent run
    of N seeds' runs, compared and promoted on its mean (docs/repeats.md).

    Example: tlkit suite --data /data/cifar10 --variants baseline,conv_head,finetune --epochs 5 --repeats 3
    """
    from tlkit import compare, registry, suite

    registry.check_gate(min_gain, significance)
    names = suite.parse_variants(variants)
    suite.child_specs(names, overrides)  # every spec checked before anything is loaded or logged
    try:
        result = suite.run_suite(names, overrides, experiment=experiment, cache_dir=cache_dir, promote=promote,
                                 model_name=model_name, min_gain=min_gain, significance=significance,
                                 repeats=repeats)
        failure = None
    except suite.SuiteError as err:
        result, failure = err.result, err
    click.echo(f"suite run {result.run_id}")
    click.echo(compare.render(result.rows, "table"), nl=False)
    if result.promotion is not None:
        _echo_promotion(result.promotion)
    if failure is not None:
        raise click.ClickException(str(failure))


@main.command("compare")
@experiment_option
@click.option("--suite", "suite_run", default=None, help="only the children of this suite run (its run id)")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              help="output format")
@friendly_errors
def compare_command(experiment: str | None, suite_run: str | None, fmt: str) -> None:
    """The variant runs of an experiment, best test accuracy first.

    Columns: variant, run id, status, test_accuracy, best val_accuracy of any epoch, epochs run,
    duration in seconds, dataset and its digest (the table shows its first 12 characters).
    Each has its 95% Wilson interval and, against the best, the difference and McNemar's exact p.
    A variant run with --repeats is one row: the mean over its seeds (ranked on it), their sd, the
    95% t-interval and the number of seeds; its p against the best is the stratified McNemar test
    (Cochran-Mantel-Haenszel over seed pairings, exact; p_cmh) and p_floor the smallest p its
    disagreements could give.

    Example: tlkit compare --experiment suite --format csv > runs.csv
    """
    from tlkit import compare, tracking

    tracking.check_reachable()
    click.echo(compare.render(compare.compare(experiment, suite_run), fmt), nl=False)


@main.command("promote")
@experiment_option
@click.option("--suite", "suite_run", default=None, help="only the children of this suite run (its run id)")
@click.option("--dataset-digest", default=None,
              help="compare only runs tested on this dataset digest (a prefix will do)  "
                   "[default: the one digest there is; several are an error]")
@model_name_option
@click.option("--force", is_flag=True,
              help="move @champion even if the best run does not beat it or was tested on another dataset")
@gate_options
@friendly_errors
def promote_command(experiment: str | None, suite_run: str | None, dataset_digest: str | None,
                    model_name: str | None, force: bool, min_gain: float, significance: float) -> None:
    """Register the best FINISHED run's model; make it @champion if it beats the champion.

    Only runs with a logged model and test_accuracy on one dataset digest compete. Beating the
    champion means a gain of at least --min-gain points that McNemar's exact test on the two runs'
    per-image test predictions finds real (p < --significance); a champion logged without them is
    weighed by test accuracy alone, and the output says so. The decision, the gain with its 95%
    interval, the p-value and per-class changes are printed, tagged on the version and logged as
    promotion/ on the candidate's run. Promoting twice in a row registers nothing new.

    With variants run with --repeats, those compete on their mean test accuracy over seeds (a
    single run then sits out: one seed is no match for a mean); the
    best one's best-validation seed is registered (its tags and description: the variant, the
    seeds, the mean and its 95% t-interval), and it replaces the champion only if the mean gain
    reaches --min-gain and the stratified McNemar test (Cochran-Mantel-Haenszel over the seed
    pairings, seed k with the champion's seed k; exact conditional p, whose floor 2/2^N for N
    disagreements is printed) is below --significance. The report goes to promotion/ on the
    variant's parent run.

    Example: tlkit promote --experiment suite --model-name cifar10-vgg16
    """
    from tlkit import registry, tracking

    tracking.check_reachable()
    _echo_promotion(registry.promote(experiment, suite_run, dataset_digest, model_name, force=force,
                                     min_gain=min_gain, significance=significance))


@main.command("predict")
@click.option("--model", "model_uri", required=True,
              help="model URI: models:/NAME@champion, models:/NAME/3, runs:/ID/model or a folder")
@click.option("--output", default=None,
              help="also write FILE.csv or FILE.parquet: path, label, probability, error, p_<class> per class")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@friendly_errors
def predict_command(model_uri: str, output: str | None, images: tuple[str, ...]) -> None:
    """Classify IMAGES (files of any size, or folders, read recursively): one line each,
    path<TAB>label<TAB>probability.

    Folders stream in batches with a progress bar on stderr. With --output, a file that is not an
    image gets a row with its error and the rest are scored; without it, such a file in a folder is
    named on stderr and the command exits 1 at the end. Files named one by one are all read first:
    one that is not an image stops the command before the model loads.

    Example: tlkit predict --model models:/cifar10-vgg16@champion ./photos --output answers.csv
    """
    from tlkit import registry, scoring

    if not output and not any(Path(p).is_dir() for p in images):
        for path, label, probability in registry.predict(model_uri, list(images)):
            click.echo(f"{path}\t{label}\t{probability:.4f}")
        return
    if not any(Path(p).is_dir() for p in images):
        for path in images:  # named one by one: every file read before the model loads
            registry.read_image(path)
    scored = scoring.score(model_uri, list(images), output, click.echo)
    if scored.errors and output:
        click.echo(f"tlkit: {scored.errors} of {scored.images} files are not images; their rows in {output} "
                   "say why", err=True)
    elif scored.errors:
        raise click.ClickException(f"{scored.errors} of {scored.images} files are not images (named above); "
                                   "the rest are scored")


@main.command("download")
@click.option("--model", "model_uri", required=True, help="model URI, e.g. models:/cifar10-vgg16@champion")
@click.option("--dst", required=True, type=click.Path(file_okay=False), help="new or empty folder to write it to")
@friendly_errors
def download_command(model_uri: str, dst: str) -> None:
    """Copy a model into a folder that loads without the tracking server.

    Load it with mlflow.pyfunc.load_model(DST), serve it with `mlflow models serve -m DST
    --env-manager local`, or `tlkit predict --model DST IMAGE`.

    Example: tlkit download --model models:/cifar10-vgg16@champion --dst ./champion
    """
    from tlkit import registry

    click.echo(str(registry.download(model_uri, dst)))


@main.command("export")
@click.option("--model", "model_uri", required=True,
              help="model URI: models:/NAME@champion, models:/NAME/3, runs:/ID/model or a folder")
@click.option("--format", "formats", required=True, multiple=True,
              help="saved_model, onnx or litert; repeat it or give several with commas: --format onnx,litert")
@click.option("--dst", required=True, type=click.Path(), help="new or empty folder to write the files to")
@click.option("--images", default=None, type=click.Path(exists=True),
              help="test images to check the export on (image folder or .npz)  [default: the run's data]")
@click.option("--sample", type=int, default=64, help="test images each format is checked on")
@click.option("--log", "log_to_store", is_flag=True,
              help="log the checks (tags) and the files (artifacts exported/) to the model's version and run")
@friendly_errors
def export_command(model_uri: str, formats: tuple[str, ...], dst: str, images: str | None, sample: int,
                   log_to_store: bool) -> None:
    """Export a model as SavedModel, ONNX and/or LiteRT, each checked against the logged model.

    Every file runs in its own runtime on test images (the run's, or --images) and must give the
    logged model's probabilities (float32: differences ~1e-6) and top-1 classes before it is kept.
    The graphs take float32 (N, size, size, 3) RGB pixels in 0..255 at the network's size.
    Needs pip install 'tlkit[export]'.

    Example: tlkit export --model models:/cifar10-vgg16@champion --format saved_model,onnx,litert --dst ./shipped
    """
    from tlkit import export

    wanted = [f.strip() for given in formats for f in given.split(",") if f.strip()]
    try:
        result = export.export(model_uri, list(dict.fromkeys(wanted)), dst, images=images, sample=sample,
                               log_to_store=log_to_store)
    except export.ExportError as err:  # a failure while exporting or checking: one line, exit 1
        raise click.ClickException(str(err)) from None
    click.echo(f"input of every graph: {result.input}")
    for check in result.checks:
        click.echo(f"{check.format}\t{check.path}\tlargest probability difference {check.max_difference:.2g} on "
                   f"{check.images} test images\ttop-1 agreement {check.top1_agreement:.4f} on the "
                   f"{check.decided} whose top-two margin exceeds it")


def entry() -> None:
    """The `tlkit` program (and `python -m tlkit.cli`): main with TensorFlow's start-up notices
    filtered out of stderr (tlkit/console.py)."""
    from tlkit import console

    console.filter_native_stderr()
    main()


if __name__ == "__main__":
    entry()
