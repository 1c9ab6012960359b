"""The spec's `strategy` (tlkit/distribute.py): which devices a run takes, and training under a
2-replica MirroredStrategy on this CPU, split into two logical devices.

TensorFlow makes logical devices only before it initialises its devices, which this test process
has done long before: the 2-replica runs happen in one subprocess (two_replica_runs) that makes
them first and then runs the real CLI, command after command, into a store of its own. The tests
below read what those runs logged and what the fast path's door handed Keras while they ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from tlkit import distribute, fastpath, models, spec as specs, train
from tlkit.spec import SpecError

from conftest import REPO, all_runs, assert_clear, invoke

# --- the choice of devices: no devices needed ------------------------------------------------------

GPUS = ["/device:GPU:0", "/device:GPU:1"]
CPUS = ["/device:CPU:0", "/device:CPU:1"]


def test_auto_and_one_take_one_device_unless_there_are_gpus_to_mirror():
    assert distribute.devices("auto", [], CPUS[:1]) is None
    assert distribute.devices("auto", GPUS[:1], CPUS[:1]) is None
    assert distribute.devices("auto", [], CPUS) is None  # logical CPUs are mirrored only when asked
    assert distribute.devices("auto", GPUS, CPUS[:1]) == GPUS
    assert distribute.devices("one", GPUS, CPUS) is None


def test_mirrored_takes_every_gpu_else_every_cpu_and_refuses_a_single_device():
    assert distribute.devices("mirrored", GPUS, CPUS) == GPUS
    assert distribute.devices("mirrored", [], CPUS) == CPUS
    for gpus, cpus, only in ((GPUS[:1], CPUS, GPUS[0]), ([], CPUS[:1], CPUS[0])):
        with pytest.raises(SpecError, match=rf"^strategy 'mirrored' needs 2 or more devices, and this process sees "
                                            rf"only one \({only}\): use 'auto' or 'one'$"):
            distribute.devices("mirrored", gpus, cpus)


def test_an_unknown_strategy_is_a_one_line_spec_error_and_exit_2(tracking):
    assert specs.DEFAULTS["strategy"] == "auto"
    with pytest.raises(SpecError, match=r"^strategy must be one of auto, one, mirrored, got 'multiworker'$"):
        specs.load("baseline", {"strategy": "multiworker"})
    assert_clear(invoke("train", "baseline", "--strategy", "multiworker"), 2,
                 "strategy must be one of auto, one, mirrored, got 'multiworker'")
    assert all_runs() == []


def test_mirrored_on_one_device_is_refused_before_anything_is_logged(image_folder, tracking, tmp_path):
    import tensorflow as tf

    if len(tf.config.list_logical_devices("GPU")) >= 2:
        pytest.skip("this process sees 2 or more GPUs: mirrored would run")
    result = invoke("train", "baseline", "--data", str(image_folder), "--weights", "none", "--strategy", "mirrored")
    assert_clear(result, 2, "strategy 'mirrored' needs 2 or more devices, and this process sees only one")
    assert all_runs() == [] and not (tmp_path / "cache").exists()


# --- the fast path steps aside: a one-replica MirroredStrategy will do ---------------------------

@pytest.fixture(scope="module")
def one_replica():
    """A MirroredStrategy over this process's one CPU: a strategy in use, as far as the fast path can tell."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices=[tf.config.list_logical_devices("CPU")[0].name])


def conv_head_on_a_1x1_map(spec):
    """The fast path trains this head's 3x3 conv as its centre tap (views.py), one device."""
    return models.head_model(dict(spec, head="conv", conv_filters=4), (1, 1, 16), 3)


