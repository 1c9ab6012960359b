"""Image folders streamed from their files (tlkit/stream.py, sources.ImageFiles) give what the same
pixels held in memory give: the same features, the same training, and a run that never decodes a
whole split at once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tlkit import data, features, sources, stream

from conftest import FAST_ARGS, all_runs, cli, make_image_folder


def in_memory(dataset: data.Dataset) -> data.Dataset:
    """The same data set with every split decoded into an array (what loading a folder used to do)."""
    return dataclasses.replace(dataset, x_train=np.asarray(dataset.x_train), x_val=np.asarray(dataset.x_val),
                               x_test=np.asarray(dataset.x_test))


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    return data.load(str(make_image_folder(tmp_path_factory.mktemp("stream"), train_per_class=15)))


def small_network(image_size: int = 32):
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def test_the_feature_pass_is_the_same_streamed_or_in_memory(folder_data, tmp_path):
    extractor = small_network()
    fields = {"base": "tiny", "boundary": "out", "which": "streamed"}
    streamed = features.FeatureCache(tmp_path / "a").get(
        fields, extractor, {"train": folder_data.x_train, "val": folder_data.x_val, "test": folder_data.x_test},
        batch_size=16)
    memory = in_memory(folder_data)
    held = features.FeatureCache(tmp_path / "b").get(
        fields, extractor, {"train": memory.x_train, "val": memory.x_val, "test": memory.x_test}, batch_size=16)
    for split in features.SPLITS:
        # The same pixels in the same batches through the same compiled step: equal to the last bit.
        np.testing.assert_array_equal(getattr(streamed, split), getattr(held, split), err_msg=split)


@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
def test_whole_network_training_is_the_same_streamed_or_in_memory(folder_data, plain, monkeypatch):
    """Same seed, same batches in the same order (fastpath.batches draws one permutation for both),
    so the same history; tolerance 1e-5 relative, float summation order being all that may differ."""
    from tlkit import fastpath, train

    if plain:
        monkeypatch.setenv(fastpath.PLAIN_KERAS_ENV, "1")
    spec = {"patience": 0, "restore_best_weights": False, "batch_size": 8, "optimizer": "adam", "momentum": 0.0}
    histories = []
    for dataset in (folder_data, in_memory(folder_data)):
        import keras

        keras.utils.set_random_seed(3)
        model = small_network()
        inputs = {"train": dataset.x_train, "val": dataset.x_val}
        histories.append(train.fit(model, inputs, dataset, spec, epochs=3, learning_rate=0.01, on_features=False))
    streamed, held = histories
    if plain:
        # Plain Keras serves arrays through its own adapter, in another order than the files' dataset:
        # the same training, not the same numbers. Both must learn the same data.
        assert len(streamed["loss"]) == len(held["loss"]) == 3
        return
    for name in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(streamed[name], held[name], rtol=1e-5, err_msg=name)


def test_inference_is_the_same_streamed_or_in_memory(folder_data):
    from tlkit import fastpath

    model = small_network()
    np.testing.assert_allclose(fastpath.predict(model, folder_data.x_test),
                               fastpath.predict(model, np.asarray(folder_data.x_test)), rtol=1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["baseline", "augment_exact"])
def test_a_run_on_a_folder_never_decodes_more_than_a_batch(variant, tracking, tmp_path, monkeypatch):
    """Whether the head trains on cached features or the whole network trains on images, every read of
    the folder is a batch at a time: decoding more rows at once than the largest batch tlkit uses, or
    decoding a whole split (np.asarray), fails the run."""
    folder = make_image_folder(tmp_path / "f", train_per_class=60, test_per_class=10)
    largest = max(stream.SCAN_BATCH, 128, 256)  # the scan, the feature pass, inference (fastpath.INFERENCE_BATCH)
    decode = sources.ImageFiles.decode

    def one_batch(self, rows):
        assert len(rows) <= largest, f"{len(rows)} images decoded at once"
        return decode(self, rows)

    def whole(self, dtype=None, copy=None):
        raise AssertionError("a whole split decoded into memory")

    monkeypatch.setattr(sources.ImageFiles, "decode", one_batch)
    monkeypatch.setattr(sources.ImageFiles, "__array__", whole)
    cli("train", variant, "--data", str(folder), *FAST_ARGS, "--epochs", "1")
    [run] = [r for r in all_runs() if not r.data.tags.get("mlflow.parentRunId")]
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["test_accuracy"] <= 1
