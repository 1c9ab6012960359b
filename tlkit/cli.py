"""The `tlkit` command. MLproject entry points call these commands.

TensorFlow and MLflow are imported inside the commands, so `tlkit --help` answers at once.
Exit codes: 2 for bad input (a parameter, a spec, a data source), 1 for a failure while running;
one line on stderr, no traceback unless --debug.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys

import click

from tlkit import __version__
from tlkit.spec import FIELDS

log = logging.getLogger("tlkit")


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) hides our own messages.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _terminate_as_interrupt(signum, frame):
    # SIGTERM (a scheduler, `kill`) ends the run like Ctrl-C: marked KILLED, nothing registered.
    raise KeyboardInterrupt(f"signal {signum}")


def spec_options(command):
    """One option per spec field: --kebab-name, typed like its default, unset unless given."""
    for name, (default, help_text) in reversed(FIELDS.items()):
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            option = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None,
                                  help=f"{help_text}  [baseline: {default}]")
        else:
            shown = repr(default) if isinstance(default, str) else default
            option = click.option(flag, name, type=type(default), default=None,
                                  help=f"{help_text}  [default: the variant's; baseline: {shown}]")
        command = option(command)
    return command


def friendly_errors(command):
    """Known failures become one line and an exit code; --debug shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from tlkit.spec import SpecError

        usage_errors = (SpecError,)
        runtime_errors: tuple = ()
        try:
            from tlkit.data import DataError
            from tlkit.features import FeatureCacheError
            from tlkit.models import ModelError
            from tlkit.tracking import TrackingError

            usage_errors += (DataError, ModelError)
            runtime_errors += (TrackingError, FeatureCacheError)
        except ImportError:  # pragma: no cover - a broken install shows itself below
            pass
        debug = click.get_current_context().find_root().params.get("debug")
        try:
            return command(*args, **kwargs)
        except usage_errors as err:
            if debug:
                raise
            raise click.UsageError(str(err)) from None
        except runtime_errors as err:
            if debug:
                raise
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:
            click.echo("tlkit: interrupted; the run is marked KILLED", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="tlkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug: bool) -> None:
    """Run, track and compare transfer-learning experiments with Keras and MLflow."""
    _quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="tlkit: %(message)s")
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)


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
@click.option("--experiment", default=None, help="MLflow experiment name  [default: $MLFLOW_EXPERIMENT_NAME or MLflow's]")
@click.option("--cache-dir", default=None, envvar="TLKIT_CACHE_DIR",
              help="frozen-feature cache folder  [default: $TLKIT_CACHE_DIR or ~/.cache/tlkit/features]")
@friendly_errors
def train_command(variant: str, experiment: str | None, cache_dir: str | None, **overrides) -> None:
    """Train VARIANT (a name from `tlkit variants`, or a .toml spec file) and log it to MLflow.

    Example: tlkit train conv_head --data /data/cifar10 --epochs 5
    """
    from tlkit import spec as specs

    spec = specs.load(variant, overrides)  # every check happens before data is loaded or a run is made
    from tlkit.train import train

    result = train(variant, spec, experiment=experiment, cache_dir=cache_dir)
    click.echo(f"run {result.run_id}: test_accuracy {result.test_accuracy:.4f}  model {result.model_uri}")


if __name__ == "__main__":
    main()
