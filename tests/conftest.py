"""Shared fixtures: tiny image folders, a throw-away tracking store and feature cache."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
CIFAR_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ("circle", "square", "stripes")


def draw(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A noisy picture whose class is visible: colour and shape differ per class."""
    image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
        image[mask] = (220, 40, 40)
    elif kind == "square":
        image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (40, 220, 40)
    else:
        image[(xx // 4) % 2 == 0] = (40, 40, 220)
    return image


def make_image_folder(root: Path, train_per_class: int = 12, test_per_class: int = 4, size: int = 32,
                      classes=CLASSES, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for kind in classes:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(draw(kind, rng, size)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("shapes"))


@contextlib.contextmanager
def using_tracking(uri: str, tmp_path: Path, monkeypatch):
    """Point MLflow (in-process and in subprocesses) at uri, cache in tmp_path; restore after."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # ./mlruns and ./mlartifacts land in tmp_path too
    # MLflow leaves a copy of the model in the system's temp folder at every load of a runs:/ or
    # models:/ URI without a dst_path (60 MB each, as `mlflow models serve` does): in tests, and in
    # the commands they start, those land in tmp_path. (tlkit's own loads clean up: test_registry.)
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path / "cache"))
    # MLFLOW_EXPERIMENT_ID is exported by mlflow.set_experiment: clear it, or subprocesses inherit it.
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking store and feature cache; cwd in tmp so ./mlruns lands there too."""
    with using_tracking(f"sqlite:///{tmp_path}/mlflow.db", tmp_path, monkeypatch) as uri:
        yield uri


VGG16_WEIGHTS = REPO.parent / "shared" / "data" / "vgg16-imagenet-notop.weights.h5"


@pytest.fixture(scope="session")
def cifar_sample(tmp_path_factory) -> Path:
    """A stratified CIFAR-10 sample as an image folder of the real JPEG files: the first 250 training
    and 100 test images of each class from ../shared/data (skips when it is absent)."""
    import shutil
    import subprocess

    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"{CIFAR_ARCHIVE} not present (the real CIFAR-10 JPEGs, ../shared/data/README.md)")
    scratch = tmp_path_factory.mktemp("cifar-archive")
    subprocess.run(["tar", "xzf", str(CIFAR_ARCHIVE), "-C", str(scratch)], check=True)
    sample = tmp_path_factory.mktemp("cifar-sample") / "cifar10"
    for split, per_class in (("train", 250), ("test", 100)):
        for class_dir in sorted((scratch / "cifar10" / split).iterdir()):
            target = sample / split / class_dir.name
            target.mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(path, target / path.name)
    shutil.rmtree(scratch, ignore_errors=True)  # 60,000 files: don't leave them in pytest's kept temp dirs
    return sample


def image_rows(images):
    """Pixel arrays as the logged model's input: one row of its `image` column per image
    (MLflow refuses a bare (N, H, W, C) array under the model's column signature: tlkit/serving.py)."""
    import pandas as pd

    return pd.DataFrame({"image": list(images)})
