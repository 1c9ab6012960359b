"""Tests for tlkit.data: image folders, .npz files, the cifar10 keyword and every DataError."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from tlkit import data, sources, stream
from tlkit.data import DataError, load

from conftest import CIFAR_ARCHIVE

# Every image is a flat grey; its level says its class (base + image index), so the
# tests can check that images and labels stay together through sampling and splits.
BASE_LEVEL = {"ant": 20, "bird": 100, "cat": 180}
KINDS = ("rgb", "grey", "rgba", "palette", "palette_transparent", "16bit", "jpeg", "bmp", "gif",
         "jpeg_upper")

# The mixed folder holds two corrupt images on purpose; their warning is tested once.
pytestmark = pytest.mark.filterwarnings("ignore:.*unreadable image:UserWarning")


def write_image(folder: Path, stem: str, kind: str, level: int) -> Path:
    """Write a flat grey image of `level` in the format/mode/size that `kind` names."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = (level, level, level)
    if kind == "rgb":
        path = folder / f"{stem}.png"
        Image.new("RGB", (32, 32), grey).save(path)
    elif kind == "grey":
        path = folder / f"{stem}.png"
        Image.new("L", (40, 24), level).save(path)
    elif kind == "rgba":
        path = folder / f"{stem}.png"
        Image.new("RGBA", (17, 17), grey + (200,)).save(path)
    elif kind in ("palette", "palette_transparent"):
        path = folder / f"{stem}.png"
        image = Image.new("P", (64, 48), 0)
        image.putpalette(list(grey) + [0, 0, 0] * 255)
        extra = {"transparency": 1} if kind == "palette_transparent" else {}
        image.save(path, **extra)
    elif kind == "16bit":
        path = folder / f"{stem}.png"
        Image.fromarray(np.full((32, 32), level * 257, np.uint16)).save(path)
        with Image.open(path) as written:
            assert written.mode == "I;16"
    elif kind == "jpeg":
        path = folder / f"{stem}.jpg"
        Image.new("RGB", (50, 50), grey).save(path, quality=95)
    elif kind == "jpeg_upper":
        path = folder / f"{stem}.JPEG"
        Image.new("RGB", (33, 31), grey).save(path, format="JPEG", quality=95)
    elif kind == "bmp":
        path = folder / f"{stem}.bmp"
        Image.new("RGB", (32, 32), grey).save(path)
    elif kind == "gif":
        path = folder / f"{stem}.gif"
        Image.new("L", (24, 24), level).save(path)
    else:
        raise AssertionError(kind)
    return path


def make_folder(root: Path, classes=("cat", "ant", "bird"), n_train: int = 20, n_test: int = 6,
                test_classes=None) -> Path:
    for split, count, names in (("train", n_train, classes), ("test", n_test, test_classes or classes)):
        for name in names:
            for i in range(count):
                write_image(root / split / name, f"{i:03d}", KINDS[i % len(KINDS)],
                            BASE_LEVEL.get(name, 60) + i)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """3 classes, 20 train + 6 test images each, every mode/format, plus junk and 2 corrupt files."""
    root = make_folder(tmp_path_factory.mktemp("mixed") / "shapes")
    (root / "train" / "ant" / "broken.png").write_bytes(b"this is not a png")
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    (root / "train" / "bird" / "truncated.jpg").write_bytes(buffer.getvalue()[:800])
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "test" / "ant" / "._000.jpg").write_bytes(b"macOS resource fork, ignored")
    (root / "README.md").write_text("ignored")
    return root


def class_of_level(images: np.ndarray) -> np.ndarray:
    means = np.asarray(images).reshape(len(images), -1).mean(axis=1)
    return np.digitize(means, [70, 150])  # ant < 70 <= bird < 150 <= cat


def all_splits(ds):
    # np.asarray: an image folder's splits are data.ImageFiles, decoded when read.
    return tuple((split, np.asarray(x), y) for split, x, y in
                 (("train", ds.x_train, ds.y_train), ("val", ds.x_val, ds.y_val), ("test", ds.x_test, ds.y_test)))


# --- image folders -----------------------------------------------------------------------------

