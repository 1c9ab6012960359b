"""The logged model: raw images in, class names and probabilities out (an MLflow pyfunc).

MLflow logs this file as code ("models from code"): nothing is pickled, and the model loads
wherever tensorflow, mlflow and pillow are installed, without tlkit. It wraps the end-to-end Keras
network (preprocessing inside), saved as `model.keras`, and the class names beside it.

Input: a numpy array of raw pixels, (N, H, W, C) with C = 1 (grayscale), 3 (RGB) or 4 (RGBA),
any H and W (resized to the network's size). Output: a DataFrame with `label`, `probability` and
`probabilities` (one per class, in class order).

tlkit imports from here: `tlkit predict` (registry.read_image) decodes a file with `decode`, and
training (data._read_image) converts colours with `to_rgb`.
"""

import io
import json

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

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


def to_network_input(images: np.ndarray, size: int) -> np.ndarray:
    """Batch of raw images -> float32 (N, size, size, 3) pixels in 0..255."""
    images = np.asarray(images)
    if images.ndim == 3:  # (N, H, W): grayscale without a channel axis
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected images shaped (N, H, W, C) with C in 1, 3, 4; got {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    elif images.shape[-1] == 4:
        images = images[..., :3]
    if images.shape[1:3] != (size, size):
        images = np.stack([np.asarray(Image.fromarray(np.clip(im, 0, 255).astype(np.uint8))
                                      .resize((size, size), Image.BILINEAR)) for im in images])
    return images.astype(np.float32)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        # safe_mode (Keras' default, stated): a Lambda layer's marshalled Python bytecode is refused.
        self.network = keras.saving.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
        with open(context.artifacts["class_names"]) as f:
            self.class_names = json.load(f)
        self.size = int(self.network.input_shape[1])

    # Annotated np.ndarray: MLflow then checks requests against the logged signature (uint8 images
    # of any size) and neither infers a schema from the hint nor warns that there is none.
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        pixels = to_network_input(model_input, self.size)
        # Direct calls, not network.predict: predict would first trace a graph for this network,
        # 0.2-0.6 s on a 2-core CPU against 0.06-0.1 s for a call on 2 images (VGG16 at 32x32), and
        # MLflow makes such a request itself when it logs the model. (tlkit's fastpath.predict does the
        # same; this file is bundled with the model and imports nothing of tlkit.)
        probabilities = np.concatenate([self.network(pixels[i:i + ONE_CALL_IMAGES], training=False).numpy()
                                        for i in range(0, max(len(pixels), 1), ONE_CALL_IMAGES)])  # 0 in, 0 out
        best = probabilities.argmax(axis=1)
        return pd.DataFrame({
            "label": [self.class_names[i] for i in best],
            "probability": probabilities.max(axis=1).astype(float),
            "probabilities": [row.astype(float).tolist() for row in probabilities],
        })


mlflow.models.set_model(ImageClassifier())
