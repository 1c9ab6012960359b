"""Two users on one store and one feature cache: two `tlkit suite` processes started together on a
tracking store that does not exist yet (SQLite), or on a new PostgreSQL database behind one
`mlflow server`, sharing one cache folder.

Not the `tracking` fixture: it copies a store migrated already, which hides the race of two
processes creating MLflow's tables at once (issue 26: "Online migration expected to match one row").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import FAST_ARGS, clean_env, free_port, start_mlflow_server, stop

from tlkit import features

VARIANTS = ["baseline", "conv_head"]


def two_suites(uri: str, data: Path, cache: Path, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Two `tlkit suite` runs started together on uri and cache; both waited for."""
    command = [sys.executable, "-m", "tlkit.cli", "suite", "--variants", ",".join(VARIANTS), "--data", str(data),
               *FAST_ARGS]
    env = clean_env(MLFLOW_TRACKING_URI=uri, TLKIT_CACHE_DIR=str(cache))
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    done = []
    for process in processes:
        out, err = process.communicate(timeout=500)
        done.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return done


def check_both_finished(done, uri: str, cache: Path) -> None:
    for result in done:
        assert result.returncode == 0, result.stderr[-3000:]
        for error in ("database is locked", "alembic", "migration", "Traceback"):
            assert error not in result.stderr, result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    suites = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(suites) == 2 and len(children) == 2 * len(VARIANTS), [r.info.run_name for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for child in children:
        metrics = child.data.metrics
        assert {"test_accuracy", "test_loss", "epochs_run"} <= set(metrics), metrics
        epochs = int(metrics["epochs_run"])
        for name in ("loss", "accuracy", "val_loss", "val_accuracy"):  # autologging's, one a epoch
            assert len(client.get_metric_history(child.info.run_id, name)) == epochs, (child.info.run_name, name)
    ready = {m.source_run_id for m in client.search_logged_models([e.experiment_id for e in client.search_experiments()])
             if m.name == "model" and str(m.status).endswith("READY")}
    assert {c.info.run_id for c in children} <= ready  # every child's model logged
    # Both suites' frozen variants used one entry: one folder per key, each verifying its checksums.
    keys = {c.data.tags["feature_cache_key"] for c in children if c.data.tags.get("feature_cache_key")}
    assert keys and sorted(p.name for p in cache.iterdir()) == sorted(keys)
    assert all(features.FeatureCache(cache).read(key) is not None for key in keys)
    # @champion exists once: whichever suite promoted last, its decision is one of the two.
    assert any("@champion" in result.stdout for result in done)


@pytest.mark.e2e
def test_two_suites_on_a_new_sqlite_store_and_one_cache_both_finish(image_folder, tmp_path):
    store = tmp_path / "team" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    done = two_suites(uri, image_folder, tmp_path / "cache", tmp_path)
    check_both_finished(done, uri, tmp_path / "cache")


@pytest.mark.e2e
def test_two_suites_on_a_server_with_a_new_postgres_database_both_finish(postgres, image_folder, tmp_path):
    database = f"team_{free_port()}"  # a database of its own: the module's server fixture made tables in `mlflow`
    subprocess.run(postgres.as_user + [str(postgres.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(postgres.port),
                                       "-U", "postgres", database], check=True, capture_output=True)
    backend = postgres.uri.rsplit("/", 1)[0] + f"/{database}"
    port = free_port()
    server = start_mlflow_server(backend, tmp_path / "artifacts", port, tmp_path / "server.log")
    try:
        uri = f"http://127.0.0.1:{port}"
        done = two_suites(uri, image_folder, tmp_path / "cache", tmp_path)
        check_both_finished(done, uri, tmp_path / "cache")
    finally:
        stop(server)


@pytest.mark.e2e
def test_two_suites_straight_on_a_new_postgres_database_both_finish(postgres, image_folder, tmp_path):
    # No server between: each process's MLflow client creates the tables itself, as on SQLite.
    database = f"direct_{free_port()}"
    subprocess.run(postgres.as_user + [str(postgres.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(postgres.port),
                                       "-U", "postgres", database], check=True, capture_output=True)
    uri = postgres.uri.rsplit("/", 1)[0] + f"/{database}"
    done = two_suites(uri, image_folder, tmp_path / "cache", tmp_path)
    check_both_finished(done, uri, tmp_path / "cache")


def test_a_data_set_logged_by_another_process_at_the_same_moment_is_logged_once_more(tracking, monkeypatch):
    """MLflow's SQL store looks a data set up, then inserts it: two processes at the same moment can
    both miss it, and one insert fails on the primary key (seen once on PostgreSQL). The
    duplicate-key failure is injected here (a race cannot be timed in a test); the second try logs
    it; any other failure, or a second one, is the user's to see."""
    import numpy as np

    from tlkit import tracking

    real = mlflow.log_input
    calls = []

    def racing(ds, **options):
        calls.append(ds.name)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates '
                                                    'unique constraint "dataset_pk"')
        return real(ds, **options)

    monkeypatch.setattr(mlflow, "log_input", racing)
    ds = mlflow.data.from_numpy(np.zeros((2, 3)), targets=np.zeros(2), name="d", digest="0" * 32)
    with mlflow.start_run() as run:
        tracking._log_input(ds, context="train")
    assert calls == ["d", "d"] and [i.dataset.name for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs] == ["d"]

    monkeypatch.setattr(mlflow, "log_input", lambda ds, **options: (_ for _ in ()).throw(
        mlflow.exceptions.MlflowException("the server is gone")))
    with mlflow.start_run(), pytest.raises(mlflow.exceptions.MlflowException, match="the server is gone"):
        tracking._log_input(ds, context="train")
