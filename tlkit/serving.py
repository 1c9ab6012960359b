"""The logged model: images in, class names and probabilities out (an MLflow pyfunc).

MLflow logs this file as code ("models from code"): nothing is pickled, and the model loads
wherever tensorflow, mlflow and pillow are installed, without tlkit. It wraps the end-to-end Keras
network (preprocessing inside), saved as `model.keras`, and the class names beside it.

Input, in any of these forms:
- a uint8 (or any 8-bit-valued) array of images, (N, H, W, C) with C = 3, 1 or 4:
  what a Keras user has in hand, `model.predict(images)`;
- a DataFrame with one column, `image` (or a dict {"image": [...]}, or records [{"image": ...}]), each
  row either the bytes of an image file (JPEG, PNG, BMP, GIF, WebP: whatever Pillow reads), as bytes or
  as base64 text (what a JSON request to `mlflow models serve` carries), decoded here exactly as
  `tlkit predict` decodes a file, or a pixel array (H, W, C) with C = 1, 3 or 4, or (H, W).
Any H and W: every image is resized to the network's size. Output: a DataFrame with `label`,
`probability` and `probabilities` (one per class, in class order).

Why the logged signature names outputs only: MLflow (3.17.2) checks the input against the
signature's input schema before this model sees it (PyFuncModel._predict -> _enforce_schema,
mlflow/models/utils.py), and under any column schema it first makes a DataFrame of an array, which
pandas refuses for a 4-D one ("Must pass 2-d input"); a tensor schema instead refuses the column of
file bytes, and a signature from type hints makes the scoring server refuse `dataframe_split` and
`dataframe_records` requests. No schema can take both, so the model logs none for its input, and
MLflow passes every form through to predict here, which checks it (one-line errors naming the
image at fault) and base64-decodes request text itself (file_bytes). The input example (PNG files'
bytes in the `image` column) shows the request form; the model's metadata says the rest.

tlkit imports from here: `tlkit predict` (registry.read_image) decodes a file with `decode`, and
training (sources.read_image) converts colours with `to_rgb`. So the served model reads a file's bytes
exactly as `tlkit predict` reads the file, with training's colour conversion.
"""

import base64
import binascii
import io
import json

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from PIL import Image

COLUMN = "image"  # the input column's name, in the logged signature
ONE_CALL_IMAGES = 64  # images per call of the network: a request of more goes in chunks of this
# What Pillow raises for a truncated, corrupt or unknown file (UnidentifiedImageError is an OSError),
# or one of more pixels than Image.MAX_IMAGE_PIXELS allows (a decompression bomb).
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; alpha is dropped. No EXIF rotation: pixels as stored."""
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        # 16-bit greyscale: PIL's own conversion clips at 255 (most pixels turn white),
        # so keep the top 8 bits instead.
        pixels = np.clip(np.asarray(image), 0, 65535) >> 8
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids PIL's warning about palette transparency.
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode(data: bytes) -> np.ndarray:
    """An image file's bytes -> uint8 (H, W, 3) at the file's own size (the model resizes).
    Raises one of UNREADABLE for bytes that are not an image Pillow reads."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(to_rgb(image))


