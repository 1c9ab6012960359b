"""The keras-tuner search: one process, workers against a real tracking server, resume, failures."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tlkit import data, spec as specs, tune
from tlkit.cli import main

from conftest import FAST_ARGS, cli, free_port, image_rows, invoke, stop, wait_for


def runs(stage: str, experiment: str = "Default"):
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.stage = '{stage}'",
                              output_format="list")


def check_trial_runs(trial_runs, parent_id: str, count: int) -> None:
    """`count` trial runs, one per trial id, all FINISHED under the parent, with what the issue asks."""
    client = mlflow.MlflowClient()
    assert sorted(int(r.data.tags["trial_id"]) for r in trial_runs) == list(range(count))
    for r in trial_runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent_id
        params = r.data.params
        assert 256 <= int(params["units"]) <= 1024 and int(params["units"]) % 128 == 0
        assert 1e-4 <= float(params["l2"]) <= 1e-2 and 1e-4 <= float(params["learning_rate"]) <= 1e-2
        assert 0.0 <= r.data.metrics["score"] <= 1.0
        assert len(client.get_metric_history(r.info.run_id, "val_loss")) >= 1  # autologged, per epoch
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id, "trial")}
        assert {"trial/checkpoint.weights.h5", "trial/history.json"} <= artifacts


def check_parent(parent, trial_runs, dataset) -> None:
    """The best trial's hyperparameters, test metrics and model, logged on the parent."""
    best_score = max(r.data.metrics["score"] for r in trial_runs)
    best = min((r for r in trial_runs if r.data.metrics["score"] == best_score),
               key=lambda r: int(r.data.tags["trial_id"]))  # ties go to the earliest trial
    assert parent.data.tags["best_trial_run_id"] == best.info.run_id
    for name in tune.load_search().space:
        assert parent.data.params[name] == best.data.params[name]
    metrics = parent.data.metrics
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_loss"] > 0
    assert metrics["best_score"] == best_score
    reports = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "reports")}
    assert reports == {"reports/confusion_matrix.png", "reports/classification_report.json",
                       "reports/training_curves.png"}
    # The logged end-to-end network (raw pixels in) scores exactly what the parent logged: the best
    # head sits on the very base the cached features came from.
    predictions = mlflow.pyfunc.load_model(f"runs:/{parent.info.run_id}/model").predict(image_rows(dataset.x_test))
    truth = [dataset.class_names[i] for i in dataset.y_test.argmax(axis=1)]
    accuracy = float(np.mean([p == t for p, t in zip(predictions["label"], truth)]))
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


@pytest.mark.e2e
def test_search_in_one_process_then_resume(image_folder, tracking, tmp_path):
    search = str(tmp_path / "search")
    args = ["tune", "--data", str(image_folder), *FAST_ARGS, "--max-trials", "3", "--search-dir", search]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    [parent] = runs("search")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tuner"] == "random" and parent.data.params["max_trials"] == "3"
    trial_runs = runs("trial")
    check_trial_runs(trial_runs, parent.info.run_id, 3)
    dataset = data.load(str(image_folder), seed=1995)
    check_parent(parent, trial_runs, dataset)
    # Trials train the head on cached features: the base was run once, and no trial model holds it.
    assert len([p for p in Path(os.environ["TLKIT_CACHE_DIR"]).iterdir() if p.name != "searches"]) == 1
    summary = mlflow.artifacts.load_text(f"runs:/{trial_runs[0].info.run_id}/model_summary.txt")
    assert "features" in summary and "block1_conv1" not in summary

    # The same search again continues the finished one: no new run, the same parent and result.
    every = all_run_ids()
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[-1] == result.stdout.splitlines()[-1]
    assert all_run_ids() == every
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"

    # Another search in the same folder is refused before any run is made.
    other = invoke(*args, "--seed", "7")
    assert other.exit_code == 2, other.output
    assert "holds another search (differs in spec.seed)" in other.output
    assert all_run_ids() == every


