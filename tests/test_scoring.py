"""`tlkit predict` on folders: recursive, any image size, streamed in batches; --output CSV or
Parquet with every class's probability, a row with its error for a file that is not an image.

A tiny real network (conftest.tiny_network: the class is the dominant colour) logged as training
logs it, into a model folder; the CLI runs in-process.
"""

from __future__ import annotations

import csv
import math

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import CLASSES, assert_clear, draw, invoke

from tlkit import registry, scoring
from tlkit.cli import main


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_network):
    from tlkit import spec as specs, tracking

    tmp = tmp_path_factory.mktemp("scoring")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    try:
        with mlflow.start_run():
            info = tracking.log_model(tiny_network, list(CLASSES), np.zeros((1, 32, 32, 3), np.uint8), specs.DEFAULTS)
        return mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp / "model"))
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture
def photos(tmp_path):
    """A folder tree of 70 images (more than one batch) of three sizes, with a text file in a subfolder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for i in range(70):
        kind = CLASSES[i % 3]
        folder = root / kind / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        size = (32, 57, 100)[i % 3]
        Image.fromarray(draw(kind, rng, size)).save(folder / f"{i:03d}.{'png' if i % 4 else 'jpg'}")
    (root / "square" / "notes.txt").write_text("not an image")
    (root / ".hidden").write_text("left out")
    return root


def run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_a_folder_streams_recursively_and_answers_as_files_one_by_one(model_folder, photos):
    result = run("predict", "--model", model_folder, str(photos), "--output", str(photos.parent / "out.csv"))
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    files = sorted(p for p in photos.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix != ".txt")
    assert sorted(line[0] for line in lines) == sorted(map(str, files)) and len(lines) == 70
    # The same answers as the files named one by one (registry.predict: today's path).
    expected = {path: (label, probability) for path, label, probability in registry.predict(model_folder, list(map(str, files)))}
    for path, label, probability in lines:
        assert (label, probability) == (expected[path][0], f"{expected[path][1]:.4f}")
    # The colours tell the classes apart: the folder name is the answer.
    assert all(label == path.split("/photos/")[1].split("/")[0] for path, label, _ in lines)
    assert "scoring" in result.stderr and "1 of 71 files are not images" in result.stderr

    with open(photos.parent / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "probability", "error", *[f"p_{c}" for c in CLASSES]]
    assert len(rows) == 71
    [bad] = [r for r in rows if r["error"]]
    assert bad["path"].endswith("notes.txt") and "cannot be read" in bad["error"] and bad["label"] == ""
    for row in rows:
        if not row["error"]:
            probabilities = [float(row[f"p_{c}"]) for c in CLASSES]
            assert math.isclose(sum(probabilities), 1, abs_tol=1e-5)
            assert float(row["probability"]) == max(probabilities) == expected[row["path"]][1]
    assert not list(photos.parent.glob(".out.csv.partial-*"))


def test_parquet_holds_the_same_rows(model_folder, photos, tmp_path):
    import pyarrow.parquet as pq

    assert run("predict", "--model", model_folder, str(photos), "--output", str(tmp_path / "a.csv")).exit_code == 0
    assert run("predict", "--model", model_folder, str(photos), "--output", str(tmp_path / "a.parquet")).exit_code == 0
    table = pq.read_table(tmp_path / "a.parquet").to_pylist()
    with open(tmp_path / "a.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in table] == [r["path"] for r in rows]
    assert [r["label"] or "" for r in table] == [r["label"] for r in rows]
    assert [r["error"] for r in table] == [r["error"] for r in rows]
    assert [r["p_circle"] for r in table if not r["error"]] == [float(r["p_circle"]) for r in rows if not r["error"]]


def test_without_output_a_non_image_in_a_folder_is_named_and_exits_1_after_the_rest(model_folder, photos):
    result = invoke("predict", "--model", model_folder, str(photos))
    assert result.exit_code == 1
    assert len(result.stdout.strip().splitlines()) == 70
    assert "notes.txt cannot be read" in result.stderr
    assert "1 of 71 files are not images (named above); the rest are scored" in result.stderr


def test_files_named_one_by_one_are_all_checked_before_the_model_loads(photos, tmp_path):
    good = next(photos.rglob("*.png"))
    for extra in ([], ["--output", str(tmp_path / "o.csv")]):
        result = invoke("predict", "--model", str(tmp_path / "no-such-model"), str(good),
                        str(photos / "square" / "notes.txt"), *extra)
        assert_clear(result, 2, "notes.txt cannot be read")  # the model (absent) was never loaded
    assert not (tmp_path / "o.csv").exists()


def test_a_bad_output_name_is_refused_before_anything(model_folder, photos, tmp_path):
    assert_clear(invoke("predict", "--model", model_folder, str(photos), "--output", str(tmp_path / "o.json")), 2,
                 "must end in .csv or .parquet")
    assert_clear(invoke("predict", "--model", model_folder, str(photos), "--output", str(tmp_path / "no" / "o.csv")),
                 2, "its folder does not exist")
    assert_clear(invoke("predict", "--model", model_folder, str(tmp_path / "missing")), 2, "does not exist")


def test_an_interrupted_output_leaves_no_file(model_folder, photos, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    answers = scoring.answers

    def some_then_stop(model, sources, batch=scoring.BATCH):
        for i, answer in enumerate(answers(model, sources, batch)):
            if i == 65:  # past the first batch, which is written
                interrupt()
            yield answer

    monkeypatch.setattr(scoring, "answers", some_then_stop)
    result = invoke("predict", "--model", model_folder, str(photos), "--output", str(tmp_path / "o.csv"))
    assert result.exit_code == 130
    assert not (tmp_path / "o.csv").exists() and not list(tmp_path.glob(".o.csv.partial-*"))
