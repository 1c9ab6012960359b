"""The logged model's input: image files' bytes (base64 in JSON) in the `image` column, or pixel arrays.

The unit tests log a tiny real network with tracking.log_model into a throw-away sqlite store and
call the pyfunc in this process. The e2e test trains a variant, promotes it with `tlkit promote`,
serves the champion with `mlflow models serve` and compares its HTTP answers with `tlkit predict`.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from PIL import Image, features

from tlkit import registry, serving
from tlkit.cli import main

from conftest import (CIFAR_ARCHIVE, CLASSES, VGG16_WEIGHTS, clean_env, draw, free_port, image_rows, stop,
                      using_tracking, wait_for)

SIZE = 32
# Pillow's name -> file suffix; WebP only where this Pillow was built with it.
FORMATS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif"} | ({"WEBP": "webp"} if features.check("webp") else {})


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **options)
    return out.getvalue()


def frame(*values) -> pd.DataFrame:
    return pd.DataFrame({"image": list(values)})


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """(the loaded pyfunc, its local folder, the example images logged with it): a tiny network that
    sees colour and position, so that a wrong pixel or a wrong resize changes its probabilities."""
    import keras

    from tlkit import spec as specs, tracking

    tmp = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as monkeypatch, using_tracking(f"sqlite:///{tmp}/mlflow.db", tmp, monkeypatch):
        keras.utils.set_random_seed(0)
        pixels = keras.Input((SIZE, SIZE, 3))
        x = keras.layers.Rescaling(1 / 255)(pixels)
        x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
        x = keras.layers.Flatten()(x)
        network = keras.Model(pixels, keras.layers.Dense(len(CLASSES), activation="softmax")(x))
        example = np.stack([draw(kind, np.random.default_rng(i)) for i, kind in enumerate(CLASSES[:2])])
        with mlflow.start_run():
            info = tracking.log_model(network, list(CLASSES), example, specs.DEFAULTS)
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp / "model")))
    return mlflow.pyfunc.load_model(str(folder)), folder, example


def sample_pixels(seed: int, height: int = 41, width: int = 53) -> np.ndarray:
    """A picture of another size than the network's, so that every request resizes."""
    small = draw(CLASSES[seed % 3], np.random.default_rng(seed))
    return np.asarray(Image.fromarray(small).resize((width, height)))


# --- what the model says it takes ---------------------------------------------------------------

def test_signature_and_input_example_show_the_encoded_form(logged):
    model, folder, example = logged
    schema = model.metadata.get_input_schema()
    assert schema.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    # The example is what a request holds: PNG files' bytes, which decode to the very pixels given.
    logged_example = model.input_example
    assert list(logged_example.columns) == ["image"]
    assert [Image.open(io.BytesIO(b)).format for b in logged_example["image"]] == ["PNG", "PNG"]
    np.testing.assert_array_equal(np.stack([serving.decode(b) for b in logged_example["image"]]), example)
    # ...and the serving example is the JSON body to send: base64 text in a dataframe_split.
    body = json.loads((folder / "serving_input_example.json").read_text())
    assert body["dataframe_split"]["columns"] == ["image"]
    assert [base64.b64decode(row[0]) for row in body["dataframe_split"]["data"]] == list(logged_example["image"])


# --- encoded files in ---------------------------------------------------------------------------