def test_the_fast_path_steps_aside_inside_a_strategys_scope(one_replica, monkeypatch):
    import keras

    from tlkit.fastpath import optimizers

    monkeypatch.delenv(fastpath.PLAIN_KERAS_ENV, raising=False)
    spec = specs.load("baseline", {"weights": "none", "units": 8})
    options = train.fit_options(spec, np.zeros((10, 1, 1, 16), "float32"), np.zeros((10, 3), "float32"),
                                np.zeros((4, 1, 1, 16), "float32"), np.zeros((4, 3), "float32"), 1)
    fast = fastpath.compiled(conv_head_on_a_1x1_map(spec), spec, 1e-3, on_features=True)  # outside: every lever
    assert type(fast.optimizer) is optimizers.Adam and fast.steps_per_execution == fastpath.HEAD_STEPS_PER_EXECUTION
    assert "head_conv" not in [layer.name for layer in fast.layers]
    assert not isinstance(fastpath.fit_arguments(**options)["x"], np.ndarray)

    with one_replica.scope():
        assert fastpath.plain_keras()
        head = conv_head_on_a_1x1_map(spec)
        view = fastpath.compiled(head, spec, 1e-3, on_features=True)
        assert type(view.optimizer) is keras.optimizers.Adam and view.steps_per_execution == 1
        assert head.get_layer("head_conv") in view.layers  # the conv as built, no centre tap
        assert view.distribute_strategy is one_replica
        assert isinstance(fastpath.fit_arguments(**options)["x"], np.ndarray)  # Keras's own data adapter
        calls = []
        monkeypatch.setattr(head, "predict", lambda x, **kw: calls.append(len(x)) or np.zeros((len(x), 3)))
        fastpath.predict(head, np.zeros((5, 1, 1, 16), "float32"))
        assert calls == [5]  # Keras's predict, which runs on every replica, not eager calls on one device
    assert not fastpath.plain_keras()


def test_a_run_with_a_strategy_keeps_the_fast_path_aside_outside_its_scope_too(one_replica, monkeypatch):
    """keras-tuner fits a trial outside any scope (it clears TensorFlow's graph, and the scope with
    it, before each trial): the run's recorded strategy still turns the levers off."""
    monkeypatch.delenv(fastpath.PLAIN_KERAS_ENV, raising=False)
    monkeypatch.setattr(distribute, "strategy_for", lambda spec: one_replica)
    with distribute.chosen({"strategy": "mirrored"}) as strategy:
        assert strategy is one_replica and distribute.current() is one_replica
        assert distribute.tags() == {"strategy": "mirrored", "replicas": "1"}
        assert fastpath.plain_keras()
    assert distribute.current() is None and not fastpath.plain_keras()
    assert distribute.tags() == {"strategy": "one", "replicas": "1"}


# --- two replicas on two logical CPUs, through the CLI -------------------------------------------

TWO_CPUS = r'''
import json, sys, time

import numpy as np
import tensorflow as tf

# Two logical devices on the one CPU, made before TensorFlow initialises its devices.
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

from click.testing import CliRunner

from tlkit import fastpath
from tlkit.cli import main

levers = []  # what the door handed Keras, per command
compiled, fit_arguments = fastpath.compiled, fastpath.fit_arguments


def layer_types(model):
    for layer in model.layers:
        yield type(layer).__name__
        if hasattr(layer, "layers"):
            yield from layer_types(layer)


def recording_compiled(model, *args, **kwargs):
    view = compiled(model, *args, **kwargs)
    levers[-1].append({"optimizer": f"{type(view.optimizer).__module__}.{type(view.optimizer).__name__}",
                       "steps": view.steps_per_execution, "layers": sorted(set(layer_types(view))),
                       "replicas": view.distribute_strategy.num_replicas_in_sync})
    return view


def recording_fit_arguments(*args, **kwargs):
    served = fit_arguments(*args, **kwargs)
    x = served["x"]
    levers[-1].append({"x": "arrays" if isinstance(x, np.ndarray) else type(x).__name__})
    return served


fastpath.compiled, fastpath.fit_arguments = recording_compiled, recording_fit_arguments
results = []
for args in json.loads(sys.argv[1]):
    levers.append([])
    start = time.monotonic()
    result = CliRunner().invoke(main, args)
    results.append({"exit_code": result.exit_code, "output": result.output[-3000:],
                    "levers": levers[-1], "seconds": round(time.monotonic() - start, 1)})
print("RESULTS " + json.dumps(results))

# One batch of 5 rows predicted on the two replicas, Keras's way and distribute's.
import keras

from tlkit import distribute

with distribute.scope({"strategy": "mirrored"}):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    batch = np.arange(20, dtype="float32").reshape(5, 4)
    ours = distribute.predict_on_batch(model, batch)
    print("PROBE " + json.dumps({"keras_rows": len(model.predict_on_batch(batch)), "rows": len(ours),
                                 "max_error": float(np.abs(ours - np.asarray(model(batch))).max())}))
'''

