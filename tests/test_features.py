"""The frozen-feature cache: keyed by what produced it, atomic, verified, shared safely."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from tlkit import features, spec as specs


def tiny_extractor():
    """A small deterministic stand-in for the base: the cache does not care what it runs."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    return keras.Model(inputs, x)


def images(seed=0):
    rng = np.random.default_rng(seed)
    return {split: rng.integers(0, 255, (n, 8, 8, 3)).astype(np.uint8)
            for split, n in (("train", 20), ("val", 5), ("test", 7))}


FIELDS = features.key_fields(specs.merge({"weights": "none"}), "d" * 64, "block5_pool")


def test_the_key_changes_with_everything_that_produced_the_features(tmp_path):
    spec = specs.merge({"weights": "none"})
    base_key = features.key_of(features.key_fields(spec, "d" * 64, "block5_pool"))
    variations = [
        (dict(base="ResNet50"), "d" * 64, "block5_pool"),
        (dict(image_size=48), "d" * 64, "block5_pool"),
        (dict(preprocess="base"), "d" * 64, "block5_pool"),
        (dict(seed=1), "d" * 64, "block5_pool"),
        (dict(limit=100), "d" * 64, "block5_pool"),
        (dict(test_limit=100), "d" * 64, "block5_pool"),
        ({}, "e" * 64, "block5_pool"),
        ({}, "d" * 64, "block4_pool"),
    ]
    keys = {features.key_of(features.key_fields(specs.merge(c, spec), digest, boundary))
            for c, digest, boundary in variations}
    assert base_key not in keys and len(keys) == len(variations)
    # Two weights files differ by content, not by name.
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert features.weights_id(str(a)) != features.weights_id(str(b))
    assert features.weights_id(str(a)) == features.weights_id(str(a))


def test_miss_then_hit_memory_mapped_and_identical(tmp_path):
    cache = features.FeatureCache(tmp_path)
    extractor, data = tiny_extractor(), images()
    first = cache.get(FIELDS, extractor, data)
    second = cache.get(FIELDS, extractor, data)
    assert (first.hit, second.hit) == (False, True)
    assert isinstance(second.train, np.memmap)
    expected = extractor.predict(data["test"], verbose=0)
    np.testing.assert_allclose(second.test, expected, rtol=1e-5, atol=1e-6)
    assert second.train.shape == (20, 8, 8, 4) and second.val.shape == (5, 8, 8, 4)
    assert [p.name for p in tmp_path.iterdir()] == [first.key]  # no temporary folders left


def test_a_corrupted_entry_is_detected_and_recomputed(tmp_path, caplog):
    cache = features.FeatureCache(tmp_path)
    extractor, data = tiny_extractor(), images()
    good = np.array(cache.get(FIELDS, extractor, data).train)
    path = tmp_path / features.key_of(FIELDS) / "train.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte in the data
    path.write_bytes(bytes(raw))
    again = cache.get(FIELDS, extractor, data)
    assert again.hit is False
    assert "corrupted" in caplog.text
    np.testing.assert_array_equal(np.array(again.train), good)


def test_a_crash_while_writing_leaves_no_entry(tmp_path, monkeypatch):
    """Disk full on the second array: a clear error naming the folder, nothing half-written."""
    cache = features.FeatureCache(tmp_path / "cache")
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(features.os, "fsync", failing_fsync)
    with pytest.raises(features.FeatureCacheError, match=f"{tmp_path}/cache: No space left on device"):
        cache.get(FIELDS, tiny_extractor(), images())
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(features.os, "fsync", real_fsync)
    assert cache.get(FIELDS, tiny_extractor(), images()).hit is False


def test_an_unusable_cache_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = features.FeatureCache(blocker / "cache")
    with pytest.raises(features.FeatureCacheError, match=f"cannot write the feature cache in {blocker}/cache"):
        cache.get(FIELDS, tiny_extractor(), images())


def _compute_in_process(root: str, queue) -> None:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = features.FeatureCache(root).get(FIELDS, tiny_extractor(), images())
    queue.put((result.key, float(np.asarray(result.train).sum())))


@pytest.mark.e2e
def test_two_processes_computing_the_same_entry_both_finish(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_compute_in_process, args=(str(tmp_path), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    results = [queue.get(timeout=5) for _ in workers]
    assert results[0] == results[1]
    entry = features.FeatureCache(tmp_path).read(results[0][0])
    assert entry is not None and entry.hit
    assert [p.name for p in Path(tmp_path).iterdir()] == [results[0][0]]


def _write_and_hang(root: str) -> None:
    """A writer that stops for good while writing its first array, until it is killed."""
    import time

    def hang(*args, **kwargs):
        while True:
            time.sleep(1)

    np.save = hang
    features.FeatureCache(root).write("k" * 24, {"what": "hangs"}, images())


def test_a_dead_writers_temporary_folder_is_swept_and_a_live_ones_is_not(tmp_path):
    context = multiprocessing.get_context("spawn")
    writer = context.Process(target=_write_and_hang, args=(str(tmp_path),))
    writer.start()
    try:
        for _ in range(600):
            temporary = list(tmp_path.glob(".*.tmp-*"))
            if temporary:
                break
            writer.join(timeout=0.1)
        [folder] = temporary
        old = folder.stat().st_mtime - 2 * features.SWEEP_GRACE_SECONDS
        os.utime(folder, (old, old))  # past the grace period: only the lock says it is alive
        cache = features.FeatureCache(tmp_path)
        assert cache.sweep_dead_writers() == [] and folder.is_dir()
        writer.kill()
        writer.join(timeout=30)
        fresh = tmp_path / ".x.tmp-young"
        fresh.mkdir()  # unlocked but young: its writer may be about to lock it
        cache.write(features.key_of(FIELDS), FIELDS, images())
        assert not folder.exists() and fresh.is_dir()
        assert cache.read(features.key_of(FIELDS)) is not None
    finally:
        writer.kill()
