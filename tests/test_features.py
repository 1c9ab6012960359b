"""The frozen-feature cache: keyed by what produced it, atomic, verified, shared safely."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path

import numpy as np
import pytest

from tlkit import features, sources, spec as specs

from conftest import small_filesystem


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
            for split, n in (("pool", 25), ("test", 7))}


FIELDS = features.key_fields(specs.merge({"weights": "none"}), "d" * 64, "block5_pool")


def test_the_key_changes_with_everything_that_produced_the_features(tmp_path):
    spec = specs.merge({"weights": "none"})
    base_key = features.key_of(features.key_fields(spec, "d" * 64, "block5_pool"))
    variations = [
        (dict(base="ResNet50"), "d" * 64, "block5_pool"),
        (dict(image_size=48), "d" * 64, "block5_pool"),
        (dict(preprocess="base"), "d" * 64, "block5_pool"),
        (dict(limit=100), "d" * 64, "block5_pool"),
        (dict(test_limit=100), "d" * 64, "block5_pool"),
        ({}, "e" * 64, "block5_pool"),
        ({}, "d" * 64, "block4_pool"),
    ]
    keys = {features.key_of(features.key_fields(specs.merge(c, spec), digest, boundary))
            for c, digest, boundary in variations}
    assert base_key not in keys and len(keys) == len(variations)
    # The validation split is not in the key: the seed changes the features only through the sample
    # it draws (limit, test_limit), which the data set's digest covers.
    assert features.key_of(features.key_fields(specs.merge({"seed": 1}, spec), "d" * 64, "block5_pool")) == base_key
    # Two weights files differ by content, not by name.
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert features.weights_id(str(a)) != features.weights_id(str(b))
    assert features.weights_id(str(a)) == features.weights_id(str(a))


def test_the_key_ignores_what_only_the_head_and_its_training_use():
    """Every variant on one base, size, data and sample shares one entry: the head, the optimiser and
    the epochs do not change the features."""
    spec = specs.merge({"weights": "none"})
    key = features.key_of(features.key_fields(spec, "d" * 64, "block5_pool"))
    head_only = {"head": "conv", "units": 64, "conv_filters": 8, "l2": 0.01, "dropout": 0.5, "optimizer": "sgd",
                 "momentum": 0.9, "learning_rate": 0.1, "epochs": 3, "batch_size": 4, "patience": 0,
                 "restore_best_weights": False, "unfreeze": "block5", "finetune_epochs": 2, "flip": True,
                 "classes": "cat,dog", "data": "/elsewhere/same-images"}  # classes and data: in the digest
    for name, value in head_only.items():
        fields = features.key_fields(specs.merge({name: value}, spec), "d" * 64, "block5_pool")
        assert features.key_of(fields) == key, name


def test_the_key_is_24_hex_digits_of_the_fields_in_any_order():
    fields = dict(FIELDS)
    key = features.key_of(fields)
    assert re.fullmatch(r"[0-9a-f]{24}", key), key
    assert features.key_of(dict(reversed(list(fields.items())))) == key
    assert fields["format"] == features.FORMAT_VERSION and fields["weights"] == "none"
    assert features.key_of({**fields, "format": features.FORMAT_VERSION + 1}) != key  # a new layout, new keys
    assert features.key_of({**fields, "transform": "hflip"}) != key  # mirrored images: an entry of their own
    assert features.key_fields(specs.merge({}), "d" * 64, "block5_pool")["weights"] == "imagenet"


def test_a_weights_file_is_known_by_its_sha256(tmp_path):
    import hashlib

    path = tmp_path / "w.h5"
    path.write_bytes(b"some weights")
    assert features.weights_id(str(path)) == "sha256:" + hashlib.sha256(b"some weights").hexdigest()
    renamed = tmp_path / "renamed.h5"
    path.rename(renamed)
    assert features.weights_id(str(renamed)) == "sha256:" + hashlib.sha256(b"some weights").hexdigest()


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path / "mine"))
    assert features.default_cache_dir() == tmp_path / "mine"
    assert features.FeatureCache().root == tmp_path / "mine"
    monkeypatch.delenv("TLKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert features.default_cache_dir() == tmp_path / "xdg" / "tlkit" / "features"


def test_write_then_read_round_trips_with_checksums(tmp_path):
    cache = features.FeatureCache(tmp_path)
    arrays = {split: np.random.default_rng(i).normal(size=(n, 2, 2, 3)).astype("float16")
              for i, (split, n) in enumerate((("pool", 8), ("test", 3)))}
    key = features.key_of(FIELDS)
    assert not cache.has(key) and cache.read(key) is None
    cache.write(key, FIELDS, arrays)
    assert cache.has(key)
    meta = json.loads((tmp_path / key / "meta.json").read_text())
    assert meta["fields"] == FIELDS
    assert meta["sha256"] == {split: features.file_sha256(tmp_path / key / f"{split}.npy") for split in arrays}
    entry = cache.read(key)
    assert entry.hit and entry.key == key and entry.splits == ("pool", "test")
    for split, array in arrays.items():
        got = getattr(entry, split)
        # Read from the file by offsets, not mapped: nothing of it stays in the process's memory.
        assert isinstance(got, sources.FeatureFile) and got.in_memory() is None and got.dtype == np.float16
        np.testing.assert_array_equal(np.asarray(got), array)
        rows = np.array([2, 0, 1])
        np.testing.assert_array_equal(got.read(rows), array[rows])
    entry.split(np.array([3, 1, 0, 5]), np.array([7, 2]))
    np.testing.assert_array_equal(np.asarray(entry.train), arrays["pool"][[3, 1, 0, 5]])
    np.testing.assert_array_equal(entry.val.read(np.array([1, 0])), arrays["pool"][[2, 7]])
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]


def test_an_entry_of_one_split(tmp_path):
    """A mirrored images' entry: the pool alone (flips), or the test images alone (test-time flips)."""
    cache = features.FeatureCache(tmp_path)
    fields = {**FIELDS, "transform": "hflip", "splits": ["pool"]}
    cache.write(features.key_of(fields), fields, {"pool": np.ones((4, 1, 1, 2), "float32")})
    entry = cache.read(features.key_of(fields))
    assert entry.splits == ("pool",) and entry.test is None
    assert np.asarray(entry.pool).sum() == 8