def write_formats(folder: Path) -> list[Path]:
    """One file per format and per colour mode the decoding treats apart."""
    pixels = sample_pixels(1)
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 128, np.uint8)])
    paths = []
    for fmt, suffix in FORMATS.items():
        path = folder / f"picture.{suffix}"
        path.write_bytes(encode(pixels, fmt))
        paths.append(path)
    extra = {
        "grey.png": encode(pixels[..., 0], "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "grey16.png": encode(pixels[..., 0].astype(np.uint16) * 257, "PNG"),  # mode I;16: the top 8 bits
        "palette.gif": encode(pixels, "GIF", transparency=0),  # P with transparency: through RGBA
        "photo.jpg": encode(sample_pixels(2, 300, 400), "JPEG", quality=90),  # larger than the network
    }
    for name, data in extra.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def test_every_format_answers_what_tlkit_predict_answers_for_the_file(logged, tmp_path):
    model, folder, _ = logged
    paths = write_formats(tmp_path)
    assert {Image.open(p).format for p in paths} == set(FORMATS)
    assert {Image.open(p).mode for p in paths} >= {"RGB", "L", "RGBA", "I;16", "P"}
    answered = model.predict(frame(*(p.read_bytes() for p in paths)))
    # `tlkit predict`: the files read with registry.read_image, then the same model from its folder.
    predicted = registry.predict(str(folder), [str(p) for p in paths])
    assert list(answered["label"]) == [label for _, label, _ in predicted]
    assert list(answered["probability"]) == [probability for _, _, probability in predicted]
    # The bytes go through the very pixels read_image gives for the file.
    for path in paths:
        one = model.predict(frame(path.read_bytes()))
        np.testing.assert_array_equal(np.stack(one["probabilities"]),
                                      np.stack(model.predict(frame(registry.read_image(str(path))))["probabilities"]))


def test_base64_text_is_decoded_as_an_inputs_request_sends_it(logged):
    # MLflow base64-decodes a dataframe_split/records request's binary column, but passes an
    # `inputs` request's strings on as base64 text (bytes); a Python caller may send str.
    model, _, _ = logged
    data = encode(sample_pixels(3), "PNG")
    text = base64.b64encode(data)
    wrapped = base64.encodebytes(data)  # MLflow's own encoder breaks lines every 76 characters
    answers = model.predict(frame(data, text, text.decode(), wrapped))
    assert len(set(answers["probability"])) == 1 and len(answers) == 4


# --- pixel arrays in ----------------------------------------------------------------------------

def test_pixel_arrays_of_any_size_and_channels_mixed_with_files(logged):
    model, _, _ = logged
    rgb = sample_pixels(4)
    images = [rgb, rgb[..., :1], rgb[..., 0], np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)]),
              draw("square", np.random.default_rng(5)), encode(rgb, "PNG")]
    together = model.predict(frame(*images))
    alone = [model.predict(frame(image)) for image in images]
    np.testing.assert_allclose(np.stack(together["probabilities"]),
                               np.concatenate([np.stack(a["probabilities"]) for a in alone]), atol=1e-6)
    # RGB pixels, the RGBA with its alpha dropped, and the PNG of them: the same network input.
    assert together["probability"][0] == together["probability"][3] == together["probability"][5]
    # Grayscale with and without a channel axis is the same picture.
    assert together["probability"][1] == together["probability"][2]
    # The network's own size goes in untouched.
    pixels = images[4].astype(np.float32)[None]
    np.testing.assert_array_equal(serving.to_network_input([images[4]], SIZE), pixels)


def test_a_bare_pixel_batch_is_refused_by_mlflow_and_taken_as_rows(logged):
    # docs/registry.md's "why": under a column signature MLflow makes a DataFrame of the input first.
    model, _, _ = logged
    batch = np.stack([sample_pixels(6), sample_pixels(7)])
    with pytest.raises(MlflowException, match="Must pass 2-d input"):
        model.predict(batch)
    rows = model.predict(image_rows(batch))
    assert len(rows) == 2 and set(rows["label"]) <= set(CLASSES)
    # Called unwrapped the model takes the batch as it is (an old-style caller of the Python class).
    unwrapped = model.unwrap_python_model().predict(None, batch)
    assert list(unwrapped["probability"]) == list(rows["probability"])


def test_zero_images_in_zero_answers_out(logged):
    model, _, _ = logged
    out = model.predict(frame(*[]).astype(object))
    assert len(out) == 0 and list(out.columns) == ["label", "probability", "probabilities"]


# --- what is not an image -----------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    (b"not an image", r"image at index 1 is not an image file that Pillow can read .*b'not an image'"),
    (b"", r"image at index 1 is not an image file .*: 0 bytes"),
    (base64.b64encode(b"%PDF-1.4 a pdf"), r"image at index 1 is not an image file .*b'JVBERi0xLjQgYSBw'"),
    (encode(np.zeros((40, 40, 3), np.uint8), "JPEG")[:200], r"(?i)image at index 1 is not an image file .*truncated"),
    (np.array([[b"255"]]), r"image at index 1 is an array of \|S3 shaped \(1, 1\): expected an image file's bytes"),
    (3.5, r"image at index 1 is a float: expected an image file's bytes"),
    (np.zeros((4, 4, 2), np.uint8), r"image at index 1: expected pixels shaped \(H, W, C\) with C in 1, 3, 4"),
])
def test_a_non_image_is_the_callers_error_naming_which(logged, value, message):
    model, _, _ = logged
    with pytest.raises(MlflowException, match=message) as raised:
        model.predict(frame(encode(sample_pixels(8), "PNG"), value))
    # INVALID_PARAMETER_VALUE: MLflow's scoring server answers it with HTTP 400 and the message.
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE" and raised.value.get_http_status_code() == 400