@pytest.mark.e2e
def test_a_conv_head_search_logs_the_network_it_scored(image_folder, tracking, tmp_path):
    # The trials train the conv through its centre tap (fastpath.training_view) and save that form;
    # the parent puts the best one back into the 3x3 conv of the logged network. With cached flips:
    # the trials draw from the mirrored training images' features too.
    result = cli("tune", "--data", str(image_folder), *FAST_ARGS, "--head", "conv", "--conv-filters", "8",
                 "--max-trials", "2", "--search-dir", str(tmp_path / "search"), "--flip")
    assert result.exit_code == 0, result.output
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/meta.json")]
    assert [m["fields"].get("transform") for m in metas].count("hflip") == 1
    [parent] = runs("search")
    trial_runs = runs("trial")
    check_trial_runs(trial_runs, parent.info.run_id, 2)
    check_parent(parent, trial_runs, data.load(str(image_folder), seed=1995))


@pytest.fixture
def tracking_server(tracking, tmp_path, monkeypatch):
    """A real `mlflow server` on a free port of 127.0.0.1, proxying artifacts: what many machines share."""
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                                   "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{uri}/health", server, 90, log)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri
    finally:
        stop(server)  # the server and the workers it started, nothing else


def all_run_ids() -> set[str]:
    return {r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}


def worker_summaries(search: Path) -> list[str]:
    """Each worker's last line, which it prints only when it exits normally: 'worker tunerK: N trial(s) ...'."""
    lines = [(search / "logs" / f"tuner{i}.log").read_text().strip().splitlines()[-1] for i in range(2)]
    assert all(line.startswith(f"worker tuner{i}: ") for i, line in enumerate(lines)), lines
    return lines


@pytest.mark.e2e
def test_workers_share_one_oracle_and_one_parent(image_folder, tracking_server, tmp_path):
    search = tmp_path / "search"
    args = ["tune", "--data", str(image_folder), *FAST_ARGS, "--max-trials", "4", "--workers", "2",
            "--search-dir", str(search)]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    [parent] = runs("search")
    assert parent.info.status == "FINISHED"
    trial_runs = runs("trial")
    check_trial_runs(trial_runs, parent.info.run_id, 4)  # exactly 4: none lost, none twice
    assert {r.data.tags["tuner_id"] for r in trial_runs} <= {"tuner0", "tuner1"}
    # The chief computed the features before the workers started; every worker read them from the cache.
    assert parent.data.tags["feature_cache"] == "miss"
    assert {r.data.tags["feature_cache"] for r in trial_runs} == {"hit"}
    # Each worker exited normally, and the trials they ran add up to the search's 4, not 4 a worker:
    # one oracle. How the 4 fall between the workers is the oracle's business (a worker that starts
    # late may find none left); that both ask the same oracle is shown again below, where both are
    # told it has nothing left.
    assert sum(int(line.split(": ")[1].split()[0]) for line in worker_summaries(search)) == 4
    check_parent(parent, trial_runs, data.load(str(image_folder), seed=1995))

    # Again with workers: the oracle has nothing left, both workers are told so (not only the first
    # to ask) and exit normally, and no run is added.
    every = all_run_ids()
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert [line.split(": ")[1].split()[0] for line in worker_summaries(search)] == ["0", "0"]
    assert all_run_ids() == every


@pytest.mark.e2e
def test_a_killed_search_resumes_where_it_stopped(image_folder, tracking, tmp_path):
    args = ["tune", "--data", str(image_folder), *FAST_ARGS, "--max-trials", "4", "--search-dir", str(tmp_path / "s")]
    with open(tmp_path / "first.log", "wb") as out:
        first = subprocess.Popen([sys.executable, "-m", "tlkit.cli", *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not [r for r in runs("trial") if r.info.status == "FINISHED"]:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.2)
    finally:
        first.kill()  # SIGKILL, as the OOM killer or a lost machine would: nothing gets to clean up
        first.wait()
    done_before = {r.info.run_id for r in runs("trial") if r.info.status == "FINISHED"}
    [parent] = runs("search")
    assert parent.info.status == "RUNNING"

    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert [r.info.run_id for r in runs("search")] == [parent.info.run_id]  # the same parent, reopened
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"
    trial_runs = runs("trial")
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    check_trial_runs(finished, parent.info.run_id, 4)  # each trial finished exactly once
    assert done_before <= {r.info.run_id for r in finished}  # finished trials were not run again
    # The attempt that was killed mid-trial (if the kill hit one) is marked KILLED when its trial reruns.
    assert {r.info.status for r in trial_runs if r not in finished} <= {"KILLED"}


def synthetic_features(n: int = 24, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 1, 8)).astype("float32")
    y = np.eye(classes, dtype="float32")[np.arange(n) % classes]
    return x, y


