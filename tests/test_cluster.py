"""The base's pass on Ray (tlkit/cluster.py): the same entries as the one-machine pass, found by the
runs after it, a worker that dies retried, a pass that cannot finish failing in one line.

Ray runs in local mode, 2 CPUs, started once for the module (about 7 s) and used by every pass
here as `tlkit features` uses a Ray it finds running; each pass starts its own 2 actors, which
import TensorFlow (10-20 s on this 2-core machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import FAST_ARGS, assert_clear, cli, free_port, invoke

from tlkit import cluster, features, spec as specs

# Features of one image computed in another batch (the Ray pass batches the splits together, the
# local pass one split at a time) sum the same float32 products in another order: measured up to
# 1e-6 of the largest feature here. 1e-5 of it leaves room for that and for nothing else: another
# image, its mirror image, other weights or preprocessing differ by the features' own size.
RELATIVE_TO_LARGEST = 1e-5


def entries(cache: Path) -> dict[str, features.Features]:
    store = features.FeatureCache(cache)
    return {path.name: store.read(path.name) for path in sorted(cache.iterdir())}


def assert_same_features(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].splits == want[key].splits
        for split in want[key].splits:
            expected = np.asarray(getattr(want[key], split))
            actual = np.asarray(getattr(got[key], split))
            assert actual.shape == expected.shape and actual.dtype == expected.dtype
            scale = float(np.abs(expected).max())
            np.testing.assert_allclose(actual, expected, rtol=RELATIVE_TO_LARGEST,
                                       atol=RELATIVE_TO_LARGEST * scale, err_msg=f"{key} {split}")


def dying_worker(marker: Path, always: bool):
    """A worker (actor) that kills its own process on its first batch: every time, or only until one
    has (the marker file says so; a restarted worker finds it and works). A local class: Ray pickles
    it by value, so the actors need not import this test module."""

    class Dying(cluster.BaseWorker):
        def __init__(self, *args, **kwargs):
            self.dies = always or not marker.exists()
            if not self.dies:  # only a worker that lives builds the extractor (TensorFlow starts in 10 s here)
                super().__init__(*args, **kwargs)

        def __call__(self, batch):
            if self.dies:
                marker.touch()
                os._exit(1)  # the process ends at once, as when a node is lost or a worker is killed
            return super().__call__(batch)

    return Dying


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env=cluster.runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def finetune_spec(image_folder):
    # finetune: the pass stops below block5 and the base's output is derived from it, so one Ray pass
    # makes the entries of finetune and of every frozen variant on these images.
    return specs.load("finetune", {"data": str(image_folder), "weights": "none"})


@pytest.fixture(scope="module")
def ray_cache(ray_local, image_folder, tmp_path_factory) -> Path:
    """The cache after `tlkit features finetune --engine ray --workers 2` on the shapes folder."""
    cache = tmp_path_factory.mktemp("ray-cache")
    result = cli("features", "finetune", "--engine", "ray", "--address", "local", "--workers", "2",
                 "--data", str(image_folder), "--weights", "none", "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    assert "made by ray, 2 worker(s)" in result.output and "48 images at block4_pool" in result.output
    return cache


@pytest.mark.e2e
def test_the_ray_pass_makes_the_local_passs_entries(ray_cache, finetune_spec, tmp_path):
    local = tmp_path / "local"
    made = cluster.make_features("finetune", finetune_spec, engine="local", cache_dir=str(local))
    assert made.outcome == "miss" and [p.boundary for p in made.passes] == ["block4_pool"]
    got, want = entries(ray_cache), entries(local)
    assert len(want) == 2  # block4_pool, and block5_pool derived from it
    assert_same_features(got, want)
    assert {e.made_by["engine"] for e in got.values()} == {"ray"}
    assert {e.made_by["workers"] for e in got.values()} == {2}
    # What a finetune run looks up is all there: the same lookup, here with the local engine, runs no pass.
    again = cluster.make_features("finetune", finetune_spec, engine="local", cache_dir=str(ray_cache))
    assert again.outcome == "hit" and again.passes == []


@pytest.mark.e2e
def test_a_run_after_the_ray_pass_hits_and_says_ray_made_its_features(ray_cache, image_folder, tracking):
    result = cli("train", "baseline", "--data", str(image_folder), *FAST_ARGS, "--cache-dir", str(ray_cache))
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(experiment_names=["Default"], output_format="list")
    tags = run.data.tags
    assert (tags["feature_cache"], tags["feature_engine"], tags["feature_workers"]) == ("hit", "ray", "2")
    assert tags["feature_boundary"] == "block5_pool"  # the base's output finetune's pass derived


@pytest.mark.e2e
def test_a_worker_that_dies_is_restarted_and_its_batch_retried(ray_local, ray_cache, finetune_spec, tmp_path):
    marker, cache = tmp_path / "died", tmp_path / "cache"
    made = cluster.make_features("finetune", finetune_spec, engine="ray", workers=2, cache_dir=str(cache),
                                 retries=2, worker=dying_worker(marker, always=False))
    assert marker.exists()  # a worker did die
    assert made.outcome == "miss"
    assert_same_features(entries(cache), entries(ray_cache))


@pytest.mark.e2e
def test_a_pass_whose_workers_always_die_fails_in_one_line_and_leaves_nothing(ray_local, finetune_spec, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(cluster.ClusterError) as failed:
        cluster.make_features("finetune", finetune_spec, engine="ray", workers=2, cache_dir=str(cache), retries=0,
                              worker=dying_worker(tmp_path / "died", always=True))
    message = str(failed.value)
    assert "\n" not in message and message.startswith("ray: a worker of the feature pass died")
    assert "--retries 0" in message
    assert list(cache.iterdir()) == []  # no entry, and no temporary folder of one


@pytest.mark.e2e
def test_a_workers_data_error_comes_back_as_the_local_pass_raises_it(ray_local, finetune_spec, tmp_path):
    from tlkit.data import DataError

    class FileGone(cluster.BaseWorker):  # local, so Ray pickles it by value
        """Finds a file gone since loading (stream.reader's error), without building the base."""

        def __init__(self, *args, sources, **kwargs):
            import ray

            self.sources = {split: ray.get(source) for split, source in sources.items()}

        def __call__(self, batch):
            path = self.sources[batch["split"][0]].paths[batch["row"][0]]  # the split's sources.ImageFiles
            raise DataError(f"{path}: can no longer be read (the folder changed after it was loaded)")

    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"^/.*/train/circle/\d+\.png: can no longer be read \(the folder changed"):
        cluster.make_features("finetune", finetune_spec, engine="ray", workers=1, cache_dir=str(cache), worker=FileGone)
    assert list(cache.iterdir()) == []


