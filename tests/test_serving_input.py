"""Serving's input handling without training, beside tests/test_serving.py.

test_serving.py tests the logged model's contract (the binary `image` column: image files' bytes,
base64, pixel arrays, the signature and input example, refusals of what is not an image, the REST
server). This file tests what lies under and around it with a network whose answers are known:
serving.to_network_input (resizing, channels, values), the pyfunc's answers on pixel rows (labels,
probabilities, chunking, the dtypes and shapes a pixel row may have), and registry's image reading,
predict, load and download.

The model is conftest's tiny_network (a colour reader with fixed weights), logged once by tlkit's own
tracking.log_model into a throw-away store and downloaded to a folder, as `tlkit download` leaves it.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from tlkit import data, registry, serving, sources
from tlkit.registry import RegistryError

from conftest import CLASSES, image_rows, using_tracking

RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)


def flat(colour, n: int = 1, height: int = 32, width: int = 32, alpha: bool = False) -> np.ndarray:
    """n images of one colour, uint8 (n, height, width, 3), or 4 channels (opaque) with alpha."""
    pixel = tuple(colour) + ((255,) if alpha else ())
    return np.broadcast_to(np.array(pixel, np.uint8), (n, height, width, len(pixel))).copy()


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_network):
    """(the pyfunc loaded from a downloaded folder, that folder)."""
    import mlflow

    from tlkit import spec as specs, tracking

    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as patch, using_tracking(f"sqlite:///{root}/mlflow.db", root, patch):
        with mlflow.start_run() as run:
            tracking.log_model(tiny_network, list(CLASSES), np.zeros((1, 32, 32, 3), np.uint8), specs.DEFAULTS)
        folder = registry.download(f"runs:/{run.info.run_id}/model", str(root / "model"))
    return registry.load(str(folder)), folder


# --- to_network_input ------------------------------------------------------------------------------

def test_pixels_at_the_networks_size_pass_unchanged_as_float32():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    pixels = serving.to_network_input(images, 32)
    assert pixels.dtype == np.float32 and pixels.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(pixels, images)  # 0..255: the network scales them itself


@pytest.mark.parametrize("shape", [(2, 45, 37, 3), (2, 45, 37, 1), (1, 8, 8, 3), (2, 32, 50, 3)])
def test_other_sizes_are_resized_as_training_resizes(shape):
    """The same PIL bilinear resize as data loading: a served image is the image the model trained on."""
    images = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    pixels = serving.to_network_input(images, 32)
    assert pixels.shape == (shape[0], 32, 32, 3) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, data._fit_images(images, 32).astype(np.float32))


def test_grey_without_a_channel_axis_and_rgba_become_rgb():
    grey = np.random.default_rng(2).integers(0, 256, (2, 32, 32)).astype(np.uint8)
    np.testing.assert_array_equal(serving.to_network_input(grey, 32), np.repeat(grey[..., None], 3, axis=-1))
    rgba = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 4)).astype(np.uint8)
    np.testing.assert_array_equal(serving.to_network_input(rgba, 32), rgba[..., :3])  # alpha dropped


def test_a_flat_colour_stays_that_colour_through_the_resize():
    pixels = serving.to_network_input(flat((10, 200, 90), 2, 70, 50), 32)
    np.testing.assert_array_equal(pixels, np.broadcast_to(np.float32([10, 200, 90]), (2, 32, 32, 3)))


@pytest.mark.parametrize("images", [np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0, 20, 20, 3), np.uint8), []],
                         ids=["the network's size", "another size", "an empty list"])
def test_no_images_is_no_rows(images):
    pixels = serving.to_network_input(images, 32)
    assert pixels.shape == (0, 32, 32, 3) and pixels.dtype == np.float32


@pytest.mark.parametrize("shape", [(32, 32, 2), (32, 32, 5), (2, 32, 32, 3), (1, 2, 32, 32, 3), (5,), ()])
def test_an_image_of_another_shape_is_refused_naming_its_index_and_shape(shape):
    """The caller's error (INVALID_PARAMETER_VALUE: HTTP 400 from MLflow's server), not a crash in resizing."""
    images = [flat(RED)[0], np.zeros(shape, np.uint8)]
    with pytest.raises(MlflowException) as error:
        serving.to_network_input(images, 32)
    assert error.value.message == f"image at index 1: expected pixels shaped (H, W, C) with C in 1, 3, 4; got {shape}"
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"


# --- the logged pyfunc -------------------------------------------------------------------------------

def test_the_pyfunc_answers_label_probability_and_probabilities_in_class_order(logged, tiny_network):
    model, _ = logged
    assert model.metadata.metadata["class_names"] == list(CLASSES)
    images = np.concatenate([flat(BLUE), flat(RED), flat(GREEN)])
    out = model.predict(image_rows(images))
    assert list(out.columns) == ["label", "probability", "probabilities"]
    assert list(out["label"]) == ["stripes", "circle", "square"]  # the colour reader's answers
    want = tiny_network(images.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(np.stack(out["probabilities"]), want, atol=1e-6)
    np.testing.assert_allclose(out["probability"], want.max(axis=1), atol=1e-6)
    assert out["probability"].dtype == np.float64 and all(isinstance(p, float) for p in out["probabilities"][0])
    assert out["probability"].min() > 0.99


@pytest.mark.parametrize("images, label", [
    (flat(GREEN, 2, 50, 70), "square"),  # another size
    (flat(RED, 1, 20, 20), "circle"),  # smaller
    (flat(BLUE, 2, 32, 32, alpha=True), "stripes"),  # RGBA
])
def test_the_pyfunc_takes_any_size_and_rgba(logged, images, label):
    model, _ = logged
    out = model.predict(image_rows(images))
    assert list(out["label"]) == [label] * len(images)


def test_grey_images_give_every_class_the_same_probability(logged):
    model, _ = logged
    out = model.predict(image_rows(np.full((2, 24, 24, 1), 128, np.uint8)))  # equal channels: nothing to tell apart
    np.testing.assert_allclose(np.stack(out["probabilities"]), 1 / 3, atol=1e-6)


def test_a_large_request_in_chunks_is_the_same_as_one_call(logged, tiny_network):
    model, _ = logged
    count = 2 * serving.ONE_CALL_IMAGES + 5
    images = np.random.default_rng(4).integers(0, 256, (count, 32, 32, 3)).astype(np.uint8)
    out = model.predict(image_rows(images))
    assert len(out) == count
    want = tiny_network(images.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(np.stack(out["probabilities"]), want, atol=1e-6)
    assert list(out["label"]) == [CLASSES[i] for i in want.argmax(axis=1)]


@pytest.mark.parametrize("size", [32, 45], ids=["the network's size", "resized"])
def test_pixel_rows_of_other_dtypes_and_nested_lists_are_the_same_image(logged, size):
    """Values 0..255 in any integer or float dtype, or as nested lists (pixels in a JSON request), read as
    the uint8 image does: the binary signature leaves a row's pixel array to the model."""
    model, _ = logged
    image = np.random.default_rng(6).integers(0, 256, (size, size, 3)).astype(np.uint8)
    image[..., 1] //= 2
    image[..., 2] //= 4  # mostly red, and not so much that the answer saturates: a wrong scale would show
    rows = [image, image.astype(np.float32), image.astype(np.float64), image.astype(np.int64),
            image.astype(np.uint16), image.tolist()]
    out = model.predict(image_rows(rows))
    want = model.predict(image_rows([image]))["probabilities"][0]
    assert 0.5 < want[0] < 0.99 and list(out["label"]) == ["circle"] * len(rows)
    for answer in out["probabilities"]:
        np.testing.assert_allclose(answer, want, atol=1e-6)


