"""How a `tlkit` command fails: the one table of known errors and the decorator that turns them into
one line on stderr and an exit code (2 for bad input, 1 for a failure while running, 130 when
interrupted); --debug shows the traceback instead.

The table's modules are imported when a command runs, not at start: they bring TensorFlow and
MLflow, which `tlkit --help` must not load (tlkit/cli.py).
"""

from __future__ import annotations

import functools
import sys

import click

from tlkit.messages import first_line


def terminate_as_interrupt(signum, frame):
    """SIGTERM's handler (tlkit/cli.py sets it)."""
    # SIGTERM (a scheduler, `kill`) ends the run like Ctrl-C: marked KILLED, nothing registered.
    raise KeyboardInterrupt(f"signal {signum}")


def _known_errors() -> tuple[tuple, tuple]:
    """The one table of known failures: (bad input: exit 2, failures while running: exit 1)."""
    from tlkit.budget import BudgetError
    from tlkit.cluster import ClusterError
    from tlkit.data import DataError
    from tlkit.features import FeatureCacheError
    from tlkit.models import ModelError
    from tlkit.recipe import RecipeError
    from tlkit.registry import RegistryError
    from tlkit.spec import SpecError
    from tlkit.tracking import TrackingError
    from tlkit.tune import TuneError

    usage = (SpecError, DataError, ModelError, RegistryError, BudgetError)
    # OSError: a file that cannot be written (pretrain's weights, a full disk), said in one line.
    running = (TrackingError, FeatureCacheError, TuneError, RecipeError, ClusterError, OSError)
    return usage, running


def friendly_errors(command):
    """Known failures become one line and an exit code; --debug shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        usage_errors, runtime_errors = _known_errors()
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
            raise click.ClickException(first_line(err)) from None
        except Exception as err:
            # Any other MLflow failure while running (the registry, the store): one line, exit 1.
            from mlflow.exceptions import MlflowException

            if debug or not isinstance(err, MlflowException):
                raise
            raise click.ClickException(f"MLflow: {first_line(err, 300)}") from None
        except KeyboardInterrupt:
            click.echo("tlkit: interrupted; the run is marked KILLED", err=True)
            sys.exit(130)

    return wrapper