# Quick training that still learns: the base's own preprocessing (Caffe's mean subtraction) gives
# random VGG16 features that a head separates in 4 epochs (test accuracy 1.0 on the 12 shapes).
LEARNS = ["--weights", "none", "--batch-size", "8", "--preprocess", "base", "--patience", "0"]
QUICK = ["--weights", "none", "--batch-size", "8"]
COMMANDS = {
    "mirrored": ["train", "baseline", *LEARNS, "--epochs", "4", "--strategy", "mirrored"],
    "one": ["train", "baseline", *LEARNS, "--epochs", "4", "--strategy", "one"],
    # The conv head on block5's 1x1 map and block5_conv3 on its 2x2 map: both rewritten by the fast
    # path on one device; cached flips: its own batches on one device, a PyDataset here. The last
    # conv alone is unfrozen: all of block5 took 36 s of this run here against 20 s, testing nothing more.
    "finetune": ["train", "finetune", *QUICK, "--unfreeze", "block5_conv3", "--head", "conv", "--conv-filters", "8",
                 "--flip", "--epochs", "1", "--finetune-epochs", "1", "--strategy", "mirrored"],
    # The whole network every step (random flip and translation).
    "augment_exact": ["train", "augment_exact", *QUICK, "--epochs", "1", "--strategy", "mirrored"],
    "tune": ["tune", *QUICK, "--epochs", "1", "--max-trials", "1", "--strategy", "mirrored"],
    # `tlkit features` (no run: its entries only), each way into a cache folder of its own.
    "features_mirrored": ["features", "baseline", "--weights", "none", "--strategy", "mirrored"],
    "features_one": ["features", "baseline", "--weights", "none", "--strategy", "one"],
}


@pytest.fixture(scope="module")
def two_replica_runs(image_folder, tmp_path_factory) -> dict:
    """Every command of COMMANDS (experiment = its key; `features`: cache folder = its key) in one
    process on two logical CPUs; per key: exit code, output, the door's levers, seconds; `probe`,
    one batch predicted there; `folder`. MLFLOW_TRACKING_URI points at its store."""
    folder = tmp_path_factory.mktemp("two-replicas")
    uri = f"sqlite:///{folder}/mlflow.db"
    commands = [[*args, "--data", str(image_folder),
                 *(["--cache-dir", str(folder / key)] if args[0] == "features" else ["--experiment", key])]
                for key, args in COMMANDS.items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, TLKIT_CACHE_DIR=str(folder / "cache"), TMPDIR=str(folder),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.pop(fastpath.PLAIN_KERAS_ENV, None)
    done = subprocess.run([sys.executable, "-c", TWO_CPUS, json.dumps(commands)], capture_output=True, text=True,
                          env=env, cwd=folder, timeout=600)
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()
             if line.startswith(("RESULTS ", "PROBE "))}
    assert done.returncode == 0 and len(lines) == 2, done.stdout[-3000:] + done.stderr[-3000:]
    results = dict(zip(COMMANDS, json.loads(lines["RESULTS"])), probe=json.loads(lines["PROBE"]), folder=folder)
    mlflow.set_tracking_uri(uri)
    try:
        yield results
    finally:
        mlflow.set_tracking_uri(None)


