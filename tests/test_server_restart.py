"""A tracking server that restarts while a suite trains costs no metric, parameter or artifact.

End to end: a real `mlflow server` on a private PostgreSQL cluster, a real `tlkit suite` in a
subprocess. While the first child trains, the server is stopped (SIGTERM) and started again on
the same port, database and artifact root, unreachable for at least 10 s; while the second child
trains, PostgreSQL itself is restarted under the running server, down 10 s. What rides both out is MLflow's client,
its retries (tlkit/tracking.py says which, and with what budget). Past the retries a run fails,
in one line, instead of finishing with holes in its history.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import clean_env, free_port, start_mlflow_server, stop, using_tracking
from tlkit import spec as specs, tracking as tlkit_tracking
from tlkit.tracking import TrackingError

EPOCHS = 100  # 1.5-15 s of training a child here (15-150 ms an epoch): the outage begins after its first
DOWN_S = 10  # the server unreachable (from its stop to answering again), then the database down
PER_EPOCH = ("loss", "accuracy", "val_loss", "val_accuracy")  # autologged at step = epoch
PER_VALIDATION = ("validation_loss", "validation_accuracy")  # autologged once a validation pass, at step 0


class Server:
    """`mlflow server` on 127.0.0.1 that can be stopped and started again on its port, database and
    artifact root."""

    def __init__(self, backend_uri: str, root: Path):
        self.backend_uri, self.root, self.port = backend_uri, root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        began = time.monotonic()
        self.process = start_mlflow_server(self.backend_uri, self.root / "artifacts", self.port, self.log)
        self.startup_s = time.monotonic() - began  # 12-15 s here: most of a restart's outage

    def stop(self) -> None:
        """SIGTERM, and wait until it has exited (uvicorn ends the requests it is serving first)."""
        stop(self.process)
        self.process = None

    def ensure_up(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    up = Server(postgres.uri, tmp_path_factory.mktemp("restarting-server"))
    up.start()
    try:
        yield up
    finally:
        if up.process is not None:
            stop(up.process)


@pytest.fixture
def on_server(server, postgres, tmp_path, monkeypatch):
    if not postgres.running():  # an earlier test failed while it was down
        postgres.start()
    server.ensure_up()
    with using_tracking(server.url, tmp_path, monkeypatch):
        yield server


def tlkit_process(args: list[str], server: Server, tmp_path: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "tlkit.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "tlkit.cli", *args], cwd=tmp_path, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env=clean_env(MLFLOW_TRACKING_URI=server.url,
                                                 TLKIT_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
                                                 **env))
    return process, log


def second_epoch_begun(child: int, process: subprocess.Popen, log: Path) -> None:
    """Wait until the child-th fit in `log` (1: the first) has finished its first epoch: Keras prints
    "Epoch 2/N" as the second begins (the metrics reach the server up to 1 s later, batched)."""
    deadline = time.monotonic() + 240
    while log.read_text().count("Epoch 2/") < child:
        assert process.poll() is None, f"exited {process.returncode} early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"fit {child} did not train in 240 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def assert_whole(run, options: dict, outage_began: float) -> None:
    """Every epoch of every autologged curve, the whole spec as params, the scores, reports,
    predictions, model; and training went on while the server or database was down (so the outage
    was in it). options: what the command line gave."""
    client = mlflow.MlflowClient()
    run_id = run.info.run_id
    epochs = options["epochs"]
    assert run.info.status == "FINISHED", run.data.tags.get("error")
    assert run.data.metrics["epochs_run"] == epochs
    for key in PER_EPOCH:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(epochs)), (key, len(history))
    for key in PER_VALIDATION:
        assert len(client.get_metric_history(run_id, key)) == epochs, key
    last_epoch = max(m.timestamp for m in client.get_metric_history(run_id, "loss")) / 1000
    assert last_epoch > outage_began, "training ended before the outage: raise EPOCHS"
    assert {"test_accuracy", "test_loss", "val_accuracy_final", "test_f1_circle"} <= set(run.data.metrics)
    spec = specs.load(run.data.tags["variant"], options)
    assert {k: v for k, v in run.data.params.items() if k in spec} == {k: str(v) for k, v in spec.items()}
    assert "opt_learning_rate" in run.data.params  # autolog's, logged as the fit began
    files = {a.path for folder in ("", "reports", "predictions") for a in client.list_artifacts(run_id, folder)}
    assert {"spec.json", "model_summary.txt", "reports/confusion_matrix.png", "reports/classification_report.json",
            "reports/training_curves.png", "predictions/test_predictions.npz"} <= files, files
    assert "python_function" in mlflow.models.get_model_info(f"runs:/{run_id}/model").flavors


@pytest.mark.e2e
def test_a_server_restart_and_a_database_restart_while_a_suite_trains_lose_nothing(on_server, postgres, image_folder,
                                                                                    tmp_path):
    server = on_server
    options = {"data": str(image_folder), "weights": "none", "batch_size": 8, "epochs": EPOCHS, "patience": 0}
    args = [word for name, value in options.items() for word in (specs.flag(name), str(value))]
    process, log = tlkit_process(["suite", "--variants", "baseline,dropout", *args, "--experiment", "restart"], server,
                                 tmp_path)
    try:
        # 1. The server: stopped after the first child's first epoch, started again, unreachable >= 10 s.
        second_epoch_begun(1, process, log)
        server_down = time.time()
        server.stop()
        time.sleep(max(0.0, DOWN_S - server.startup_s - (time.time() - server_down)))
        server.start()
        server_back = time.time()
        # 2. The database: restarted (pg_ctl stop -m fast, start) under the running server.
        second_epoch_begun(2, process, log)
        database_down = time.time()
        postgres.stop()
        time.sleep(DOWN_S)
        postgres.start()
        database_back = time.time()
        code = process.wait(timeout=300)
    finally:
        stop(process)
    output = log.read_text()
    print(f"server unreachable {server_back - server_down:.1f} s, database down {database_back - database_down:.1f} s")
    assert code == 0 and "Traceback" not in output, output[-4000:]
    # The outage reached the background logging of the first child's epochs, which retried.
    assert "Connection refused" in output and "/runs/log-batch" in output, output[-4000:]

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("restart").experiment_id
    [parent] = client.search_runs([experiment], "tags.mlflow.runName = 'suite'")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    assert [c.data.tags["variant"] for c in children] == ["baseline", "dropout"]
    assert_whole(children[0], options, server_down)
    assert_whole(children[1], options, database_down)

    # The parent: compared, the best promoted, as without an outage.
    assert parent.info.status == "FINISHED"
    assert parent.data.params["variants"] == "baseline,dropout"
    best = max(children, key=lambda c: (c.data.metrics["test_accuracy"], -c.info.start_time))
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_test_accuracy"] == best.data.metrics["test_accuracy"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} == {
        f"comparison/{name}" for name in ("comparison.txt", "comparison.csv", "comparison.json", "test_accuracy.png")}
    champion = client.get_model_version_by_alias(parent.data.tags["registered_model"], "champion")
    assert champion.run_id == best.info.run_id and champion.version == parent.data.tags["champion_version"]


@pytest.mark.e2e
def test_past_the_retries_the_run_fails_in_one_line_instead_of_losing_epochs(on_server, postgres, image_folder,
                                                                              tmp_path):
    """No retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0): a database restart of a few seconds
    mid-training drops the background batches of those seconds' epochs. Before, the run ended
    FINISHED without them."""
    server = on_server
    process, log = tlkit_process(["train", "baseline", "--data", str(image_folder), "--weights", "none",
                                  "--batch-size", "8", "--epochs", "300", "--patience", "0", "--experiment", "budget"],
                                 server, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    try:
        second_epoch_begun(1, process, log)
        postgres.stop()
        # Down until training has gone on for 10 epochs and 3 s: the background queue sends a batch
        # about once a second, so a shorter outage (or one while the machine starves the run) can
        # fall between two sends and drop nothing.
        epochs, down_since = log.read_text().count("Epoch "), time.monotonic()
        while log.read_text().count("Epoch ") < epochs + 10 or time.monotonic() - down_since < 3:
            assert process.poll() is None and time.monotonic() - down_since < 60, log.read_text()[-3000:]
            time.sleep(0.1)
        postgres.start()  # while it trains on: what fails is the background logging, not a call after it
        code = process.wait(timeout=300)
    finally:
        stop(process)
    output = log.read_text()
    assert code == 1 and "Traceback" not in output, output[-4000:]
    [run] = mlflow.search_runs(experiment_names=["budget"], output_format="list")
    last = output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "background" in last and run.info.run_id in last, last
    assert run.info.status == "FAILED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")) < 300


# --- the rules, on a local store ---------------------------------------------------------------------

def test_a_run_whose_background_batch_was_dropped_fails(tracking):
    from mlflow.entities import Metric

    with pytest.raises(TrackingError, match=r"1 batch\(es\) of values logged in the background .* for run "):
        with tlkit_tracking.run("dropped") as active:
            # A metric name the store refuses (over 250 characters): the batch fails in the background.
            mlflow.MlflowClient().log_batch(active.info.run_id, metrics=[Metric("k" * 300, 1.0, 0, 0)],
                                            synchronous=False)
    assert mlflow.get_run(active.info.run_id).info.status == "FAILED"


def test_inside_a_run_the_reachability_check_leaves_an_outage_to_the_retries(tracking):
    closed = f"http://127.0.0.1:{free_port()}"
    with mlflow.start_run():
        mlflow.set_tracking_uri(closed)  # as if the server went down between two of a suite's children
        started = time.monotonic()
        assert tlkit_tracking.check_reachable() == closed
        assert time.monotonic() - started < 1
        mlflow.set_tracking_uri(tracking)
    mlflow.set_tracking_uri(closed)
    with pytest.raises(TrackingError, match="is not reachable"):
        tlkit_tracking.check_reachable()  # before a run: at once
