"""The main job: suite -> compare -> promote -> predict / download / serve, and promote's rules.

The end-to-end test runs against a real `mlflow server` on 127.0.0.1 with a PostgreSQL backend
store (a private throw-away cluster, or $TLKIT_TEST_POSTGRES_URI) and served artifacts. The rules
of promote and compare run on the sqlite store of the `tracking` fixture, with small real models.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import (CLASSES, DIGEST_A, DIGEST_B, FAST_PARAMS, REPO, assert_clear, clean_env, cli, draw, free_port,
                      image_rows, invoke, make_run, no_registered_models, stop, using_tracking, versions, wait_for)


@pytest.fixture
def on_server(mlflow_server, tmp_path, monkeypatch):
    with using_tracking(mlflow_server, tmp_path, monkeypatch) as uri:
        yield uri


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_suite_compare_promote_predict_download_serve(on_server, image_folder, tmp_path, monkeypatch):
    from PIL import Image

    # 1. The README's main command, through the MLproject entry point, two variants on tiny data.
    params = {"variants": "baseline,conv_head", "data": str(image_folder), **FAST_PARAMS}
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "suite", "--env-manager", "local",
               "--experiment-name", "suite"] + [x for k, v in params.items() for x in ("-P", f"{k}={v}")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400,
                          env=clean_env(MLFLOW_TRACKING_URI=on_server, TLKIT_CACHE_DIR=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "variant" in done.stdout and "@champion" in done.stdout, done.stdout

    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name("suite").experiment_id
    [parent] = mlflow.search_runs([experiment], "tags.mlflow.project.entryPoint = 'suite'", output_format="list")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["variants"] == "baseline,conv_head"
    children = mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"], output_format="list")
    assert [c.data.tags["variant"] for c in children] == ["baseline", "conv_head"]
    assert all(c.info.status == "FINISHED" and c.data.params["epochs"] == "2" for c in children)
    # Both frozen variants read one feature-cache entry: computed by the first, read by the second.
    assert [c.data.tags["feature_cache"] for c in children] == ["miss", "hit"]
    assert children[0].data.tags["feature_cache_key"] == children[1].data.tags["feature_cache_key"]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/test_accuracy.png", "comparison/comparison.csv", "comparison/comparison.json"} <= logged
    assert client.download_artifacts(parent.info.run_id, "comparison/test_accuracy.png", str(tmp_path)) \
        and Image.open(tmp_path / "test_accuracy.png").size[0] > 100
    best = max(children, key=lambda c: (c.data.metrics["test_accuracy"], -c.info.start_time))
    assert parent.data.tags["best_run_id"] == best.info.run_id

    # 2. compare: the suite's children, best first, with what the runs hold.
    rows = json.loads(cli("compare", "--experiment", "suite", "--suite", parent.info.run_id, "--format", "json").output)
    assert [r["run_id"] for r in rows][0] == best.info.run_id and len(rows) == 2
    by_id = {c.info.run_id: c for c in children}
    for row in rows:
        run = by_id[row["run_id"]]
        assert row["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
        assert row["epochs_run"] == int(run.data.metrics["epochs_run"])
        history = client.get_metric_history(row["run_id"], "val_accuracy")
        assert row["best_val_accuracy"] == pytest.approx(max(m.value for m in history))
        assert row["dataset_digest"] == run.data.tags["dataset_digest"] and row["duration_s"] > 0

    # 3. The suite promoted the best; promoting again registers nothing new.
    name = f"{image_folder.name}-vgg16"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == best.info.run_id
    assert champion.tags["variant"] == best.data.tags["variant"]
    assert champion.tags["dataset_digest"] == best.data.tags["dataset_digest"]
    assert champion.tags["run_id"] == best.info.run_id
    assert float(champion.tags["test_accuracy"]) == pytest.approx(best.data.metrics["test_accuracy"])
    result = cli("promote", "--experiment", "suite")
    assert result.exit_code == 0 and "already @champion" in result.output, result.output
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    # 4. predict: PNG and JPEG of other sizes; the same answers as the run's own model.
    rng = np.random.default_rng(1)
    paths = [image_folder / "test" / kind / "000.png" for kind in CLASSES]
    Image.fromarray(draw("circle", rng, 96)).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(draw("square", rng, 20)[..., 0]).save(tmp_path / "grey.png")
    paths += [tmp_path / "big.jpg", tmp_path / "grey.png"]
    downloads = tmp_path / "predict-tmp"  # predict downloads the model and removes it when loaded
    downloads.mkdir()
    with monkeypatch.context() as temporary:
        temporary.setattr(tempfile, "tempdir", str(downloads))
        result = cli("predict", "--model", f"models:/{name}@champion", *map(str, paths))
    assert result.exit_code == 0, result.output
    assert not list(downloads.iterdir())
    lines = [line.split("\t") for line in result.output.strip().splitlines()]
    assert [line[0] for line in lines] == [str(p) for p in paths]
    assert all(line[1] in CLASSES and 0.0 <= float(line[2]) <= 1.0 for line in lines)
    labels = [line[1] for line in lines]
    own = mlflow.pyfunc.load_model(f"runs:/{best.info.run_id}/model")
    assert list(own.predict(image_rows(np.asarray(Image.open(p)) for p in paths[:3]))["label"]) == labels[:3]

    # 5. download: the folder loads and predicts with no tracking server to ask.
    result = cli("download", "--model", f"models:/{name}@champion", "--dst", str(tmp_path / "champion"))
    assert result.exit_code == 0, result.output
    offline = subprocess.run(
        [sys.executable, "-c", "import sys, mlflow, pandas as pd; from pathlib import Path; "
         "m = mlflow.pyfunc.load_model(sys.argv[1]); "
         "print(','.join(m.predict(pd.DataFrame({'image': [Path(p).read_bytes() for p in sys.argv[2:]]}))['label']))",
         str(tmp_path / "champion"), *map(str, paths[:3])],
        capture_output=True, text=True, timeout=120, env=clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert offline.stdout.strip().splitlines()[-1] == ",".join(labels[:3])
    with monkeypatch.context() as temporary:  # predict loads a downloaded folder where it is: no copy
        temporary.setattr(tempfile, "tempdir", str(downloads))
        result = cli("predict", "--model", str(tmp_path / "champion"), *map(str, paths[:3]))
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[1] for line in result.output.strip().splitlines()] == labels[:3]
    assert not list(downloads.iterdir())

    # 6. serve the champion and ask it over HTTP: the files, base64-encoded (tests/test_serving.py: more).
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  env=clean_env(MLFLOW_TRACKING_URI=on_server), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, 180, log)
        files = [{"image": base64.b64encode(Path(p).read_bytes()).decode()} for p in paths]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"dataframe_records": files}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
    finally:
        stop(server)
    assert [p["label"] for p in answer["predictions"]] == labels
    assert all(len(p["probabilities"]) == len(CLASSES) for p in answer["predictions"])


# --- promote's rules and compare's formats, on small real models ---------------------------------

def test_promote_picks_the_best_finished_run_with_a_model_on_one_dataset(tracking, tiny_network):
    make_run(tiny_network, 0.60, variant="low")
    best = make_run(tiny_network, 0.80, variant="best")
    make_run(tiny_network, 0.95, variant="failed", status="FAILED")
    make_run(tiny_network, 0.99, variant="no_model", model=False)
    other = make_run(tiny_network, 0.97, variant="other_data", digest=DIGEST_B)

    # Two datasets: their accuracies cannot be compared, so the user must choose.
    result = invoke("promote")
    assert result.exit_code == 2 and "2 datasets" in result.output and "--dataset-digest" in result.output
    assert "Traceback" not in result.output
    assert versions("shapes-vgg16") == []

    result = cli("promote", "--dataset-digest", "aaaa")
    assert result.exit_code == 0, result.output
    [version] = versions("shapes-vgg16")
    assert version.run_id == best
    assert version.tags == {"variant": "best", "test_accuracy": "0.8", "dataset": "shapes",
                            "dataset_digest": DIGEST_A, "run_id": best}
    assert mlflow.MlflowClient().get_model_version_by_alias("shapes-vgg16", "champion").version == version.version

    # The other dataset's best does not compete with the champion tested on the first one.
    result = cli("promote", "--dataset-digest", "bbbb")
    assert result.exit_code == 0 and "another dataset" in result.output, result.output
    assert [v.run_id for v in versions("shapes-vgg16")] == [best, other]
    assert mlflow.MlflowClient().get_model_version_by_alias("shapes-vgg16", "champion").run_id == best


def test_promote_keeps_a_better_champion_and_is_idempotent(tracking, tiny_network):
    from tlkit import registry

    client = mlflow.MlflowClient()
    make_run(tiny_network, 0.90, experiment="first")
    first = registry.promote("first", model_name="m")
    assert (first.registered, first.promoted, first.version) == (True, True, "1")

    again = registry.promote("first", model_name="m")
    assert (again.registered, again.promoted, again.version, again.champion) == (False, False, "1", "1")
    assert len(versions("m")) == 1

    make_run(tiny_network, 0.70, experiment="worse")
    worse = registry.promote("worse", model_name="m")
    assert (worse.registered, worse.promoted, worse.version, worse.champion) == (True, False, "2", "1")
    assert "does not beat" in worse.message
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert registry.promote("worse", model_name="m").registered is False
    assert len(versions("m")) == 2

    better = make_run(tiny_network, 0.95, experiment="better")
    promoted = registry.promote("better", model_name="m")
    assert (promoted.promoted, promoted.champion) == (True, "3")
    assert client.get_model_version_by_alias("m", "champion").run_id == better


def test_compare_formats_agree(tracking, tiny_network):
    from tlkit import compare

    make_run(tiny_network, 0.5, variant="mid", model=False)
    make_run(tiny_network, 0.75, variant="top", model=False)
    make_run(tiny_network, 0.25, variant="broken", model=False, status="FAILED")
    as_json = json.loads(cli("compare", "--format", "json").output)
    as_csv = list(csv.DictReader(io.StringIO(cli("compare", "--format", "csv").output)))
    table = [line.split() for line in cli("compare").output.strip().splitlines()]

    assert [r["variant"] for r in as_json] == ["top", "mid", "broken"]
    assert table[0] == list(compare.TABLE_HEADER)
    assert list(as_csv[0]) == list(compare.COLUMNS) == list(as_json[0])
    assert [r["run_id"] for r in as_json] == [r["run_id"] for r in as_csv] == [line[1] for line in table[1:]]
    for j, c, t in zip(as_json, as_csv, table[1:]):
        assert [j["variant"], j["status"]] == [c["variant"], c["status"]] == [t[0], t[2]]
        assert j["test_accuracy"] == float(c["test_accuracy"]) and f"{j['test_accuracy']:.4f}" == t[3]
        assert j["best_val_accuracy"] == float(c["best_val_accuracy"]) == j["test_accuracy"]
        assert j["epochs_run"] == int(c["epochs_run"]) == int(t[8]) == 2
        assert j["dataset_digest"] == c["dataset_digest"] == DIGEST_A and t[11] == DIGEST_A[:12]
        assert t[4:7] == ["-", "-", "-"]  # runs without per-image predictions: no interval, no pairing


def test_promote_says_why_nothing_can_be_promoted(tracking, tiny_network):
    make_run(tiny_network, 0.9, status="FAILED", variant="crashed")
    make_run(tiny_network, 0.8, status="KILLED", variant="stopped")
    make_run(tiny_network, 0.7, model=False, variant="no_model")
    assert_clear(invoke("promote"), 2, "nothing to promote in experiment Default",
                 "variant runs there: 1 FAILED, 1 FINISHED without a logged model, 1 KILLED")
    assert no_registered_models()


def test_a_champion_tested_on_another_dataset_is_kept_unless_forced(tracking, tiny_network):
    from tlkit import registry

    client = mlflow.MlflowClient()
    first = make_run(tiny_network, 0.9, variant="on_a")
    assert registry.promote(model_name="m", dataset_digest="aaaa").promoted
    other = make_run(tiny_network, 0.5, variant="on_b", digest=DIGEST_B)

    kept = registry.promote(model_name="m", dataset_digest="bbbb")
    assert (kept.registered, kept.promoted, kept.version, kept.champion, kept.run_id) == (True, False, "2", "1", other)
    assert kept.message == ("m v2 (on_b, test_accuracy 0.5000) registered; @champion stays v1 (on_a, test_accuracy "
                            "0.9000): it was tested on another dataset (digest aaaaaaaaaaaa), so the two cannot be "
                            "compared (--force replaces it)")
    assert client.get_model_version_by_alias("m", "champion").run_id == first

    forced = registry.promote(model_name="m", dataset_digest="bbbb", force=True)
    assert (forced.registered, forced.promoted, forced.version, forced.champion) == (False, True, "2", "2")
    assert forced.message == ("m v2 (on_b, test_accuracy 0.5000) replaces @champion v1 (on_a, test_accuracy 0.9000), "
                              "which was tested on another dataset (digest aaaaaaaaaaaa) (forced)")
    assert client.get_model_version_by_alias("m", "champion").run_id == other
    back = registry.promote(model_name="m", dataset_digest="aaaa", force=True)  # v1 again: nothing registered
    assert (back.registered, back.promoted, back.version, back.champion) == (False, True, "1", "1")
    assert back.message.endswith("which was tested on another dataset (digest bbbbbbbbbbbb) (forced)")
    # Forced on the champion's own dataset, a worse run takes @champion too.
    make_run(tiny_network, 0.4, variant="worse", experiment="other")
    worse = registry.promote("other", model_name="m", force=True)
    assert (worse.registered, worse.promoted, worse.version, worse.champion) == (True, True, "3", "3")
    assert worse.message == ("m v3 (worse, test_accuracy 0.4000) is now @champion, replacing v1 (on_a, "
                             "test_accuracy 0.9000): forced")


def test_a_digest_prefix_must_name_exactly_one_dataset(tracking, tiny_network):
    from tlkit import registry
    from tlkit.registry import RegistryError

    ab, ac = "ab" * 32, "ac" * 32
    make_run(tiny_network, 0.6, digest=ab)
    make_run(tiny_network, 0.7, digest=ac)
    with pytest.raises(RegistryError) as error:
        registry.promote(dataset_digest="a")
    said, there = str(error.value).split("; digests there: ")
    assert said == "more than one candidate run in experiment Default on dataset digest 'a'"
    assert there in (f"{ab[:12]} (shapes, 1 runs), {ac[:12]} (shapes, 1 runs)",
                     f"{ac[:12]} (shapes, 1 runs), {ab[:12]} (shapes, 1 runs)")
    with pytest.raises(RegistryError, match=r"^no candidate run in experiment Default on dataset digest 'b'"):
        registry.promote(dataset_digest="b")
    with pytest.raises(RegistryError, match=r"were tested on 2 datasets, which cannot be compared: .*--dataset-digest"):
        registry.promote()
    assert versions("shapes-vgg16") == []
    assert registry.promote(dataset_digest="ac").dataset_digest == ac


def test_a_tie_goes_to_the_earlier_run_and_an_equal_score_does_not_beat_the_champion(tracking, tiny_network):
    from tlkit import registry

    earlier = make_run(tiny_network, 0.8, variant="earlier")
    make_run(tiny_network, 0.8, variant="later")
    first = registry.promote(model_name="m")
    assert first.run_id == earlier and first.promoted
    assert registry.promote(model_name="m").registered is False  # the same pick again: nothing new
    make_run(tiny_network, 0.8, variant="equal", experiment="other")
    equal = registry.promote("other", model_name="m")
    assert (equal.registered, equal.promoted, equal.champion) == (True, False, "1")
    # Runs made by hand carry no per-image predictions: weighed by test accuracy alone, as the message says.
    assert "does not beat @champion v1 (earlier, test_accuracy 0.8000): the champion has no per-image test " \
           "predictions, so the rule before them applies: gain +0.00 pts is no gain; champion kept" in equal.message


def test_a_champion_registered_by_hand_is_compared_on_its_runs_score_and_digest(tracking, tiny_network):
    """Without promote's version tags the champion's test_accuracy comes from its run; without a
    dataset_digest tag it cannot be compared at all."""
    from tlkit import registry

    client = mlflow.MlflowClient()
    by_hand = make_run(tiny_network, 0.75, variant="by_hand", experiment="hand")
    version = mlflow.register_model(f"runs:/{by_hand}/model", "m")
    client.set_registered_model_alias("m", "champion", version.version)
    make_run(tiny_network, 0.7, variant="lower")
    lower = registry.promote(model_name="m")
    assert (lower.registered, lower.promoted, lower.champion) == (True, False, "1")
    assert lower.message.endswith("@champion stays v1 (?, test_accuracy 0.7500): it was tested on another dataset "
                                  "(digest unknown), so the two cannot be compared (--force replaces it)")

    client.set_model_version_tag("m", "1", "dataset_digest", DIGEST_A)  # now comparable, on its run's score
    again = registry.promote(model_name="m")
    assert (again.registered, again.promoted) == (False, False)
    assert again.message.endswith("does not beat @champion v1 (?, test_accuracy 0.7500): the champion has no "
                                  "per-image test predictions, so the rule before them applies: gain -5.00 pts is "
                                  "no gain; champion kept")
    make_run(tiny_network, 0.8, variant="higher")
    higher = registry.promote(model_name="m")
    assert (higher.promoted, higher.champion) == (True, "3")


def test_promote_and_compare_within_one_suite(tracking, tiny_network):
    """Only the suite's children count: nested under it, or tagged with it (a tuner's best trial)."""
    from tlkit import compare, registry

    with mlflow.start_run(run_name="suite") as suite:
        pass
    nested = make_run(tiny_network, 0.6, variant="nested", tags={"mlflow.parentRunId": suite.info.run_id})
    tagged = make_run(tiny_network, 0.7, variant="tagged", tags={"suite": suite.info.run_id})
    make_run(tiny_network, 0.99, variant="outside")
    rows = compare.compare(suite=suite.info.run_id)
    assert [(r["variant"], r["run_id"]) for r in rows] == [("tagged", tagged), ("nested", nested)]
    assert len(compare.compare()) == 3
    promoted = registry.promote(suite=suite.info.run_id, model_name="m")
    assert promoted.run_id == tagged and promoted.variant == "tagged"
    with pytest.raises(registry.RegistryError, match=r"^nothing to promote in suite run nope: .*no variant run"):
        registry.promote(suite="nope")


def test_compare_ranks_runs_without_a_score_last_and_reads_stage_runs(tracking):
    """A fine-tuned run's epochs are in its stage runs; a run that failed early has no score: '-' in
    the table, empty in CSV, null in JSON."""
    from tlkit import compare, registry

    def run(variant, metrics=None, history=(), parent=None, status="FINISHED"):
        tags = {"dataset_digest": DIGEST_A, "dataset": "shapes"}
        tags.update({"variant": variant} if variant else {"stage": "head", "mlflow.parentRunId": parent})
        with mlflow.start_run(run_name=variant or "stage", tags=tags) as r:
            mlflow.log_metrics(metrics or {})
            for step, value in enumerate(history):
                mlflow.log_metric("val_accuracy", value, step=step)
            mlflow.end_run(status)
        return r.info.run_id

    finetuned = run("finetune", {"test_accuracy": 0.5, "epochs_run": 4})
    run(None, history=(0.3, 0.45), parent=finetuned)
    run(None, history=(0.4,), parent=finetuned)
    crashed = run("crashed", status="FAILED")
    b = run("b", {"test_accuracy": 0.5}, history=(0.2,))
    rows = compare.compare()
    assert [r["variant"] for r in rows] == ["b", "finetune", "crashed"]  # ties by variant name; no score last
    by_variant = {r["variant"]: r for r in rows}
    assert by_variant["finetune"]["best_val_accuracy"] == pytest.approx(0.45)
    assert by_variant["finetune"]["epochs_run"] == 4 and by_variant["b"]["best_val_accuracy"] == pytest.approx(0.2)
    missing = by_variant["crashed"]
    assert (missing["run_id"], missing["status"], missing["test_accuracy"], missing["best_val_accuracy"],
            missing["epochs_run"]) == (crashed, "FAILED", None, None, None)
    info = mlflow.get_run(b).info  # the duration as the run's own start and end times say, in seconds
    assert by_variant["b"]["run_id"] == b
    assert by_variant["b"]["duration_s"] == round((info.end_time - info.start_time) / 1000, 1)

    table = compare.render(rows, "table").splitlines()
    assert table[0].split() == list(compare.TABLE_HEADER)
    assert table[3].split()[:10] == ["crashed", crashed, "FAILED", "-", "-", "-", "-", "-", "-", table[3].split()[9]]
    assert table[1].split()[3] == "0.5000" and table[1].split()[7] == "0.2000"
    assert table[1].split()[-1] == DIGEST_A[:12]
    crashed_csv = list(csv.DictReader(io.StringIO(compare.render(rows, "csv"))))[2]
    assert crashed_csv["test_accuracy"] == crashed_csv["epochs_run"] == "" and crashed_csv["status"] == "FAILED"
    assert json.loads(compare.render(rows, "json"))[2]["test_accuracy"] is None
    assert compare.render([], "table") == "  ".join(compare.TABLE_HEADER) + "\n"
    with pytest.raises(registry.RegistryError, match=r"^format must be one of table, csv, json, got 'xml'$"):
        compare.render(rows, "xml")


@pytest.mark.parametrize("name, why", [
    (" m", "starts or ends with whitespace"),
    ("m\t", "starts or ends with whitespace"),
    ("50%", "contains '%'"),
    ("..hidden", "'.', '..' and names starting with '..' are refused"),
    (".", "'.', '..' and names starting with '..' are refused"),
])
def test_check_model_name_refuses(name, why):
    from tlkit import registry

    with pytest.raises(registry.RegistryError) as error:
        registry.check_model_name(name)
    assert str(error.value).startswith(f"model name {name!r} ") and why in str(error.value)


@pytest.mark.parametrize("name", ["m", "cifar10-vgg16", "a.b_c-d", "m" * 256, "with space", "v1..2"])
def test_check_model_name_accepts(name):
    from tlkit import registry

    assert registry.check_model_name(name) == name


@pytest.mark.parametrize("dataset, base, name", [
    ("cifar10", "VGG16", "cifar10-vgg16"),
    ("My Photos", "MobileNetV3Small", "my-photos-mobilenetv3small"),
    ("shapes/v2", "ResNet50", "shapes-v2-resnet50"),
    ("", "", "tlkit-model"),
    ("!!", "??", "tlkit-model"),
])
def test_default_model_name(dataset, base, name):
    from tlkit import registry

    assert registry.default_model_name(dataset, base) == name
    assert registry.check_model_name(name) == name


@pytest.mark.e2e
def test_a_failing_variant_is_marked_and_the_suite_fails_at_the_end(tracking, image_folder, tmp_path, monkeypatch):
    from tlkit import data

    loads = []
    real_load = data.load
    monkeypatch.setattr(data, "load", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    broken = tmp_path / "broken.toml"
    broken.write_text('description = "a block VGG16 does not have"\nunfreeze = "block9"\n')
    result = invoke("suite", "--variants", f"{broken},baseline", "--data", str(image_folder),
                    "--weights", "none", "--epochs", "1", "--batch-size", "8")
    assert result.exit_code == 1, result.output
    assert "1 of 2 variants failed" in result.output and "block9" in result.output
    assert len(loads) == 1  # the children read the same data: decoded once for both
    [parent] = mlflow.search_runs(experiment_names=["Default"], filter_string="tags.suite_variants != ''",
                                  output_format="list")
    assert parent.info.status == "FAILED" and parent.data.tags["failed_variants"] == str(broken)
    children = {r.data.tags["variant"]: r for r in mlflow.search_runs(
        experiment_names=["Default"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        output_format="list")}
    assert children["broken"].info.status == "FAILED" and "block9" in children["broken"].data.tags["error"]
    assert children["baseline"].info.status == "FINISHED"
    # The finished variant was still compared and promoted.
    champion = mlflow.MlflowClient().get_model_version_by_alias(f"{image_folder.name}-vgg16", "champion")
    assert champion.run_id == children["baseline"].info.run_id


@pytest.mark.e2e
def test_bad_input_is_one_line_and_exit_2(tracking, tmp_path):
    for args, message in ((["suite", "--variants", "baseline,nope"], "unknown variant 'nope'"),
                          (["suite", "--variants", "baseline,baseline"], "lists a name twice"),
                          (["suite", "--epochs", "0"], "epochs must be a positive integer"),
                          (["promote"], "nothing to promote"),
                          (["compare", "--experiment", "nope"], "no experiment named 'nope'"),
                          (["predict", "--model", "models:/nope@champion", str(tmp_path / "x.png")],
                           "x.png does not exist"),
                          (["download", "--model", "models:/nope@champion", "--dst", str(tmp_path / "d")],
                           "nope")):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
