"""Shared fixtures and helpers: tiny image folders, a throw-away tracking store and feature cache,
the CLI in-process, subprocesses and servers, and runs made by hand in a store.

Test modules import what they need from here (`from conftest import ...`), never from each other.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow draws a progress bar on stderr for every artifact download once tqdm is installed (ai-edge-litert,
# of the export extra, brings it), and CliRunner's output holds stderr too: tests read the commands' lines.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO = Path(__file__).resolve().parent.parent
# Subprocesses (the CLI, servers, workers) import tlkit from this checkout, whatever checkout an
# editable install points at (a second work tree of the same repository, say).
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
VGG16_WEIGHTS = SHARED_DATA / "vgg16-imagenet-notop.weights.h5"
CLASSES = ("circle", "square", "stripes")

# The quickest training that still runs every step: random weights, 2 epochs, small batches. The
# same settings as MLflow Project parameters (-P name=value) and as CLI options.
FAST_PARAMS = {"weights": "none", "epochs": "2", "batch_size": "8"}
FAST_ARGS = [word for name, value in FAST_PARAMS.items() for word in (f"--{name.replace('_', '-')}", value)]
DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


def draw(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A noisy picture whose class is visible: colour and shape differ per class."""
    image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
        image[mask] = (220, 40, 40)
    elif kind == "square":
        image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (40, 220, 40)
    else:
        image[(xx // 4) % 2 == 0] = (40, 40, 220)
    return image


def make_image_folder(root: Path, train_per_class: int = 12, test_per_class: int = 4, size: int = 32,
                      classes=CLASSES, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for kind in classes:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(draw(kind, rng, size)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("shapes"))


@contextlib.contextmanager
def using_tracking(uri: str, tmp_path: Path, monkeypatch):
    """Point MLflow (in-process and in subprocesses) at uri, cache in tmp_path; restore after."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # ./mlruns and ./mlartifacts land in tmp_path too
    # MLflow leaves a copy of the model in the system's temp folder at every load of a runs:/ or
    # models:/ URI without a dst_path (60 MB each, as `mlflow models serve` does): in tests, and in
    # the commands they start, those land in tmp_path. (tlkit's own loads clean up: test_registry.)
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path / "cache"))
    # MLFLOW_EXPERIMENT_ID is exported by mlflow.set_experiment: clear it, or subprocesses inherit it.
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An sqlite tracking store with MLflow's tables made, to copy: making them (MLflow's migrations)
    takes about a second, which every test of a fresh store paid."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh sqlite tracking store and feature cache; cwd in tmp so ./mlruns lands there too."""
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    with using_tracking(f"sqlite:///{tmp_path}/mlflow.db", tmp_path, monkeypatch) as uri:
        yield uri


@pytest.fixture(scope="session")
def cifar_sample(tmp_path_factory) -> Path:
    """A stratified CIFAR-10 sample as an image folder of the real JPEG files: the first 250 training
    and 100 test images of each class from ../shared/data (skips when it is absent)."""
    import shutil
    import subprocess

    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"{CIFAR_ARCHIVE} not present (the real CIFAR-10 JPEGs, ../shared/data/README.md)")
    scratch = tmp_path_factory.mktemp("cifar-archive")
    subprocess.run(["tar", "xzf", str(CIFAR_ARCHIVE), "-C", str(scratch)], check=True)
    sample = tmp_path_factory.mktemp("cifar-sample") / "cifar10"
    for split, per_class in (("train", 250), ("test", 100)):
        for class_dir in sorted((scratch / "cifar10" / split).iterdir()):
            target = sample / split / class_dir.name
            target.mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(path, target / path.name)
    shutil.rmtree(scratch, ignore_errors=True)  # 60,000 files: don't leave them in pytest's kept temp dirs
    return sample


def image_rows(images):
    """Pixel arrays as the logged model's input: one row of its `image` column per image
    (MLflow refuses a bare (N, H, W, C) array under the model's column signature: tlkit/serving.py)."""
    import pandas as pd

    return pd.DataFrame({"image": pd.Series(list(images), dtype=object)})  # object: an empty one too
# --- the CLI in-process ---------------------------------------------------------------------------

def cli(*args: str):
    """`tlkit ARGS` in-process; an exception the CLI does not turn into a message fails the test."""
    from click.testing import CliRunner

    from tlkit.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def invoke(*args: str):
    """`tlkit ARGS` in-process as a user runs it: errors end in an exit code and a message."""
    from click.testing import CliRunner

    from tlkit.cli import main

    return CliRunner().invoke(main, list(args))


def assert_clear(result, code: int, *pieces: str) -> None:
    """Exit `code`, the message pieces in the output, no traceback."""
    assert result.exit_code == code, result.output
    for piece in pieces:
        assert piece in result.output, result.output
    assert "Traceback" not in result.output, result.output


# --- subprocesses and servers --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; a child process must not inherit it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, **extra}


def wait_for(url: str, process: subprocess.Popen, seconds: float, log: Path) -> None:
    """Until url answers; fails with the end of `log` if the process exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url}: the process exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """End a process started with start_new_session=True, and everything it started."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Postgres:
    """A throw-away PostgreSQL cluster on a free 127.0.0.1 port with one database, `mlflow`; stop()
    and start() restart it on the same data. postgres refuses to run as root, so as root the cluster
    runs as the `postgres` OS user, in a folder of its own under /tmp (pytest's tmp folders are
    private to root)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="tlkit-pg-"))
        self.as_user = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.data = self.root / "data"
        subprocess.run(self.as_user + [str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                       "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        self.start()
        subprocess.run(self.as_user + [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                       "postgres", "mlflow"], check=True, capture_output=True)
        # SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3; psycopg2 is the driver installed.
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(self.as_user + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", *args], check=True,
                       capture_output=True)

    def start(self) -> None:
        # fsync off: a throw-away cluster need not survive a power cut.
        self._pg_ctl("-l", str(self.root / "server.log"), "-o",
                     f"-k {self.root} -h 127.0.0.1 -p {self.port} -c fsync=off -c full_page_writes=off", "start")

    def running(self) -> bool:
        return subprocess.run(self.as_user + [str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
                              capture_output=True).returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """fast: what a restart does (pg_ctl's default), clients disconnected; immediate: a crash."""
        self._pg_ctl("-m", mode, "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def small_filesystem(size: str):
    """A real filesystem of `size` (a tmpfs: "16k", "64k"), where a mount is allowed, else a skip:
    a disk that fills up, without filling this machine's."""
    folder = Path(tempfile.mkdtemp(prefix="tlkit-full-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        # --lazy: a failing test's traceback can still hold a file open there; detach all the same.
        subprocess.run(["umount", "--lazy", str(folder)], check=True)
        folder.rmdir()


def postgres_bindir() -> Path | None:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL cluster (Postgres); skips where there is none to start."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL here (initdb)")
    cluster = Postgres(bindir)
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def postgres_uri(request):
    """$TLKIT_TEST_POSTGRES_URI, else a private cluster's (the `postgres` fixture)."""
    if os.environ.get("TLKIT_TEST_POSTGRES_URI"):
        return os.environ["TLKIT_TEST_POSTGRES_URI"]
    return request.getfixturevalue("postgres").uri


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    """`mlflow server` on backend_uri, serving its artifacts from `artifacts`, on 127.0.0.1:port (its own
    process group: stop() ends it), once it answers /health; its output appended to `log`."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    # The GenAI job runner (seven huey consumers) is of no use here.
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log, "a") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, 120, log)
    except BaseException:
        stop(server)
        raise
    return server


@pytest.fixture(scope="module")
def mlflow_server(postgres_uri, tmp_path_factory):
    """`mlflow server` on PostgreSQL, serving its artifacts from a tmp folder: its URL."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    server = start_mlflow_server(postgres_uri, root / "artifacts", port, root / "server.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


# --- runs made by hand, as train.py leaves them ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_network():
    """A network of raw 32x32 pixels that reads colour: the class is the image's dominant channel
    (red: circle, green: square, blue: stripes, as `draw` paints them). Deterministic weights."""
    import keras

    pixels = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(pixels))
    dense = keras.layers.Dense(len(CLASSES), activation="softmax")
    network = keras.Model(pixels, dense(x))
    dense.set_weights([8 * np.eye(3, len(CLASSES), dtype="float32"), np.zeros(len(CLASSES), "float32")])
    return network


def make_run(network, accuracy: float, *, digest: str = DIGEST_A, status: str = "FINISHED", model: bool = True,
             variant: str = "v", experiment: str = "Default", tags: dict | None = None) -> str:
    """A variant run as train.py leaves it: tags, test_accuracy, and (unless model=False) the model.
    `tags` adds to them (a suite's child: mlflow.parentRunId or suite)."""
    import mlflow

    from tlkit import spec as specs, tracking

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=variant) as run:
        mlflow.set_tags({"variant": variant, "base": "VGG16", "dataset": "shapes", "dataset_digest": digest,
                         **(tags or {})})
        mlflow.log_metrics({"test_accuracy": accuracy, "epochs_run": 2})
        for step, value in enumerate((accuracy / 2, accuracy)):
            mlflow.log_metric("val_accuracy", value, step=step)
        if model:
            example = np.zeros((1, 32, 32, 3), np.uint8)
            tracking.log_model(network, list(CLASSES), example, specs.DEFAULTS)
        mlflow.end_run(status)
    return run.info.run_id


def versions(name: str) -> list:
    """The registered model's versions, oldest first."""
    import mlflow

    return sorted(mlflow.MlflowClient().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def all_runs(uri: str | None = None) -> list:
    import mlflow

    if uri is None:
        return mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = mlflow.MlflowClient(tracking_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def no_registered_models(uri: str | None = None) -> bool:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri).search_registered_models() == []


def no_features(cache: Path) -> bool:
    """Nothing computed: the cache folder is absent, or empty (train checks that it can write there)."""
    return not cache.exists() or not any(cache.iterdir())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) with ../shared/data present, a real-data test that skips (its skip names a
    file of ../shared/data) fails instead: a CI run must not go green without them."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("CI", "").strip().lower() == "true" and SHARED_DATA.is_dir()):
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if str(SHARED_DATA) in reason:
        report.outcome = "failed"
        report.longrepr = f"CI=true and {SHARED_DATA} is present, yet this real-data test skipped: {reason}"