@pytest.mark.parametrize("damage, reason", [
    (lambda entry: (entry / "pool.npy").unlink(), "No such file"),
    (lambda entry: (entry / "meta.json").write_text("{not json"), "Expecting property name"),
    (lambda entry: (entry / "meta.json").write_text('{"fields": {}}'), "'sha256'"),
    (lambda entry: (entry / "meta.json").write_text('{"fields": {}, "sha256": {"other": "00"}}'),
     "it holds no features"),
    (lambda entry: (entry / "test.npy").write_bytes(b""), "test.npy does not match its checksum"),
], ids=["a missing array", "meta not JSON", "meta without checksums", "no split", "an emptied array"])
def test_a_damaged_entry_reads_as_absent_and_is_removed(damage, reason, tmp_path, caplog):
    cache = features.FeatureCache(tmp_path)
    key = features.key_of(FIELDS)
    cache.write(key, FIELDS, {split: np.zeros((2, 1, 1, 1), "float32") for split in features.SPLITS})
    damage(tmp_path / key)
    assert cache.read(key) is None
    assert not (tmp_path / key).exists() and not cache.has(key)
    assert f"feature cache entry {tmp_path / key} is corrupted" in caplog.text and reason in caplog.text


def test_a_second_writer_of_the_same_entry_keeps_the_first_ones(tmp_path):
    """Two processes computed one entry: the rename of the second finds it in place; no error, no leftovers."""
    cache = features.FeatureCache(tmp_path)
    key = features.key_of(FIELDS)
    cache.write(key, FIELDS, {"pool": np.ones((2, 1), "float32")})
    cache.write(key, FIELDS, {"pool": np.zeros((2, 1), "float32")})
    np.testing.assert_array_equal(np.asarray(cache.read(key).pool), np.ones((2, 1)))
    assert [p.name for p in tmp_path.iterdir()] == [key]