@pytest.mark.e2e
def test_a_failing_trial_is_marked_failed_and_the_search_goes_on(tracking, tmp_path):
    from tlkit import tracking as tracking_module

    spec = specs.merge({"epochs": 1, "batch_size": 8})
    x, y = synthetic_features()
    # keras-tuner rejects a head over max_model_size parameters: 12 * units + 3 for 8 features and 3
    # classes, so every trial with more than 640 units fails inside its run.
    limit = 12 * 640 + 3
    with tracking_module.run("tune", tags={"stage": "search"}) as parent:
        context = tune.Context(parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id,
                               search_key="failing", seed=3, feature_cache="miss")
        tuner = tune.make_tuner("random", tune.hypermodel(spec, tune.load_search(), x.shape[1:], 3), context, tmp_path / "search",
                                max_trials=5, executions_per_trial=1, epochs=1, max_model_size=limit,
                                max_consecutive_failed_trials=5)
        tuner.search(x, y, validation_data=(x, y), epochs=1, batch_size=8, verbose=0)
    trial_runs = runs("trial")
    assert len(trial_runs) == 5
    statuses = {r.data.tags["trial_id"]: r.info.status for r in trial_runs}
    for r in trial_runs:
        assert r.info.status == ("FAILED" if int(r.data.params["units"]) > 640 else "FINISHED"), r.data.params
    assert set(statuses.values()) == {"FAILED", "FINISHED"}, statuses  # this seed gives both
    oracle = {t.trial_id: t.status for t in tuner.oracle.trials.values()}
    assert {k for k, v in oracle.items() if v == "FAILED"} == {k for k, v in statuses.items() if v == "FAILED"}
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"


@pytest.mark.e2e
def test_bayesian_with_two_executions_nested_under_a_callers_run(image_folder, tracking, tmp_path):
    """What `suite` does: tune(spec, nested=True) inside its own run."""
    spec = specs.load("baseline", {"data": str(image_folder), "weights": "none", "epochs": 1, "batch_size": 8})
    with mlflow.start_run(run_name="caller") as outer:
        result = tune.tune(spec, max_trials=2, executions_per_trial=2, tuner="bayesian",
                           search_dir=str(tmp_path / "search"), nested=True)
    parent = mlflow.get_run(result.run_id)
    assert parent.data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert parent.data.tags["tuner"] == "bayesian"
    assert result.test_accuracy == parent.data.metrics["test_accuracy"]
    assert len(result.test_predictions) == 12
    trial_runs = runs("trial")
    assert len(trial_runs) == 2
    client = mlflow.MlflowClient()
    for r in trial_runs:
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == result.run_id
        # One autologged fit per run: each execution has its own run (and curves) under the trial's.
        executions = [e for e in runs("execution") if e.data.tags["mlflow.parentRunId"] == r.info.run_id]
        assert sorted(e.data.tags["execution"] for e in executions) == ["1", "2"]
        for e in executions:
            assert len(client.get_metric_history(e.info.run_id, "val_accuracy")) == 1
        assert "score" in r.data.metrics