def test_folder_shapes_dtypes_and_split(mixed):
    ds = load(str(mixed))
    assert ds.name == "shapes"
    assert ds.source == str(mixed)
    assert ds.class_names == ("ant", "bird", "cat")  # sorted folder names
    assert ds.num_classes == 3 and ds.image_size == 32
    # 60 readable training images: 10% (6) for validation, as train_test_split(test_size=0.1)
    assert ds.x_train.shape == (54, 32, 32, 3)
    assert ds.x_val.shape == (6, 32, 32, 3)
    assert ds.x_test.shape == (18, 32, 32, 3)
    for _, x, y in all_splits(ds):
        assert x.dtype == np.uint8
        assert y.dtype == np.float32 and y.shape == (len(x), 3)
        assert set(np.unique(y)) == {0.0, 1.0}
        np.testing.assert_array_equal(y.sum(axis=1), np.ones(len(x)))
    assert re.fullmatch(r"[0-9a-f]{64}", ds.digest), ds.digest  # sha256 as lowercase hex
    assert ds.class_counts("test") == {"ant": 6, "bird": 6, "cat": 6}
    assert sum(ds.class_counts("train").values()) + sum(ds.class_counts("val").values()) == 60


def test_every_mode_becomes_the_right_rgb_pixels(mixed):
    ds = load(str(mixed))
    for split, x, _ in all_splits(ds):
        # Labels still belong to their images, whatever the format/mode/size was.
        np.testing.assert_array_equal(class_of_level(x), ds.labels(split), err_msg=split)
        # Flat grey stays flat grey: 16-bit scaled (not clipped to white), palette and
        # alpha resolved, resize without artefacts.
        spread = x.reshape(len(x), -1).max(axis=1).astype(int) - x.reshape(len(x), -1).min(axis=1)
        assert spread.max() <= 3, split
    levels = {int(round(v)) for v in np.asarray(ds.x_test).reshape(18, -1).mean(axis=1)}
    expected = {base + i for base in BASE_LEVEL.values() for i in range(6)}
    assert max(min(abs(level - e) for e in expected) for level in levels) <= 2


def test_corrupt_files_are_skipped_counted_and_named(mixed):
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\)") as caught:
        ds = load(str(mixed))
    message = str(caught[0].message)
    assert "broken.png" in message and "truncated.jpg" in message
    assert str(mixed) in message
    assert sorted(Path(p).name for p in ds.skipped_files) == ["broken.png", "truncated.jpg"]
    assert all(Path(p).is_absolute() for p in ds.skipped_files)
    # Non-image files (.txt, .DS_Store, ._ files) are not counted as skipped
    assert not any(p.endswith((".txt", ".DS_Store")) or "._" in p for p in ds.skipped_files)


def test_same_seed_gives_identical_data(mixed):
    a, b = load(str(mixed), seed=7), load(str(mixed), seed=7)
    for (_, xa, ya), (_, xb, yb) in zip(all_splits(a), all_splits(b)):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert a.digest == b.digest


def test_other_seed_changes_the_split_but_not_the_digest(mixed):
    a, b = load(str(mixed), seed=1), load(str(mixed), seed=2)
    assert a.digest == b.digest
    assert not np.array_equal(a.x_val, b.x_val)
    # The same 60 images, only split differently
    pool_a = np.sort(np.concatenate([a.x_train, a.x_val]).reshape(60, -1), axis=0)
    pool_b = np.sort(np.concatenate([b.x_train, b.x_val]).reshape(60, -1), axis=0)
    np.testing.assert_array_equal(pool_a, pool_b)
    np.testing.assert_array_equal(a.x_test, b.x_test)


def test_split_and_encode_matches_the_notebook():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, (37, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 37)
    x_tr, y_tr, x_val, y_val = data.split_and_encode(x, labels, 4, seed=1995)
    one_hot = np.eye(4, dtype=np.float32)[labels]
    nx_tr, nx_val, ny_tr, ny_val = train_test_split(x, one_hot, test_size=0.1, random_state=1995)
    for mine, notebook in ((x_tr, nx_tr), (y_tr, ny_tr), (x_val, nx_val), (y_val, ny_val)):
        np.testing.assert_array_equal(mine, notebook)
    assert len(x_val) == 4 and y_tr.dtype == np.float32