def finished(results: dict, key: str):
    """The command's one top-level run, after checking that it ended well."""
    result = results[key]
    assert result["exit_code"] == 0, result["output"]
    runs = mlflow.search_runs(experiment_names=[key], output_format="list")
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1 and top[0].info.status == "FINISHED", [r.info.run_name for r in runs]
    return top[0]


def assert_plain_keras_on_two_replicas(levers: list) -> None:
    """Every compile Keras's own optimizer, one step a call, the layers as built, on 2 replicas;
    every fit on what Keras's own adapters take: arrays, the PyDataset of cached flips, or the
    streamed images' tf.data batches (an image folder: plain Keras reads the files the same way,
    and Keras splits each batch between the replicas)."""
    compiles = [lever for lever in levers if "optimizer" in lever]
    assert compiles and all(lever["optimizer"] == "keras.src.optimizers.adam.Adam" and lever["steps"] == 1
                            and lever["replicas"] == 2 for lever in compiles), compiles
    assert not {"CentreTap", "Im2colConv2D"} & {name for lever in compiles for name in lever["layers"]}
    assert all(lever["x"] in ("arrays", "MirroredDraws") or lever["x"].endswith("Dataset")
               for lever in levers if "x" in lever), levers


# Two replicas take the same global batches as one device (4 images each of a batch of 8) and sum
# the same gradient, so the numbers differ by float rounding only: measured, the 4 epochs' loss and
# val_loss and the test loss agreed to 1.3e-6 relative; 1e-4 leaves room for other CPUs' kernels.
# Test accuracy is then the same up to an image at a decision's edge: allowed, one of the 12 test
# images (measured: 1.0 both; chance is 1/3).
LOSS_RTOL = 1e-4