def test_check_writable_names_the_folder(tmp_path):
    features.FeatureCache(tmp_path / "new" / "cache").check_writable()  # made on the way
    assert (tmp_path / "new" / "cache").is_dir() and list((tmp_path / "new" / "cache").iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(features.FeatureCacheError) as error:
        features.FeatureCache(tmp_path / "file" / "cache").check_writable()
    assert str(error.value) == f"cannot write the feature cache in {tmp_path}/file/cache: Not a directory"


def test_miss_then_hit_read_from_disk_and_identical(tmp_path):
    cache = features.FeatureCache(tmp_path)
    extractor, data = tiny_extractor(), images()
    first = cache.get(FIELDS, extractor, data)
    second = cache.get(FIELDS, extractor, data)
    assert (first.hit, second.hit) == (False, True)
    assert isinstance(second.pool, sources.FeatureFile)
    expected = extractor.predict(data["test"], verbose=0)
    np.testing.assert_allclose(np.asarray(second.test), expected, rtol=1e-5, atol=1e-6)
    assert second.pool.shape == (25, 8, 8, 4) and second.test.shape == (7, 8, 8, 4)
    assert [p.name for p in tmp_path.iterdir()] == [first.key]  # no temporary folders left


def test_a_corrupted_entry_is_detected_and_recomputed(tmp_path, caplog):
    cache = features.FeatureCache(tmp_path)
    extractor, data = tiny_extractor(), images()
    good = np.array(cache.get(FIELDS, extractor, data).pool)
    path = tmp_path / features.key_of(FIELDS) / "pool.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte in the data
    path.write_bytes(bytes(raw))
    again = cache.get(FIELDS, extractor, data)
    assert again.hit is False
    assert "corrupted" in caplog.text
    np.testing.assert_array_equal(np.array(again.pool), good)


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


def test_a_disk_too_small_for_the_entry_fails_at_the_first_batch_not_the_last():
    """A real 64 KiB filesystem and an entry of 256 images x 1 KiB (8x8x4 float32): the pass stops
    at its first batch with what it needed, where it would have written four batches and then met
    the full disk; nothing is left behind."""
    class CountedPass(features.LocalPass):
        batches = 0

        def features(self, *args):
            for split_and_batch in super().features(*args):
                CountedPass.batches += 1
                yield split_and_batch

    rng = np.random.default_rng(0)
    many = {split: rng.integers(0, 255, (n, 8, 8, 3)).astype(np.uint8) for split, n in (("pool", 200), ("test", 56))}
    with small_filesystem("64k") as folder:
        cache = features.FeatureCache(folder / "cache")
        with pytest.raises(features.FeatureCacheError,
                           match=rf"cannot write the feature cache in {folder}/cache: No space left on device "
                                 r"\(this entry needs 256\.0 KB, \d+\.\d KB free\)"):
            cache.get(FIELDS, tiny_extractor(), many, batch_size=16, engine=CountedPass())
        assert CountedPass.batches == 1
        assert list((folder / "cache").iterdir()) == []


def test_an_unusable_cache_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = features.FeatureCache(blocker / "cache")
    with pytest.raises(features.FeatureCacheError, match=f"cannot write the feature cache in {blocker}/cache"):
        cache.get(FIELDS, tiny_extractor(), images())


def _compute_in_process(root: str, queue) -> None:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = features.FeatureCache(root).get(FIELDS, tiny_extractor(), images())
    queue.put((result.key, float(np.asarray(result.pool).sum())))


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

    features._EntryFiles.append = hang
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