def test_limit_and_test_limit_are_stratified_and_deterministic(mixed):
    ds = load(str(mixed), limit=30, test_limit=9, seed=5)
    assert len(ds.x_train) == 27 and len(ds.x_val) == 3 and len(ds.x_test) == 9
    counts = Counter(ds.labels("train").tolist()) + Counter(ds.labels("val").tolist())
    assert counts == {0: 10, 1: 10, 2: 10}
    assert ds.class_counts("test") == {"ant": 3, "bird": 3, "cat": 3}
    np.testing.assert_array_equal(class_of_level(ds.x_test), ds.labels("test"))

    again = load(str(mixed), limit=30, test_limit=9, seed=5)
    assert again.digest == ds.digest
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.x_test, ds.x_test)

    other = load(str(mixed), limit=30, test_limit=9, seed=6)
    assert other.digest != ds.digest  # another sample of images


def test_limit_beyond_the_data_or_below_the_class_count(mixed):
    everything = load(str(mixed), limit=10_000, test_limit=10_000)
    assert everything.digest == load(str(mixed)).digest
    tiny = load(str(mixed), limit=2, test_limit=1)  # fewer than 3 classes: not stratified
    assert len(tiny.x_train) == 1 and len(tiny.x_val) == 1 and len(tiny.x_test) == 1


def test_limit_replaces_unreadable_files_in_the_sample(tmp_path):
    root = make_folder(tmp_path / "half", classes=("ant", "cat"), n_train=10, n_test=2)
    for name in ("ant", "cat"):
        for i in range(10):
            (root / "train" / name / f"bad{i}.png").write_bytes(b"corrupt")
    ds = load(str(root), limit=10, seed=3)
    assert len(ds.x_train) + len(ds.x_val) == 10  # still `limit` images
    counts = Counter(ds.labels("train").tolist()) + Counter(ds.labels("val").tolist())
    assert counts == {0: 5, 1: 5}
    assert ds.skipped_files and all("bad" in Path(p).name for p in ds.skipped_files)
    assert load(str(root), limit=10, seed=3).digest == ds.digest


def test_scan_batches_do_not_change_the_result(mixed, monkeypatch):
    whole = load(str(mixed))
    monkeypatch.setattr(stream, "SCAN_BATCH", 5)  # many small decode tasks, run in parallel
    batched = load(str(mixed))
    assert batched.digest == whole.digest
    np.testing.assert_array_equal(batched.x_train, whole.x_train)
    assert sorted(batched.skipped_files) == sorted(whole.skipped_files)


def test_a_folder_streams_the_pixels_an_in_memory_load_would_hold(mixed):
    ds = load(str(mixed), limit=30, test_limit=9, seed=4)
    assert isinstance(ds.x_train, data.ImageFiles) and isinstance(ds.x_test, data.ImageFiles)
    pixels = {split: np.asarray(x) for split, x, _ in all_splits(ds)}
    # The digest is data_digest of the decoded arrays, as when folders were read into memory: the
    # sample (train and validation together) in the order of the folder's file list.
    listed, _ = data._split_files(str(mixed / "train"), ds.class_names)
    sampled = np.concatenate([ds.x_train.paths, ds.x_val.paths])
    order = np.argsort([list(listed).index(path) for path in sampled])
    x = np.concatenate([pixels["train"], pixels["val"]])[order]
    labels = np.concatenate([ds.labels("train"), ds.labels("val")])[order]
    assert ds.digest == data.data_digest(ds.class_names, 32, x, labels, pixels["test"], ds.labels("test"))
    # Reading in batches, by slices, by index arrays and one by one all agree with the whole array.
    streamed = np.concatenate(list(stream.batches(ds.x_test, 4).as_numpy_iterator()))
    np.testing.assert_array_equal(streamed, pixels["test"])
    np.testing.assert_array_equal(ds.x_test[2:5], pixels["test"][2:5])
    np.testing.assert_array_equal(ds.x_test[np.array([7, 0])], pixels["test"][[7, 0]])
    np.testing.assert_array_equal(ds.x_test[3], pixels["test"][3])
    np.testing.assert_array_equal(ds.x_test.take([1, 2])[:], pixels["test"][[1, 2]])
    np.testing.assert_array_equal(ds.x_test.mirror()[:], pixels["test"][:, :, ::-1])
    assert ds.x_test.shape == (9, 32, 32, 3) and ds.x_test.dtype == np.uint8


def test_a_file_gone_after_loading_is_named(tmp_path):
    root = make_folder(tmp_path / "f", classes=("ant", "cat"), n_train=6, n_test=2)
    ds = load(str(root))
    gone = Path(ds.x_test.paths[1])
    gone.write_bytes(b"not an image any more")
    with pytest.raises(DataError, match=f"{gone.name}: can no longer be read"):
        ds.x_test[:]