@pytest.mark.e2e
def test_a_baseline_on_two_replicas_trains_what_one_device_trains(two_replica_runs):
    mirrored, one = finished(two_replica_runs, "mirrored"), finished(two_replica_runs, "one")
    assert {k: mirrored.data.tags[k] for k in ("strategy", "replicas")} == {"strategy": "mirrored", "replicas": "2"}
    assert {k: one.data.tags[k] for k in ("strategy", "replicas")} == {"strategy": "one", "replicas": "1"}
    assert mirrored.data.params["strategy"] == "mirrored" and mirrored.data.params["batch_size"] == "8"
    # One run a command that trains, finetune's two stages, tune's trial.
    assert len(all_runs()) == len([a for a in COMMANDS.values() if a[0] != "features"]) + 2 + 1

    client = mlflow.MlflowClient()
    for name in ("loss", "val_loss"):
        curves = [[m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
                  for run in (mirrored, one)]
        assert len(curves[0]) == len(curves[1]) == 4
        np.testing.assert_allclose(curves[0], curves[1], rtol=LOSS_RTOL, err_msg=name)
    assert mirrored.data.metrics["test_loss"] == pytest.approx(one.data.metrics["test_loss"], rel=LOSS_RTOL)
    accuracy = {run.data.tags["strategy"]: run.data.metrics["test_accuracy"] for run in (mirrored, one)}
    assert min(accuracy.values()) >= 0.75, accuracy  # chance is 1/3
    assert abs(accuracy["mirrored"] - accuracy["one"]) <= 1 / 12 + 1e-9, accuracy

    assert_plain_keras_on_two_replicas(two_replica_runs["mirrored"]["levers"])
    # The same command on one device took the fast path: what the test above would notice missing.
    fast = [lever for lever in two_replica_runs["one"]["levers"] if "optimizer" in lever]
    assert fast and fast[0]["optimizer"] == "tlkit.fastpath.optimizers.Adam" and fast[0]["steps"] > 1


@pytest.mark.e2e
def test_fine_tuning_on_two_replicas_trains_both_stages_the_plain_keras_way(two_replica_runs):
    run = finished(two_replica_runs, "finetune")
    assert (run.data.tags["strategy"], run.data.tags["replicas"]) == ("mirrored", "2")
    stages = mlflow.search_runs(experiment_names=["finetune"], output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in stages) == ["finetune", "head"]
    assert "test_accuracy" in run.data.metrics
    levers = two_replica_runs["finetune"]["levers"]
    assert [lever["x"] for lever in levers if "x" in lever] == ["MirroredDraws", "MirroredDraws"]  # cached flips
    assert_plain_keras_on_two_replicas(levers)


@pytest.mark.e2e
def test_the_whole_network_trains_on_two_replicas(two_replica_runs):
    run = finished(two_replica_runs, "augment_exact")
    assert (run.data.tags["strategy"], run.data.tags["replicas"]) == ("mirrored", "2")
    assert run.data.tags["feature_cache"] == "unused" and "test_accuracy" in run.data.metrics
    assert_plain_keras_on_two_replicas(two_replica_runs["augment_exact"]["levers"])


@pytest.mark.e2e
def test_a_search_trains_its_trials_on_two_replicas(two_replica_runs):
    """keras-tuner builds each trial's model in the strategy's scope (its distribution_strategy):
    a scope around the search would be gone after the first trial's clear_session."""
    run = finished(two_replica_runs, "tune")
    assert (run.data.tags["strategy"], run.data.tags["replicas"]) == ("mirrored", "2")
    trials = mlflow.search_runs(experiment_names=["tune"], output_format="list",
                                filter_string="tags.stage = 'trial' and attributes.status = 'FINISHED'")
    assert len(trials) == 1 and "test_accuracy" in run.data.metrics
    assert_plain_keras_on_two_replicas(two_replica_runs["tune"]["levers"])


@pytest.mark.e2e
def test_the_feature_pass_predicts_each_row_once_on_two_replicas(two_replica_runs):
    """Keras's predict_on_batch gives every replica the whole batch and returns each row's
    outputs once per replica; distribute.predict_on_batch, which the feature pass calls, splits the
    batch and returns each row's once, the model's own outputs (the baseline's losses above agree
    with one device's only if its features do)."""
    probe = two_replica_runs["probe"]
    assert probe["rows"] == 5 and probe["max_error"] < 1e-5, probe


# The same images' features from the base on 2 replicas (each its half of a batch) and on one
# device: float rounding apart, as the kernels sum a half batch in another order. Measured: at most
# 4.5e-7 of the largest feature apart (train and val), the test split equal to the bit.
FEATURE_RTOL = 1e-5


@pytest.mark.e2e
def test_tlkit_features_on_two_replicas_are_one_devices_features(two_replica_runs):
    entries = {}
    for key in ("features_mirrored", "features_one"):
        assert two_replica_runs[key]["exit_code"] == 0, two_replica_runs[key]["output"]
        (entry,) = [meta.parent for meta in (two_replica_runs["folder"] / key).glob("*/meta.json")]
        entries[key] = entry
    assert entries["features_mirrored"].name == entries["features_one"].name  # the same key: the same features
    for split in ("pool", "test"):
        mirrored, one = (np.load(entries[key] / f"{split}.npy") for key in ("features_mirrored", "features_one"))
        assert mirrored.shape == one.shape and len(one) > 0
        np.testing.assert_allclose(mirrored, one, rtol=FEATURE_RTOL, atol=FEATURE_RTOL * np.abs(one).max())


def test_a_pass_on_ray_leaves_the_devices_to_its_workers():
    from tlkit import cluster

    spec = specs.load("baseline", {"strategy": "mirrored"})
    with pytest.raises(SpecError, match=r"^--strategy mirrored is for this machine's pass \(--engine local\)"):
        cluster.check(spec, "baseline", "ray", 2, 0.0, 1.0)
    cluster.check(spec, "baseline", "local", 2, 0.0, 1.0)  # the local pass takes it