@pytest.mark.parametrize("row", [flat(RED, 2), flat(RED, 1)[None]], ids=["a batch in one row", "5-d"])
def test_a_row_holding_more_than_one_image_is_refused_naming_it(logged, row):
    """Pixel arrays go one per row (image_rows); a whole (N, H, W, C) batch in one row is the caller's error."""
    model, _ = logged
    with pytest.raises(MlflowException) as error:
        model.predict(image_rows([flat(RED)[0], row]))
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"
    assert error.value.message == ("image at index 1: expected pixels shaped (H, W, C) with C in 1, 3, 4; "
                                   f"got {row.shape}")


# --- registry: reading image files, predict, load, download --------------------------------------------

@pytest.mark.parametrize("mode, size, colour", [
    ("RGB", (40, 30), (200, 60, 10)),
    ("L", (20, 20), (200, 200, 200)),
    ("RGBA", (17, 33), (200, 60, 10)),
    ("P", (32, 32), (204, 51, 0)),  # a colour of PIL's web palette: kept exactly
    ("I;16", (24, 24), (200, 200, 200)),  # the top 8 bits, as training reads them, not clipped to white
])
def test_read_image_gives_uint8_rgb_at_the_files_own_size(mode, size, colour, tmp_path):
    path = tmp_path / "image.png"
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], colour[0] * 257, np.uint16)).save(path)
    else:
        Image.new("RGB", size, colour).convert(mode).save(path)
    with Image.open(path) as written:
        assert written.mode == mode
    pixels = registry.read_image(str(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (size[1], size[0], 3)
    np.testing.assert_array_equal(pixels, np.broadcast_to(np.uint8(colour), pixels.shape))


def test_read_image_decodes_as_training_does(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(path, quality=90)
    np.testing.assert_array_equal(registry.read_image(str(path)), sources.read_image(str(path), 32))


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "does not exist"),
    (lambda p: (p.write_bytes(b"\x89PNG\r\n\x1a\n truncated"), p)[1], "cannot be read"),
    (lambda p: (p.write_text("not an image"), p)[1], "cannot be read: not an image file that Pillow can read"),
    (lambda p: (p.mkdir(), p)[1], "cannot be read"),
], ids=["missing", "truncated png", "text", "a folder"])
def test_read_image_names_a_file_it_cannot_use(make, message, tmp_path):
    path = make(tmp_path / "x.png")
    with pytest.raises(RegistryError) as error:
        registry.read_image(str(path))
    assert str(error.value).startswith(f"image {path} ") and message in str(error.value)