def test_classes_select_and_order(mixed):
    ds = load(str(mixed), classes=("cat", "ant"))
    assert ds.class_names == ("cat", "ant")
    assert len(ds.x_train) + len(ds.x_val) == 40 and len(ds.x_test) == 12
    for split, x, _ in all_splits(ds):
        # label 0 is cat (level >= 180), label 1 is ant (level < 70)
        expected = np.where(class_of_level(x) == 2, 0, 1)
        np.testing.assert_array_equal(ds.labels(split), expected)
        assert set(class_of_level(x)) <= {0, 2}
    assert load(str(mixed), classes="cat, ant").digest == ds.digest
    assert load(str(mixed), classes=["ant", "cat"]).digest != ds.digest


def test_unknown_class_is_named_with_the_available_ones(mixed):
    with pytest.raises(DataError, match=r"unknown class 'dog'.*available: ant, bird, cat"):
        load(str(mixed), classes=("cat", "dog"))
    with pytest.raises(DataError, match="twice"):
        load(str(mixed), classes=("cat", "cat"))
    with pytest.raises(DataError, match="at least two"):
        load(str(mixed), classes=("cat",))


def test_resize_to_another_image_size(mixed):
    ds = load(str(mixed), image_size=20, limit=30)
    assert ds.x_train.shape[1:] == (20, 20, 3) and ds.x_test.shape == (18, 20, 20, 3)
    assert ds.image_size == 20
    np.testing.assert_array_equal(class_of_level(ds.x_test), ds.labels("test"))
    assert ds.digest != load(str(mixed), limit=30).digest


def test_read_image_handles_large_jpegs_with_draft(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (640, 480), (10, 200, 90)).save(path, quality=95)
    pixels = sources.read_image(str(path), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - (10, 200, 90)).max() <= 3


# --- folder errors -----------------------------------------------------------------------------

def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as error:
        load(str(missing))
    assert str(missing) in str(error.value)


