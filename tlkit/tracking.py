"""Everything that talks to MLflow: experiment, runs, autologging, datasets, reports, the model.

The tracking URI follows MLflow's own rules (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db);
the experiment is --experiment, else MLFLOW_EXPERIMENT_NAME, else MLflow's default. Under
`mlflow run`, MLFLOW_RUN_ID names the run that the project created, and we log into it.

A tracking server that restarts while runs log (docs/tracking.md: "Nothing lost when the tracking server
restarts") is ridden out by MLflow's own client: every request it sends is retried on a refused
or broken connection and on 408/429/500/502/503/504 (mlflow/utils/request_utils.py), with the
defaults MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2: urllib3 waits
0, 4, 8, 16, 32, 64 and 120 s (its cap) between the 8 tries, so a request gives up only after
about 244 s of outage (measured against a closed port: 247 s). The server answers 503 while its
database is down and re-checks pooled database connections before use (pool_pre_ping), so a
restarted PostgreSQL is ridden out the same way. tlkit changes none of these; it adds two things:
the fail-fast reachability check is made only before a run starts (check_reachable), and a batch
that MLflow logs in the background and drops past the retries fails its run instead of going
missing (run, DroppedBatches).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tlkit import distribute, models, stats
from tlkit.messages import first_line
from tlkit.serving import COLUMN

SERVING_CODE = Path(__file__).resolve().parent / "serving.py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class TrackingError(RuntimeError):
    """The tracking server cannot be used: one line naming the URI."""


def use_experiment(name: str | None) -> None:
    import mlflow

    if name:
        # set_experiment asks the server, whose client retries a refused connection for minutes
        # (measured: over 2 min against a closed port); the check answers at once.
        check_reachable()
        mlflow.set_experiment(name)


def check_reachable() -> str:
    """Fail now, not after an hour of training, when the tracking store cannot be used.

    Only before a run starts: inside one (a suite's child, a search inside a suite) the store
    answered already, and a server that is restarting is for MLflow's retries to wait out; failing
    fast there would fail the child."""
    import urllib.error
    import urllib.request

    import mlflow

    uri = mlflow.get_tracking_uri()
    if mlflow.active_run() is not None:
        return uri
    if uri.startswith(("http://", "https://")):
        # MLflow's client retries a refused connection for minutes; one plain request answers at once.
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10)
        except urllib.error.HTTPError:
            pass  # it answers; whether it lets us in is the API call's to say
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"tracking server {uri} is not reachable: {reason}") from None
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with store_creation_lock(uri):
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means the same thing to the user
        text = str(err)
        if "401" in text or "403" in text:
            raise TrackingError(f"tracking server {uri} refused the credentials "
                                "(check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)") from None
        detail = first_line(err, 200)
        raise TrackingError(f"tracking server {uri} is not usable: {detail}") from None
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous
    return uri


# The PostgreSQL advisory lock's key: any fixed 64-bit number that other software on the database is
# unlikely to take; int.from_bytes(b"tlkit-db", "big") >> 1.
POSTGRES_LOCK_KEY = 0x746C6B69742D6462 >> 1


@contextlib.contextmanager
def store_creation_lock(uri: str):
    """Serialise MLflow's creation of a new store's tables across processes: SQLite and PostgreSQL.

    The first client of a new database creates its tables (SqlAlchemyStore.__init__ runs every
    alembic migration, then makes the Default experiment). Two processes starting together both
    found no tables and both migrated, and the second failed: on SQLite "duplicate column name:
    step" (or "Online migration expected to match one row", or a locked database), on PostgreSQL a
    UniqueViolation. So the first touch of the store (check_reachable) holds a lock while MLflow
    creates them; the other process waits, then finds them made. SQLite: an exclusive flock on
    `<store>.lock`, an empty file left beside the database (one machine's processes, which is
    what SQLite is shared by). PostgreSQL: a session advisory lock (pg_advisory_lock), across
    machines. A tracking server creates its tables once at its own start: http(s) needs no lock.
    Other databases (MySQL, MSSQL) are left as they are."""
    path = _sqlite_path(uri)
    if path is not None:
        import fcntl

        lock = Path(f"{path}.lock")
        try:
            handle = open(lock, "a")
        except OSError as err:
            raise TrackingError(f"cannot create its lock file {lock}: {err.strerror}") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another process creates the tables
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif uri.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": POSTGRES_LOCK_KEY})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": POSTGRES_LOCK_KEY})
        finally:
            engine.dispose()
    else:
        yield


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, None for any other store (or an in-memory database)."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri.split("://", 1)[-1].split("?", 1)[0]
    if not path or path in ("/", "/:memory:") or path.startswith("/file:"):
        return None
    return Path(path[1:]) if path.startswith("/") else Path(path)


def experiment_id() -> str:
    """The experiment new runs go to (set_experiment's, MLFLOW_EXPERIMENT_ID / _NAME's, or Default).

    Private: MLflow has no public call that answers this before a run starts (its fluent API
    resolves it internally in start_run). The one use of it in tlkit; guarded by
    tests/test_private_apis.py, mlflow bounded below 3.18 in pyproject.toml."""
    from mlflow.tracking import fluent

    return fluent._get_experiment_id()


def log_params_once(params: dict) -> None:
    """Log params into the active run, less those it has already. Under `mlflow run` the project
    logged the parameters it was given, as typed ("1e-3"), and MLflow refuses to change a param."""
    import mlflow

    given = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in given})


class DroppedBatches(logging.Handler):
    """What MLflow logged in the background and dropped, per run id.

    Autologging sends the per-epoch metrics (and early stopping's outcome) through MLflow's
    asynchronous queue (mlflow/utils/async_logging/async_logging_queue.py). A batch that still fails
    after the client's retries is dropped: the queue reports it only as an ERROR on its logger,
    "Run Id <id>: Failed to log run data: ...", which autolog(silent=True) keeps off the console,
    and training goes on. Measured: with the retries off, a 3 s PostgreSQL restart left a child
    FINISHED with 554 of its 600 epochs and the suite exiting 0. run() fails such a run instead.
    The logger and its message are MLflow's, not an API: tests/test_private_apis.py guards them."""

    LOGGER = "mlflow.utils.async_logging.async_logging_queue"

    def __init__(self):
        super().__init__(logging.ERROR)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.reports.append(record.getMessage())

    def of(self, run_id: str) -> list[str]:
        return [report for report in self.reports if run_id in report]


dropped = DroppedBatches()


def watch_background_logging() -> None:
    """Collect MLflow's reports of dropped background batches (DroppedBatches); once per process."""
    logger = logging.getLogger(DroppedBatches.LOGGER)
    if dropped not in logger.handlers:
        logger.addHandler(dropped)


def check_nothing_dropped(run_id: str) -> None:
    """Raise TrackingError if MLflow dropped a batch it was logging in the background for run_id."""
    import mlflow

    mlflow.flush_async_logging()  # what is still queued is sent, or dropped, now (a no-op when idle)
    reports = dropped.of(run_id)
    if reports:
        detail = " ".join(reports[0].split("Failed to log run data:", 1)[-1].split()).removeprefix("Exception: ")
        if len(detail) > 240:  # MLflow's cause comes last: "... (Caused by ResponseError('too many 503 ...'))"
            detail = f"{detail[:110].rstrip()} ... {detail[-120:].lstrip()}"
        raise TrackingError(f"{len(reports)} batch(es) of values logged in the background (autologging's per-epoch "
                            f"metrics) did not reach the tracking store {mlflow.get_tracking_uri()} for run {run_id}, "
                            f"after MLflow's retries: {detail}")


def autolog() -> None:
    import mlflow

    # Autolog sends per-epoch metrics through MLflow's async queue, whose thread waits on
    # queue.get(timeout=1) before it looks at the stop flag: every end of a fit waited up to 1 s
    # (0.9 s a trial in a profiled search). With buffering it waits on the stop flag instead, and
    # sends what came in during the second as one batch.
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
    # Our own model (the end-to-end network) and dataset are logged explicitly; autolog's would be
    # the head alone and the cached features. No per-epoch checkpoint of the whole base either.
    mlflow.tensorflow.autolog(log_models=False, log_datasets=False, checkpoint=False, silent=True)


@contextlib.contextmanager
def run(run_name: str, nested: bool = False, tags: dict | None = None, *, run_id: str | None = None,
        parent_run_id: str | None = None):
    """A run that always ends: FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM.

    run_id reopens an existing run (a resumed search's parent). parent_run_id nests a new run under a
    run of another process (a keras-tuner worker's trial under the chief's search), in its experiment.
    """
    import mlflow

    if run_id is None and not nested and mlflow.active_run() is None:
        # Under `mlflow run` the project made our run. Consume the variable: MLflow would otherwise take
        # it for the next nested run too, and reopen this run instead of nesting a new one.
        run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    from mlflow.exceptions import MlflowException

    target = None
    try:
        if run_id:
            active = mlflow.start_run(run_id=run_id, nested=nested, tags=tags)
        else:
            target = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id if parent_run_id else None
            active = mlflow.start_run(run_name=run_name, nested=nested, tags=tags, parent_run_id=parent_run_id,
                                      experiment_id=target)
    except MlflowException as err:
        # A basic-auth server lets a new user read, not write, experiments it did not create (Default too).
        if err.error_code != "PERMISSION_DENIED" and "error code 403" not in str(err):
            raise
        target = target or experiment_id()
        try:
            experiment = repr(mlflow.get_experiment(target).name)
        except MlflowException:
            experiment = target
        raise TrackingError(f"tracking server {mlflow.get_tracking_uri()} does not let "
                            f"{os.environ.get('MLFLOW_TRACKING_USERNAME', 'this user')} write to experiment "
                            f"{experiment}: pass --experiment NAME (a new one is yours), or ask its owner "
                            "for EDIT permission") from None
    if not nested and parent_run_id is None:
        mark_training_experiment(active.info.experiment_id)
    watch_background_logging()
    try:
        yield active
        check_nothing_dropped(active.info.run_id)
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if not nested and parent_run_id is None:
            _announce_ui(active)


# What MLflow 3.17.2's UI shows, read from its JS bundle (mlflow/server/js/build) and checked in
# headless Chromium from a fresh profile (tests/test_ui.py):
# - an experiment's bare link, #/experiments/<id>, opens MLflow's GenAI overview unless the browser
#   remembers a click on "Model training" (localStorage); the URL parameter
#   workflowType=machine_learning opens the training runs whatever the browser remembers. The
#   experiment kind tag below is not read by 3.17.2's UI (its workflow navigation is hard-coded on,
#   mlflow/mlflow#24498); it is set for the MLflow versions that do read it.
# - the runs table's default columns are Source, Models and Dataset, and a user's choice of columns
#   is kept in the browser. A saved view is the one place an experiment carries columns: the tag
#   mlflow.sharedViewState.<key> holds the view's JSON (the runs table's search facets and UI state,
#   by the names in the bundle), applied when the link says viewStateShareKey=<key>.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
UI_VIEW_KEY = "tlkit-runs"
UI_VIEW_TAG = f"mlflow.sharedViewState.{UI_VIEW_KEY}"
_UI_COLUMNS = ["metrics.`test_accuracy`", "metrics.`val_accuracy_final`", "attributes.`Models`"]
UI_VIEW = json.dumps({"orderByKey": "metrics.`test_accuracy`", "orderByAsc": False,
                      "selectedColumns": _UI_COLUMNS, "columnOrder": _UI_COLUMNS,
                      "columnWidths": {"metrics.`test_accuracy`": 150, "metrics.`val_accuracy_final`": 170}})
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def mark_training_experiment(experiment_id: str) -> None:
    """Tag the experiment as one of model training (unless it says what it is already), with the
    runs view that ui_link opens: best test_accuracy first, that column shown."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        tags = client.get_experiment(experiment_id).tags
        if EXPERIMENT_KIND_TAG not in tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        if tags.get(UI_VIEW_TAG) != UI_VIEW:
            client.set_experiment_tag(experiment_id, UI_VIEW_TAG, UI_VIEW)
    except MlflowException as err:  # a user who may log runs but not edit the experiment: the UI only
        logging.getLogger(__name__).debug("experiment %s not tagged: %s", experiment_id, err)


def ui_link(experiment_id: str, tracking_uri: str | None = None) -> str:
    """The experiment's training runs in MLflow's UI, as a user's browser opens them (see above),
    and, for a store that is not a server, the command that serves that UI."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={UI_VIEW_KEY}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"{LOCAL_UI}/{page} (after `mlflow ui --backend-store-uri {uri}`)"


def _announce_ui(run) -> None:
    logging.getLogger(__name__).info("runs in MLflow's UI: %s", ui_link(run.info.experiment_id))


def run_tags(spec: dict, dataset, **extra: str) -> dict:
    """A training run's tags: `extra`, then its base, data set and digest, and the strategy it ran
    under (with the count of unreadable images skipped, when there were any)."""
    tags = {**extra, "base": spec["base"], "dataset": dataset.name, "dataset_digest": dataset.digest,
            **distribute.tags()}
    if dataset.skipped_files:  # unreadable images, skipped with a warning: the run says how many
        tags["skipped_files"] = str(len(dataset.skipped_files))
    return tags


def log_run_preamble(spec: dict, dataset, tags: dict, spec_file: str | os.PathLike | None = None) -> None:
    """What a training run (train, pretrain) logs first: its tags, the spec as params and as
    spec.json, the variant file under spec/ when there is one, and the data set's three splits as
    MLflow inputs."""
    import mlflow

    mlflow.set_tags(tags)
    log_params_once(spec)
    mlflow.log_dict(spec, "spec.json")
    if spec_file is not None:
        mlflow.log_artifact(str(spec_file), "spec")
    log_dataset(dataset)


def log_dataset(dataset) -> None:
    import mlflow

    source = CIFAR10_URL if dataset.name == "cifar10" and not Path(dataset.source).exists() else dataset.source
    for context, x, y in (("train", dataset.x_train, dataset.y_train), ("validation", dataset.x_val, dataset.y_val),
                          ("test", dataset.x_test, dataset.y_test)):
        # One name per split: MLflow keeps a single input per (name, digest), and the three share a digest.
        with warnings.catch_warnings():  # MLflow registers two local sources and warns that it picks one
            warnings.simplefilter("ignore", UserWarning)
            name, digest = f"{dataset.name}-{context}", dataset.digest[:32]  # MLflow caps digests at 36 characters
            ds = x.as_mlflow_dataset(y.argmax(axis=1), source=source, name=name, digest=digest)
            # (A file list's integer labels make MLflow hint, once per split, at missing values it cannot have.)
            _log_input(ds, context=context, tags={"images": str(len(x)), "class_names": ",".join(dataset.class_names)})


def _log_input(ds, **options) -> None:
    """mlflow.log_input, once more after a duplicate-key error: MLflow 3.17.2's SQL store looks the
    dataset up and then inserts it, so two processes logging the same data set at the same moment
    can both miss it, and the second insert violates the datasets' primary key (seen on PostgreSQL
    with two suites on one new database: UniqueViolation "dataset_pk"). The second try finds it."""
    import mlflow

    for attempt in range(2):
        try:
            mlflow.log_input(ds, **options)
            return
        except Exception as err:  # noqa: BLE001 - MlflowException or the store's IntegrityError, by its message
            text = str(err)
            if attempt or not any(word in text for word in ("UniqueViolation", "UNIQUE constraint", "duplicate key",
                                                            "dataset_pk")):
                raise
            logging.getLogger(__name__).info("tracking: another process logged data set %s at the same moment; "
                                             "once more", ds.name)


def log_reports(folder: Path) -> None:
    import mlflow

    mlflow.log_artifacts(str(folder), "reports")


def load_predictions(run_id: str):
    """The run's per-image test predictions (stats.Predictions), or None for a run logged without
    them (before tlkit logged them, or one that never reached its test)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=stats.PREDICTIONS_ARTIFACT,
                                                       dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return stats.read_predictions(Path(path).read_bytes())


# What the logged model takes (its signature names no input schema: serving.py), in its metadata.
INPUT_FORMS = ("a uint8 (N, H, W, 3) array of images; or an `image` column of image files' bytes (base64 text in "
               "JSON: dataframe_records, dataframe_split or inputs) or of (H, W, C) pixel arrays; any size")


def log_model(network, class_names, example: np.ndarray, spec: dict):
    """Log the end-to-end network as the pyfunc in serving.py; returns MLflow's ModelInfo.

    example: a few uint8 (H, W, 3) images, logged as the input example in the form a request takes
    (PNG files' bytes in the `image` column; lossless, so the model sees these very pixels)."""
    import importlib.metadata as md

    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    # Outputs only: an input schema would make MLflow refuse a bare (N, H, W, 3) array before the
    # model sees it, and no schema takes both it and the column of files (serving.py says why).
    signature = ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"),
                        ColSpec(Array(DataType.double), "probabilities")]),
    )
    requirements = [f"{name}=={md.version(name)}" for name in ("mlflow", "tensorflow", "keras", "pillow",
                                                                "numpy", "pandas")]
    # Saved compiled for evaluation, not as anything trained: a training compile would write the
    # optimizer into model.keras (tlkit's fused Adam, which a plain `keras.saving.load_model` cannot
    # find) with its slot variables (twice the size of the trained weights). The models inside it
    # were never compiled: training compiles a view of them (fastpath.compiled).
    models.compile_for_evaluation(network)
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        network.save(keras_path)
        names_path = Path(tmp) / "class_names.json"
        names_path.write_text(json.dumps(list(class_names)))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SERVING_CODE),
            artifacts={"keras_model": str(keras_path), "class_names": str(names_path)},
            signature=signature,
            input_example=pd.DataFrame({COLUMN: [_png(image) for image in np.asarray(example, np.uint8)]}),
            pip_requirements=requirements,  # stated, so MLflow need not load the model to infer them
            metadata={"class_names": list(class_names), "image_size": spec["image_size"], "base": spec["base"],
                      "input": INPUT_FORMS},
        )


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
