"""A logged model exported as SavedModel (TF Serving), ONNX (onnxruntime) or LiteRT (a phone), each
file checked against the logged model before the export succeeds.

The exporters are Keras 3's own (`Model.export`: format "tf_saved_model"; "onnx" through tf2onnx
under the TensorFlow backend; "litert" through TensorFlow's TFLite converter), applied to the
logged end-to-end network: preprocessing (scale, channel swap, mean) is inside it, as in the
logged model, so every exported graph takes raw RGB pixels, float32 in 0..255. Resizing is not in
the graph: it takes the network's fixed size, (N, size, size, 3), and a caller resizes first, as
the logged model does (PIL bilinear: serving.network_pixels).

The check: each file runs in its own runtime (TensorFlow for SavedModel, onnxruntime for ONNX,
ai-edge-litert's interpreter for LiteRT) on a sample of the run's test images, resized as the
logged model resizes them, and its probabilities are compared with the logged pyfunc's on the
same images: the largest difference of any class probability, and top-1 agreement on the images
whose top-two margin (logged model) exceeds that difference (where the two may not disagree).

Artifacts written to DST: saved_model/, model.onnx, model.tflite, and export.json (input shape,
class names, what each check measured). With log=True the checks go to the tracking store: a
models:/ URI's version gets tags and its run the files (artifacts exported/), and the registered
model's description names the formats; a runs:/ URI's run gets both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tlkit import serving
from tlkit.data import IMAGE_EXTENSIONS
from tlkit.registry import RegistryError, load, read_image

log = logging.getLogger(__name__)

# Format -> (the file or folder written in DST, Keras' name of the format, the modules it needs
# beyond TensorFlow: import name -> pip name).
FORMATS = {
    "saved_model": ("saved_model", "tf_saved_model", {}),
    "onnx": ("model.onnx", "onnx", {"tf2onnx": "tf2onnx", "onnx": "onnx", "onnxruntime": "onnxruntime"}),
    "litert": ("model.tflite", "litert", {"ai_edge_litert": "ai-edge-litert"}),
}
SAMPLE_IMAGES = 64  # test images each check runs on
# float32 through another runtime's kernels: measured ~1e-7..1e-6 on MobileNetV3Small and VGG16;
# a difference of 1e-4 is a different computation, not rounding.
TOLERANCE = 1e-4
EXPORTED_ARTIFACTS = "exported"  # the folder of the run's artifacts holding the files (log=True)
DESCRIPTION_MARK = "Exported formats (tlkit export):"


class ExportError(RuntimeError):
    """An export that cannot be made or that fails its own check: one line saying which and why."""


@dataclass
class Parity:
    format: str
    path: str
    images: int  # images compared
    max_difference: float  # largest |probability difference|, any image, any class
    decided: int  # images whose logged top-two margin exceeds max_difference
    top1_agreement: float  # share of `decided` with the same top-1 class (1.0 when none is decided)
    passed: bool


def missing_exporters(formats) -> str:
    """'' if every module the formats need imports here; else the one line saying what to install."""
    missing = sorted({pip for fmt in formats for module, pip in FORMATS[fmt][2].items()
                      if importlib.util.find_spec(module) is None})
    if not missing:
        return ""
    return (f"--format {','.join(formats)} needs {', '.join(missing)}, not installed: "
            "pip install 'tlkit[export]'")


# --- what is exported and checked on -------------------------------------------------------------

def _network(model):
    """The logged end-to-end Keras network and class names inside the pyfunc (serving.py)."""
    inner = model.unwrap_python_model()
    if not hasattr(inner, "network"):
        raise ExportError(f"this model is not tlkit's image classifier (serving.py): {type(inner).__name__}")
    return inner.network, list(inner.class_names)


def _source_run(model_uri: str, model) -> tuple[str, object | None]:
    """(the run that logged the model or '', the registered version for a models:/ URI or None)."""
    import mlflow

    found = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/([^/]+))/?", model_uri)
    if not found:
        return model.metadata.run_id or "", None
    client = mlflow.MlflowClient()
    name, alias, number = found.groups()
    if alias:
        version = client.get_model_version_by_alias(name, alias)
    elif number == "latest":
        version = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    else:
        version = client.get_model_version(name, number)
    return version.run_id or "", version


def _evenly(items, count: int):
    """`count` items spread over the whole list (every class of a sorted folder), in order."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def image_files(folder: Path) -> list[Path]:
    """Image files under folder, recursively, sorted: what training reads (data.IMAGE_EXTENSIONS)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def sample_images(source: str, count: int) -> list[np.ndarray]:
    """uint8 (H, W, 3) images at their own size from `source`: an image folder (its test/ split if it
    has one) or an .npz file's x_test; `count` of them, spread over the whole split."""
    path = Path(source).expanduser()
    if path.is_dir():
        split = path / "test" if (path / "test").is_dir() else path
        files = image_files(split)
        if not files:
            raise ExportError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {split}")
        return [read_image(str(f)) for f in _evenly(files, count)]
    if path.suffix.lower() == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            if "x_test" not in npz.files:
                raise ExportError(f"{path} has no x_test array")
            x = npz["x_test"]
        return [np.asarray(image, np.uint8) for image in _evenly(list(x), count)]
    raise ExportError(f"test images {source}: not an image folder or an .npz file here")