def test_an_older_model_without_the_image_column_still_predicts_through_tlkit_predict(logged, tmp_path):
    """A model logged before the `image` column took a uint8 (N, H, W, C) tensor: `tlkit predict`
    sends it one array per image size."""
    import shutil

    from mlflow.models import Model
    from mlflow.types import Schema, TensorSpec

    _, folder, _ = logged
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    meta = Model.load(str(old / "MLmodel"))
    meta.signature.inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))])
    meta.save(str(old / "MLmodel"))
    paths = write_formats(tmp_path)
    assert registry.load(str(old)).metadata.get_input_schema().is_tensor_spec()
    by_size, together = (registry.predict(str(f), [str(p) for p in paths]) for f in (old, folder))
    assert [label for _, label, _ in by_size] == [label for _, label, _ in together]
    # One network call per image size against one for all: float sums in another order.
    np.testing.assert_allclose([p for _, _, p in by_size], [p for _, _, p in together], atol=1e-6)


# --- the REST server ----------------------------------------------------------------------------

def cifar_jpegs(folder: Path) -> list[Path]:
    """The first test JPEG of CIFAR-10's airplane and automobile classes, as stored in the archive."""
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"{CIFAR_ARCHIVE} not present (the real CIFAR-10 JPEGs, ../shared/data/README.md)")
    wanted = {"cifar10/test/airplane/0000.jpg", "cifar10/test/automobile/0000.jpg"}
    found = []
    with tarfile.open(CIFAR_ARCHIVE, "r|gz") as archive:  # the test split comes first: stop early
        for member in archive:
            if member.name in wanted:
                path = folder / member.name.replace("/", "_")
                path.write_bytes(archive.extractfile(member).read())
                found.append(path)
                if len(found) == len(wanted):
                    break
    assert len(found) == 2, found
    return found


def post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.e2e
def test_the_served_champion_answers_base64_files_as_tlkit_predict_does(image_folder, tracking, tmp_path):
    def cli(*args):
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    # ImageNet's weights: a model that tells the shapes apart, so that its probabilities differ per image.
    if not VGG16_WEIGHTS.exists():
        pytest.skip(f"{VGG16_WEIGHTS} not present (../shared/data/README.md)")
    cli("train", "baseline", "--data", str(image_folder), "--weights", str(VGG16_WEIGHTS), "--epochs", "5",
        "--batch-size", "8")
    assert "is now @champion" in cli("promote")
    name = f"{image_folder.name}-vgg16"
    # Two real CIFAR-10 JPEGs and a PNG of another size, with alpha: every request resizes one.
    png = tmp_path / "circle.png"
    circle = draw("circle", np.random.default_rng(9), 48)
    png.write_bytes(encode(np.dstack([circle, np.full((48, 48), 200, np.uint8)]), "PNG"))
    files = [*cifar_jpegs(tmp_path), png]
    lines = [line.split("\t") for line in cli("predict", "--model", f"models:/{name}@champion",
                                              *map(str, files)).strip().splitlines()]
    assert [line[0] for line in lines] == [str(f) for f in files]
    expected = registry.predict(f"models:/{name}@champion", [str(f) for f in files])  # what the CLI printed
    assert [[str(p), label, f"{probability:.4f}"] for p, label, probability in expected] == lines
    assert expected[2][1] == "circle"  # the RGBA PNG, alpha dropped and resized, is what it shows

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  env=clean_env(MLFLOW_TRACKING_URI=tracking), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, 180, log)
        encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]  # what `base64 -w0 FILE` prints
        bodies = [{"dataframe_records": [{"image": e} for e in encoded]},  # the README's form
                  {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
                  {"inputs": {"image": encoded}}]
        answers = [post(port, body) for body in bodies]
        bad = post(port, {"dataframe_records": [{"image": encoded[0]},
                                                {"image": base64.b64encode(b"just text").decode()}]})
        after = post(port, bodies[0])  # the server goes on serving
    finally:
        stop(server)
    for status, answer in answers + [after]:
        assert status == 200, answer
        predictions = answer["predictions"]
        assert [p["label"] for p in predictions] == [label for _, label, _ in expected]
        np.testing.assert_allclose([p["probability"] for p in predictions], [p for _, _, p in expected], atol=1e-6)
        assert all(len(p["probabilities"]) == len(CLASSES) for p in predictions)
    status, error = bad
    assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE", error
    ours = error["message"].split("Error: ")[-1]  # MLflow puts the request's data before it
    assert ours.startswith("image at index 1 is not an image file that Pillow can read"), ours
    assert ours.endswith("9 bytes starting b'just text'") and "Traceback" not in json.dumps(error), ours