def test_a_workers_exception_is_read_from_the_traceback_ray_sends_back():
    # As Ray 2.60 raised it (RayTaskError(UserCodeException)), the frames shortened.
    text = ("\x1b[36mray::MapWorker(MapBatches(BaseWorker)).submit()\x1b[39m (pid=7066, ip=192.0.2.2)\n"
            '  File "/x/tlkit/stream.py", line 38, in read\n    raise DataError(...)\n'
            "tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when allocating tensor\n"
            "Hint: If you want to see a list of allocated tensors when OOM happens, ...\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            "\x1b[36mray::MapWorker(MapBatches(BaseWorker)).submit()\x1b[39m (pid=7066, ip=192.0.2.2)\n"
            "ray.exceptions.UserCodeException: UDF failed to process a data block.\n")
    assert cluster.raised_in_worker(RuntimeError(text)) == (
        "tensorflow.python.framework.errors_impl.ResourceExhaustedError", "OOM when allocating tensor")
    assert cluster.raised_in_worker(RuntimeError("The actor died unexpectedly before finishing this task.")) is None


@pytest.mark.e2e
def test_an_unreachable_cluster_is_one_line_before_any_data_is_read(image_folder, tmp_path):
    address = f"ray://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "tlkit.cli", "features", "baseline", "--engine", "ray",
                           "--address", address, "--data", str(image_folder), "--weights", "none",
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"Error: ray: cannot reach {address}: Connection refused" in done.stderr
    assert "Traceback" not in done.stderr and "data shapes" not in done.stderr
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["augment_exact", "--engine", "ray"], "no features to cache"),
    (["scratch", "--engine", "ray"], "no features to cache"),
    (["baseline", "--engine", "ray", "--workers", "0"], "0 is not in the range x>=1"),
    (["baseline", "--engine", "ray", "--gpus-per-worker", "-1"], "-1.0 is not in the range x>=0"),
    (["baseline", "--workers", "2"], "--workers: for --engine ray only"),
    (["baseline", "--engine", "spark"], "'spark' is not one of 'local', 'ray'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, image_folder, tmp_path):
    result = invoke("features", *args, "--data", str(image_folder), "--cache-dir", str(tmp_path / "c"))
    assert_clear(result, 2, message)
    assert not (tmp_path / "c").exists()


def test_without_ray_the_message_says_what_to_install(monkeypatch, image_folder, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as when it is not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    result = invoke("features", "baseline", "--engine", "ray", "--data", str(image_folder),
                    "--cache-dir", str(tmp_path / "c"))
    assert_clear(result, 2, "pip install 'tlkit[cluster]'")


def test_the_mlproject_entry_point_runs_the_ray_pass():
    from tlkit import mlproject

    description, params, command = mlproject.TOOL_ENTRY_POINTS["features"]
    assert command.startswith("python -m tlkit.cli features {variant} --engine ray ")
    for name in params:
        assert f"{{{name}}}" in command  # every parameter is passed
    assert {"address", "workers", "gpus_per_worker", "data", "weights", "image_size"} <= set(params)