def _test_source(run_id: str, images: str | None) -> str:
    """Where the sample comes from: --images, else the run's `data` parameter."""
    if images:
        return images
    if not run_id:
        raise ExportError("this model names no run to take test images from: pass --images FOLDER")
    import mlflow

    data = mlflow.MlflowClient().get_run(run_id).data.params.get("data", "")
    if not data or data == "cifar10" or not Path(data).expanduser().exists():
        raise ExportError(f"run {run_id}'s test images (data={data or '?'}) are not readable here "
                          "(the keras download, or a path of another machine): pass --images FOLDER or FILE.npz")
    return data


# --- the three runtimes --------------------------------------------------------------------------

def _run_saved_model(path: Path, pixels: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return np.asarray(loaded.serve(tf.constant(pixels)))


def _run_onnx(path: Path, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels})[0]


def _run_litert(path: Path, pixels: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    given = interpreter.get_input_details()[0]
    # The converter fixes the batch at 1 in `shape` (its signature keeps -1): resized to the sample.
    interpreter.resize_tensor_input(given["index"], list(pixels.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(given["index"], pixels)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


RUNTIMES = {"saved_model": _run_saved_model, "onnx": _run_onnx, "litert": _run_litert}


def compare(fmt: str, path: Path, logged: np.ndarray, exported: np.ndarray, tolerance: float) -> Parity:
    """The exported file's probabilities against the logged model's, on the same images."""
    exported = np.asarray(exported, np.float64)
    if exported.shape != logged.shape:
        raise ExportError(f"{fmt}: the exported file answered shape {exported.shape}, the logged model {logged.shape}")
    difference = float(np.max(np.abs(exported - logged))) if logged.size else 0.0
    top_two = np.sort(logged, axis=1)[:, -2:] if logged.shape[1] > 1 else np.zeros((len(logged), 2))
    decided = (top_two[:, 1] - top_two[:, 0]) > difference
    agree = exported.argmax(axis=1) == logged.argmax(axis=1)
    agreement = float(np.mean(agree[decided])) if decided.any() else 1.0
    return Parity(fmt, str(path), len(logged), difference, int(decided.sum()), agreement,
                  bool(difference <= tolerance and agreement == 1.0))


@contextlib.contextmanager
def _quiet_converters():
    # tf2onnx logs a traceback at WARNING when one of its optional graph optimisers gives up on a
    # node (seen on MobileNetV3's hard-swish); the graph is still converted, and the check says
    # whether it answers right.
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Keras' tf2onnx patch probes np.object, which numpy 2 warns about.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*np.object.*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_one(network, fmt: str, target: Path) -> None:
    import tensorflow as tf

    size = int(network.input_shape[1])
    # The batch is free, the image size fixed: the network's own (what it was trained at).
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels")]
    with _quiet_converters():
        network.export(str(target), format=FORMATS[fmt][1], verbose=False, input_signature=signature)


# --- the command ---------------------------------------------------------------------------------

@dataclass
class Exported:
    model_uri: str
    run_id: str
    version: str  # the registered version for a models:/ URI, else ''
    dst: Path
    input: str  # what every exported graph takes, in words
    checks: list  # Parity per format


def export(model_uri: str, formats: list[str], dst: str, *, images: str | None = None,
           sample: int = SAMPLE_IMAGES, tolerance: float = TOLERANCE, log_to_store: bool = False) -> Exported:
    """Export the model at model_uri in every format of `formats` into dst (new or empty), each
    checked against the logged model (Parity) before anything is kept; with log_to_store the checks
    and files go to the tracking store (module docstring)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise RegistryError(f"--format {','.join(unknown) or '(none)'}: choose from {', '.join(FORMATS)}")
    missing = missing_exporters(formats)
    if missing:
        raise ExportError(missing)
    target = Path(dst)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RegistryError(f"--dst {dst} is not a new or empty folder")
    if sample < 1:
        raise RegistryError(f"--sample must be 1 or more images, got {sample}")

    model = load(model_uri)
    network, class_names = _network(model)
    run_id, version = _source_run(model_uri, model)
    size = int(network.input_shape[1])
    raw = sample_images(_test_source(run_id, images), sample)
    # What the logged model answers, through its own predict (decoding aside: these are pixels).
    logged = np.stack(model.predict(serving_rows(raw))["probabilities"]).astype(np.float64)
    pixels = serving.to_network_input(raw, size)  # resized as the logged model resizes them
    shape = f"float32 (N, {size}, {size}, 3) RGB pixels in 0..255 (resize to {size}x{size} first: PIL bilinear)"

    made = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    checks = []
    try:
        with tempfile.TemporaryDirectory(prefix=".tlkit-export-", dir=target) as scratch:
            for fmt in formats:
                built = Path(scratch) / FORMATS[fmt][0]
                _export_one(network, fmt, built)
                parity = compare(fmt, target / FORMATS[fmt][0], logged, RUNTIMES[fmt](built, pixels), tolerance)
                log.info("%s: largest probability difference %.2g on %d test images; top-1 agreement %.4f on the "
                         "%d whose top-two margin exceeds it", fmt, parity.max_difference, parity.images,
                         parity.top1_agreement, parity.decided)
                if not parity.passed:
                    raise ExportError(
                        f"{fmt} export does not answer as the logged model: largest probability difference "
                        f"{parity.max_difference:.3g} (tolerance {tolerance:g}), top-1 agreement "
                        f"{parity.top1_agreement:.4f} on {parity.decided} images; nothing written")
                checks.append(parity)
            for fmt in formats:  # every check passed: the files move into place together
                shutil.move(str(Path(scratch) / FORMATS[fmt][0]), str(target / FORMATS[fmt][0]))
        result = Exported(model_uri, run_id, str(version.version) if version else "", target, shape, checks)
        (target / "export.json").write_text(json.dumps(
            {"model": model_uri, "run_id": run_id, "version": result.version, "input": shape,
             "input_name": "pixels", "image_size": size, "output": "class probabilities (N, classes), in class order",
             "class_names": class_names, "checks": [asdict(c) for c in checks]}, indent=1))
    except BaseException:
        if made:
            shutil.rmtree(target, ignore_errors=True)
        else:
            for fmt in formats:
                _remove(target / FORMATS[fmt][0])
        raise
    if log_to_store:
        _log(result, version)
    return result


def serving_rows(images):
    import pandas as pd

    return pd.DataFrame({serving.COLUMN: pd.Series(list(images), dtype=object)})


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _tags(checks) -> dict:
    tags = {}
    for c in checks:
        tags[f"export_{c.format}_max_difference"] = f"{c.max_difference:.3g}"
        tags[f"export_{c.format}_top1_agreement"] = f"{c.top1_agreement:.4f} of {c.decided}"
        tags[f"export_{c.format}_images"] = str(c.images)
    tags["export_formats"] = ",".join(c.format for c in checks)
    return tags


def _log(result: Exported, version) -> None:
    """The checks as tags, the files as artifacts of the run; for a version, its model's description."""
    import mlflow

    client = mlflow.MlflowClient()
    tags = _tags(result.checks)
    if result.run_id:
        for c in result.checks:
            exported = Path(c.path)
            if exported.is_dir():
                client.log_artifacts(result.run_id, str(exported), f"{EXPORTED_ARTIFACTS}/{exported.name}")
            else:
                client.log_artifact(result.run_id, str(exported), EXPORTED_ARTIFACTS)
        client.log_artifact(result.run_id, str(result.dst / "export.json"), EXPORTED_ARTIFACTS)
    if version is None:
        if not result.run_id:
            raise ExportError("--log: this model names no run to log to (a local folder)")
        for key, value in tags.items():
            client.set_tag(result.run_id, key, value)
        return
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    formats = ", ".join(c.format for c in result.checks)
    line = (f"{DESCRIPTION_MARK} version {version.version}: {formats}; input {result.input}; files in run "
            f"{result.run_id}'s artifacts {EXPORTED_ARTIFACTS}/.")
    registered = client.get_registered_model(version.name)
    kept = [row for row in (registered.description or "").splitlines()
            if not row.startswith(f"{DESCRIPTION_MARK} version {version.version}:")]
    client.update_registered_model(version.name, description="\n".join([*kept, line]).strip())