def test_not_a_folder_nor_npz(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="not 'cifar10', an image folder") as error:
        load(str(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize("missing", ["train", "test"])
def test_folder_without_train_or_test(tmp_path, missing):
    root = make_folder(tmp_path / "f", classes=("ant", "cat"), n_train=3, n_test=2)
    for file in sorted((root / missing).rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
    (root / missing).rmdir()
    with pytest.raises(DataError, match=f"no {missing}/ folder") as error:
        load(str(root))
    assert str(root) in str(error.value)


def test_class_folder_without_images(tmp_path):
    root = make_folder(tmp_path / "f", classes=("ant", "cat"), n_train=3, n_test=2)
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "notes.txt").write_text("x")
    (root / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="no image files") as error:
        load(str(root))
    assert str(root / "train" / "bird") in str(error.value)


def test_class_folder_with_only_unreadable_images(tmp_path):
    root = make_folder(tmp_path / "f", classes=("ant", "cat"), n_train=3, n_test=2)
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "a.png").write_bytes(b"junk")
    (root / "train" / "bird" / "b.jpg").write_bytes(b"junk")
    write_image(root / "test" / "bird", "000", "rgb", 60)
    with pytest.raises(DataError, match="no readable images") as error:
        load(str(root))
    assert str(root / "train" / "bird") in str(error.value)


def test_fewer_than_two_classes(tmp_path):
    root = make_folder(tmp_path / "f", classes=("ant",), n_train=3, n_test=2)
    with pytest.raises(DataError, match="at least two class folders, found 1") as error:
        load(str(root))
    assert str(root / "train") in str(error.value)


def test_test_classes_differ_from_train(tmp_path):
    root = make_folder(tmp_path / "f", classes=("ant", "cat", "bird"), n_train=3, n_test=2,
                       test_classes=("ant", "cat", "dog"))
    with pytest.raises(DataError, match="missing bird; not in train/ dog") as error:
        load(str(root))
    assert str(root / "test") in str(error.value)


def test_too_few_images_for_the_validation_split(mixed):
    with pytest.raises(DataError, match="1 training image.*at least 2") as error:
        load(str(mixed), limit=1)
    assert str(mixed) in str(error.value)


@pytest.mark.parametrize("param, value", [("limit", -1), ("test_limit", -5), ("image_size", 0),
                                          ("image_size", -32), ("limit", 2.5)])
def test_bad_numbers(mixed, param, value):
    with pytest.raises(DataError, match=f"^{param} must be an integer"):
        load(str(mixed), **{param: value})


# --- .npz files --------------------------------------------------------------------------------

def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def grey_arrays(n_train=30, n_test=9, size=28, k=3):
    """Grey (n, h, w) images whose level is 50 * label + index."""
    y_train, y_test = np.arange(n_train) % k, np.arange(n_test) % k
    level = lambda y: (50 * y + np.arange(len(y)) % 10).astype(np.uint8)  # noqa: E731
    x_train = np.broadcast_to(level(y_train)[:, None, None], (n_train, size, size)).copy()
    x_test = np.broadcast_to(level(y_test)[:, None, None], (n_test, size, size)).copy()
    return x_train, y_train, x_test, y_test


def test_npz_grey_images_with_column_labels(tmp_path):
    x_train, y_train, x_test, y_test = grey_arrays()
    path = save_npz(tmp_path / "digits.npz", x_train=x_train, y_train=y_train[:, None].astype(np.uint8),
                    x_test=x_test, y_test=y_test[:, None])
    ds = load(str(path))
    assert ds.name == "digits" and ds.source == str(path)
    assert ds.class_names == ("0", "1", "2")
    assert ds.x_train.shape == (27, 32, 32, 3) and ds.x_val.shape == (3, 32, 32, 3)
    assert ds.x_test.shape == (9, 32, 32, 3) and ds.x_test.dtype == np.uint8
    # resized flat grey images keep their level in all three channels
    np.testing.assert_array_equal(ds.x_test[:, 5, 5, :], np.repeat(x_test[:, 0, 0, None], 3, axis=1))
    for split, x, y in all_splits(ds):
        np.testing.assert_array_equal(x[:, 0, 0, 0] // 50, y.argmax(axis=1), err_msg=split)


def test_npz_rgba_class_names_and_classes(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 255, (24, 32, 32, 4), dtype=np.uint8)
    x_test = rng.integers(0, 255, (6, 32, 32, 4), dtype=np.uint8)
    y_train, y_test = np.arange(24) % 3, np.arange(6) % 3
    path = save_npz(tmp_path / "rgba.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                    class_names=np.array(["red", "green", "blue"]))
    ds = load(str(path), seed=0)
    assert ds.class_names == ("red", "green", "blue")
    np.testing.assert_array_equal(ds.x_test, x_test[..., :3])  # no resize needed, alpha dropped
    picked = load(str(path), classes=("blue", "red"))
    assert picked.class_names == ("blue", "red")
    np.testing.assert_array_equal(picked.x_test, x_test[[0, 2, 3, 5], :, :, :3])
    np.testing.assert_array_equal(picked.labels("test"), [1, 0, 1, 0])  # red, blue, red, blue


def test_npz_limit_is_stratified(tmp_path):
    x_train, y_train, x_test, y_test = grey_arrays(n_train=90, n_test=30, size=8)
    path = save_npz(tmp_path / "g.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = load(str(path), limit=30, test_limit=6, image_size=8)
    counts = Counter(ds.labels("train").tolist()) + Counter(ds.labels("val").tolist())
    assert counts == {0: 10, 1: 10, 2: 10}
    assert ds.class_counts("test") == {"0": 2, "1": 2, "2": 2}


def npz_error(tmp_path, match, **arrays):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match) as error:
        load(str(path))
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_npz_errors(tmp_path):
    x_train, y_train, x_test, y_test = grey_arrays(size=8)
    good = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    npz_error(tmp_path, "missing array.*y_test", **{k: v for k, v in good.items() if k != "y_test"})
    npz_error(tmp_path, "x_train has 30 images but y_train has 29 labels", **{**good, "y_train": y_train[:-1]})
    npz_error(tmp_path, "x_test has 9 images but y_test has 10 labels", **{**good, "y_test": np.arange(10) % 3})
    npz_error(tmp_path, r"x_train must have shape.*got \(30, 64\)", **{**good, "x_train": x_train.reshape(30, 64)})
    npz_error(tmp_path, r"x_test must have shape.*got \(9, 8, 8, 2\)",
              **{**good, "x_test": np.zeros((9, 8, 8, 2), np.uint8)})
    npz_error(tmp_path, "x_train must be uint8", **{**good, "x_train": x_train / 255.0})
    npz_error(tmp_path, "y_train must be integer labels, got dtype float", **{**good, "y_train": y_train * 1.0})
    npz_error(tmp_path, r"y_train must be integer labels of shape .* got shape \(30, 3\)",
              **{**good, "y_train": np.eye(3, dtype=int)[y_train]})
    npz_error(tmp_path, r"label 3 outside 0\.\.2",
              **{**good, "y_test": np.array([0, 1, 3] * 3), "class_names": np.array(["a", "b", "c"])})
    npz_error(tmp_path, r"label -1 outside", **{**good, "y_train": y_train - 1})
    npz_error(tmp_path, "at least two classes", **{**good, "y_train": y_train * 0, "y_test": y_test * 0})


def test_npz_that_is_not_a_zip(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read .npz") as error:
        load(str(path))
    assert str(path) in str(error.value)


# --- the cifar10 keyword -----------------------------------------------------------------------

def fake_keras(monkeypatch, load_data):
    cifar10 = types.SimpleNamespace(load_data=load_data)
    monkeypatch.setitem(sys.modules, "keras", types.SimpleNamespace(datasets=types.SimpleNamespace(cifar10=cifar10)))


def test_cifar10_download_failure_is_a_data_error(monkeypatch):
    def offline():
        raise Exception("URL fetch failure on https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: "
                        "None -- [Errno -2] Name or service not known\nsecond line")
    fake_keras(monkeypatch, offline)
    with pytest.raises(DataError, match="could not download CIFAR-10") as error:
        load("cifar10")
    message = str(error.value)
    assert "~/.keras/datasets" in message and "cifar-10-python.tar.gz" in message
    assert "Name or service not known" in message and "\n" not in message


def test_cifar10_arrays_are_used_and_resized(monkeypatch):
    rng = np.random.default_rng(1)
    y_train = (np.arange(200) % 10).astype(np.uint8)[:, None]
    y_test = (np.arange(50) % 10).astype(np.uint8)[:, None]
    x_train = rng.integers(0, 255, (200, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 255, (50, 32, 32, 3), dtype=np.uint8)
    fake_keras(monkeypatch, lambda: ((x_train, y_train), (x_test, y_test)))
    ds = load("cifar10")
    assert ds.name == "cifar10" and ds.source == "keras.datasets.cifar10"
    assert ds.class_names == data.CIFAR10_CLASSES and ds.class_names[0] == "airplane"
    assert ds.x_train.shape == (180, 32, 32, 3) and ds.x_val.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.labels("test"), y_test[:, 0])
    small = load("cifar10", image_size=16, limit=100, test_limit=20, classes=("truck", "cat"))
    assert small.class_names == ("truck", "cat")
    assert small.x_train.shape[1:] == (16, 16, 3) and len(small.x_train) + len(small.x_val) == 40
    assert small.class_counts("test") == {"truck": 5, "cat": 5}


# --- the real CIFAR-10 image folder ------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"{CIFAR_ARCHIVE} not present")
    target = tmp_path_factory.mktemp("cifar")
    if shutil.which("tar"):
        # GNU tar takes ~2 s for the 60,000 files, Python's tarfile ~8 s.
        subprocess.run(["tar", "xzf", str(CIFAR_ARCHIVE), "-C", str(target)], check=True)
    else:
        with tarfile.open(CIFAR_ARCHIVE) as archive:
            archive.extractall(target, filter="data")
    yield target / "cifar10"
    shutil.rmtree(target, ignore_errors=True)  # 60,000 files: don't leave them in pytest's kept temp dirs


@pytest.mark.e2e
def test_real_cifar10_folder_with_limits(cifar_folder):
    ds = load(str(cifar_folder), limit=500, test_limit=200)
    assert ds.name == "cifar10"
    assert ds.class_names == data.CIFAR10_CLASSES
    assert ds.x_train.shape == (450, 32, 32, 3)
    assert ds.x_val.shape == (50, 32, 32, 3)
    assert ds.x_test.shape == (200, 32, 32, 3)
    counts = Counter(ds.labels("train").tolist()) + Counter(ds.labels("val").tolist())
    assert counts == {label: 50 for label in range(10)}
    assert ds.class_counts("test") == {name: 20 for name in data.CIFAR10_CLASSES}
    assert ds.skipped_files == ()
    assert 40 < np.asarray(ds.x_test).mean() < 200  # real photos, not blank arrays