def test_predict_answers_in_the_order_given_across_sizes(logged, tmp_path):
    _, folder = logged
    files = []
    for name, colour, size in (("a.png", RED, 32), ("b.jpg", BLUE, 64), ("c.png", GREEN, 32), ("d.png", RED, 20)):
        files.append(str(tmp_path / name))
        Image.new("RGB", (size, size), colour).save(files[-1])
    answers = registry.predict(str(folder), files)
    assert [(path, label) for path, label, _ in answers] == list(zip(files, ["circle", "stripes", "square", "circle"]))
    assert all(isinstance(p, float) and 0.99 < p <= 1.0 for _, _, p in answers)


def test_predict_checks_every_image_before_loading_the_model(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(RegistryError, match=r"image .*missing\.png does not exist"):
        registry.predict("/no/such/model", [str(tmp_path / "ok.png"), str(tmp_path / "missing.png")])


def test_load_names_a_model_that_is_not_there(tracking, tmp_path):
    for uri, detail in (("runs:/0123456789abcdef0123456789abcdef/model", "not found"),
                        ("models:/nope@champion", "nope"),
                        (str(tmp_path), "MLmodel")):
        with pytest.raises(RegistryError) as error:
            registry.load(uri)
        assert str(error.value).startswith(f"model {uri}: ") and detail in str(error.value)
        assert "\n" not in str(error.value)


def test_download_refuses_a_folder_in_use_and_leaves_none_behind(tracking, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(RegistryError, match="is not empty: choose a new or empty folder"):
        registry.download("models:/nope@champion", str(used))
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    with pytest.raises(RegistryError, match="model models:/nope@champion: "):
        registry.download("models:/nope@champion", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # no empty folder left behind


@pytest.mark.parametrize("pixels, message", [
    (np.full((32, 32, 3), 300, np.int32), "pixel values must lie in 0..255 (8-bit), got 300..300"),
    (np.full((16, 16, 3), -40, np.int32), "pixel values must lie in 0..255 (8-bit), got -40..-40"),
    (np.full((32, 32, 3), 40000, np.uint16), "pixel values must lie in 0..255 (8-bit), got 40000..40000"),
    (np.full((20, 20, 3), np.nan, np.float32), "holds NaN or infinite values"),
    (np.zeros((0, 0, 3), np.uint8), "has no pixels: shape (0, 0, 3)"),
])
def test_pixel_rows_outside_8_bit_values_are_refused_at_any_size(pixels, message):
    """At the network's size or resized, the same rule: 8-bit values, finite, at least one pixel."""
    with pytest.raises(MlflowException, match=re.escape("image at index 0") + ".*" + re.escape(message)):
        serving.to_network_input([pixels], 32)