@pytest.mark.e2e
def test_hyperband_continues_a_trial_with_weights_from_mlflow(image_folder, tracking, tmp_path):
    # epochs 3, factor 3: a bracket of 3 one-epoch trials, then the best one continued to 3 epochs.
    spec = specs.load("baseline", {"data": str(image_folder), "weights": "none", "epochs": 3, "batch_size": 8})
    folder = tmp_path / "search"
    result = tune.tune(spec, max_trials=4, tuner="hyperband", search_dir=str(folder))
    trial_runs = {r.data.tags["trial_id"]: r for r in runs("trial")}
    assert len(trial_runs) == 4 and {r.info.status for r in trial_runs.values()} == {"FINISHED"}
    continued = [r for r in trial_runs.values() if "tuner/trial_id" in r.data.params]
    assert len(continued) == 1
    assert continued[0].data.params["tuner/initial_epoch"] == "1" and continued[0].data.params["tuner/epochs"] == "3"
    assert mlflow.get_run(result.run_id).data.metrics["trials_completed"] == 4

    # On a machine that did not run the earlier trial, its checkpoint comes from the trial's run.
    previous = continued[0].data.params["tuner/trial_id"]
    checkpoint = folder / f"trial_{previous}" / "checkpoint.weights.h5"
    original = checkpoint.read_bytes()
    checkpoint.unlink()
    context = tune.Context(parent_run_id=result.run_id, experiment_id=trial_runs[previous].info.experiment_id,
                           search_key=trial_runs[previous].data.tags["search_key"], seed=1995, feature_cache="hit")
    tuner = tune.make_tuner("hyperband", tune.hypermodel(spec, tune.load_search(), (1, 1, 512), 3), context, folder,
                            max_trials=4, executions_per_trial=1, epochs=3)
    tuner._fetch_start_weights({"tuner/trial_id": previous})
    assert checkpoint.read_bytes() == original


@pytest.mark.parametrize("args, env, message", [
    (["--augment"], {}, "augment cannot be tuned"),
    (["--unfreeze", "block5"], {}, "unfreeze cannot be tuned"),
    (["--tuner", "grid"], {}, "'grid' is not one of"),
    (["--units", "512"], {}, "--units: the search sets these"),
    (["no_such_variant"], {}, "unknown variant 'no_such_variant'"),
    (["baseline"], {}, "variant baseline has no [search] table"),
    (["--max-trials", "0"], {}, "0 is not in the range x>=1"),
    ([], {"KERASTUNER_ORACLE_IP": "127.0.0.1"}, "KERASTUNER_ORACLE_PORT is not"),
    ([], {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": "1", "KERASTUNER_TUNER_ID": "tuner0"},
     "a worker needs TLKIT_PARENT_RUN_ID"),
])
def test_bad_input_is_one_line_and_exit_2(args, env, message, tracking, empty_store, tmp_path, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(tune.PARENT_ENV, raising=False)
    result = invoke("tune", "--weights", "none", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "mlflow.db").read_bytes() == empty_store.read_bytes()  # refused: nothing written


@pytest.mark.e2e
def test_a_worker_with_other_settings_than_its_chief_is_refused(image_folder, tracking, monkeypatch):
    spec = specs.load("baseline", {"data": str(image_folder), "weights": "none", "epochs": 2})
    chief = tune.identity(spec, data.load(str(image_folder), seed=1995).digest,
                          tune.load_search(max_trials=4, executions_per_trial=1, tuner="random"))
    with mlflow.start_run() as parent:
        mlflow.log_dict(chief, "search.json")  # what the chief logs before any worker starts
    for name, value in {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": "1",
                        "KERASTUNER_TUNER_ID": "tuner3", tune.PARENT_ENV: parent.info.run_id}.items():
        monkeypatch.setenv(name, value)
    result = invoke("tune", "--data", str(image_folder), "--weights", "none", "--epochs", "3", "--max-trials", "4")
    assert result.exit_code == 2, result.output
    assert "this worker's search differs from the chief's in spec.epochs" in result.output


def test_the_mlproject_entry_point_passes_every_parameter():
    from tlkit import mlproject

    params = mlproject.variant_parameters("tune")
    command = mlproject.command("tune", params)
    assert not set(tune.load_search().space) & set(params)  # the search sets them: no parameter that does nothing
    words = shlex.split(command.format(**{k: str(v) for k, v in params.items()}))
    assert words[:5] == ["python", "-m", "tlkit.cli", "tune", "tune"]
    context = main.commands["tune"].make_context("tune", words[4:])  # parses and type-checks every option
    assert context.params["max_trials"] == 6 and context.params["tuner"] == "random"
    assert {k for k, v in context.params.items() if v is not None} >= set(params)