def file_bytes(value) -> bytes:
    """A row of the image column -> the file's bytes. MLflow's scoring server base64-decodes a
    binary column for `dataframe_split` and `dataframe_records` requests, but passes an `inputs` or
    `instances` request's strings on as their base64 text; a Python caller may send either."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    try:
        # Base64 first: an image file's own bytes are not valid base64, since its header and compressed
        # data hold bytes outside that alphabet (a JPEG starts ff d8, a PNG 89, a BMP has zero bytes).
        return base64.b64decode(b"".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        return raw


def to_pixels(value, index: int) -> np.ndarray:
    """A row of the image column -> its pixels; what is not an image is the caller's error (MLflow's
    scoring server answers an MlflowException of INVALID_PARAMETER_VALUE with HTTP 400 and its message)."""
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        data = file_bytes(value)
        try:
            return decode(data)
        except UNREADABLE as err:
            # Pillow's message for an unknown format names only an in-memory file object. The bytes
            # quoted are the file's, after base64 decoding where the row was base64 text.
            why = "" if isinstance(err, Image.UnidentifiedImageError) else f" ({err})"
            sent = value.encode() if isinstance(value, str) else bytes(value)
            decoded = " (base64-decoded)" if data != sent else ""
            raise MlflowException.invalid_parameter_value(
                f"image at index {index} is not an image file that Pillow can read (JPEG, PNG, BMP, GIF, WebP, ...)"
                f"{why}: {len(data)} bytes{decoded} starting {data[:16]!r}") from None
    pixels = np.asarray(value) if isinstance(value, (np.ndarray, list, tuple)) else None
    if pixels is None or pixels.dtype.kind not in "buif":  # e.g. pixel JSON that MLflow made bytes of
        what = f"a {type(value).__name__}" if pixels is None else f"an array of {pixels.dtype} shaped {pixels.shape}"
        raise MlflowException.invalid_parameter_value(
            f"image at index {index} is {what}: expected an image file's bytes (base64 in a JSON request) "
            "or an (H, W, C) array of pixel values")
    return pixels


def network_pixels(image: np.ndarray, size: int, index: int = 0) -> np.ndarray:
    """One image's pixels, (H, W) or (H, W, C) with C = 1, 3 or 4 -> float32 (size, size, 3) in 0..255."""
    if image.ndim == 2:  # grayscale without a channel axis
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise MlflowException.invalid_parameter_value(
            f"image at index {index}: expected pixels shaped (H, W, C) with C in 1, 3, 4; got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise MlflowException.invalid_parameter_value(f"image at index {index} has no pixels: shape {image.shape}")
    # 8-bit pixel values, as the network was trained on: refused, not clipped, so that a 16-bit
    # array or a 0..1 float image's neighbour (NaN, negative values) never becomes a made-up answer.
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise MlflowException.invalid_parameter_value(f"image at index {index} holds NaN or infinite values")
    low, high = image.min(), image.max()
    if low < 0 or high > 255:
        raise MlflowException.invalid_parameter_value(
            f"image at index {index}: pixel values must lie in 0..255 (8-bit), got {low}..{high}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image.astype(np.uint8))
                           .resize((size, size), Image.BILINEAR))
    return image.astype(np.float32)


def to_network_input(images, size: int) -> np.ndarray:
    """Images, each (H, W[, C]) at any size (or a (N, H, W[, C]) array) -> float32 (N, size, size, 3)."""
    pixels = [network_pixels(np.asarray(image), size, i) for i, image in enumerate(images)]
    return np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.float32)


def rows_of(model_input):
    """The images of any input form (module docstring), one per item."""
    if isinstance(model_input, pd.DataFrame) or isinstance(model_input, dict):
        if COLUMN not in model_input:
            names = list(model_input.columns if isinstance(model_input, pd.DataFrame) else model_input)
            raise MlflowException.invalid_parameter_value(
                f"expected a column {COLUMN!r} of image files' bytes (base64 in JSON) or pixel arrays, or a uint8 "
                f"(N, H, W, 3) array of images; got columns {names[:10]}")
        return model_input[COLUMN]
    if isinstance(model_input, list) and model_input and all(isinstance(row, dict) for row in model_input):
        return [row.get(COLUMN) for row in model_input]  # records, as a JSON `instances` request holds them
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "buif" and model_input.ndim != 4:
        # (H, W, 3) would otherwise be read as H images of W pixels.
        raise MlflowException.invalid_parameter_value(
            f"an array of images must be (N, H, W, C); got shape {model_input.shape} (one image: image[None])")
    return model_input  # a batch of images, or a sequence of images or files' bytes


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        # safe_mode (Keras' default, stated): a Lambda layer's marshalled Python bytecode is refused.
        self.network = keras.saving.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
        with open(context.artifacts["class_names"]) as f:
            self.class_names = json.load(f)
        self.size = int(self.network.input_shape[1])

    # Annotated pd.DataFrame: MLflow infers no signature from the hint (tracking.log_model states the
    # outputs) and does not warn that there is none; predict takes the other forms too (rows_of).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = rows_of(model_input)
        pixels = to_network_input([to_pixels(value, i) for i, value in enumerate(rows)], self.size)
        # Direct calls, not network.predict: predict would first trace a graph for this network,
        # 0.2-0.6 s on a 2-core CPU against 0.06-0.1 s for a call on 2 images (VGG16 at 32x32), and
        # MLflow makes such a request itself when it logs the model. (tlkit's fastpath.predict does the
        # same; this file is bundled with the model and imports nothing of tlkit.)
        # 0 in, 0 out without a call: TensorFlow's convolution returns an empty batch at its input's shape,
        # which the bias then fails to add to.
        probabilities = np.concatenate([self.network(pixels[i:i + ONE_CALL_IMAGES], training=False).numpy()
                                        for i in range(0, len(pixels), ONE_CALL_IMAGES)]
                                       or [np.zeros((0, len(self.class_names)), np.float32)])
        best = probabilities.argmax(axis=1)
        return pd.DataFrame({
            "label": [self.class_names[i] for i in best],
            "probability": probabilities.max(axis=1).astype(float),
            "probabilities": [row.astype(float).tolist() for row in probabilities],
        })


mlflow.models.set_model(ImageClassifier())
