"""Compare runs, promote the best to the Model Registry, and use the champion.

compare: the variant runs of an experiment (or of one suite), best test accuracy first.
promote: among FINISHED runs that logged a model and a test accuracy on one dataset digest, the
    best is registered under a model name (default `<dataset>-<base>`, e.g. `cifar10-vgg16`) and
    gets the alias `champion` only if it beats the champion's test accuracy on the same digest.
    A test accuracy measured on other images is no evidence either way, so runs on different
    digests never compete, and a champion tested on another digest is kept unless forced.
    Promoting twice in a row changes nothing: a run already registered is not registered again.
predict / download: the pyfunc in serving.py, from any model URI (`models:/NAME@champion`).

Every function talks to the tracking server named by MLflow's own rules (MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHAMPION = "champion"
FORMATS = ("table", "csv", "json")
# Columns of `compare`, in order; the table prints the first 12 characters of the digest.
COLUMNS = ("variant", "run_id", "status", "test_accuracy", "best_val_accuracy", "epochs_run", "duration_s",
           "dataset", "dataset_digest")


class RegistryError(ValueError):
    """Nothing to compare or promote, or a model URI that names nothing: one line saying which."""


# --- which runs -------------------------------------------------------------------------------

def experiment_id(name: str | None) -> str:
    """--experiment, else MLflow's current one ($MLFLOW_EXPERIMENT_NAME / _ID, else Default)."""
    import mlflow

    if name:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise RegistryError(f"no experiment named {name!r} at {mlflow.get_tracking_uri()}")
        return found.experiment_id
    from tlkit import tracking

    return tracking.experiment_id()


def _experiment_name(name: str | None) -> str:
    import mlflow

    return name or mlflow.get_experiment(experiment_id(None)).name


def variant_runs(experiment: str | None = None, suite: str | None = None, status: str | None = None) -> list:
    """Runs tagged with a variant; with `suite`, only that suite run's children."""
    import mlflow

    eid = experiment_id(experiment)
    where = "tags.variant != ''" + (f" and attributes.status = '{status}'" if status else "")
    if not suite:
        return mlflow.search_runs(experiment_ids=[eid], filter_string=where, output_format="list")
    # A suite's children are nested under it; a child that reports a deeper run (a tuner returns its
    # best trial) is tagged `suite` by the driver. Both count.
    found = {}
    for extra in (f"tags.mlflow.parentRunId = '{suite}'", f"tags.suite = '{suite}'"):
        for run in mlflow.search_runs(experiment_ids=[eid], filter_string=f"{where} and {extra}",
                                      output_format="list"):
            found[run.info.run_id] = run
    return list(found.values())


def logged_models(experiment_ids: list[str]) -> dict[str, object]:
    """run id -> the READY model named `model` that the run logged (MLflow 3 LoggedModel)."""
    import mlflow

    models = {}
    for model in mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list"):
        status = str(getattr(model.status, "name", model.status))
        if model.name == "model" and status.endswith("READY") and model.source_run_id:
            models[model.source_run_id] = model
    return models


# --- compare ----------------------------------------------------------------------------------

def _best_val_accuracy(client, run) -> float | None:
    """The best epoch's val_accuracy; a fine-tuned run has its epochs in its stage runs."""
    import mlflow

    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    if not history:
        stages = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                    filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.stage != ''")
        history = [m for stage in stages for m in client.get_metric_history(stage.info.run_id, "val_accuracy")]
    return max((m.value for m in history), default=None)


def _row(client, run) -> dict:
    metrics, tags = run.data.metrics, run.data.tags
    end = run.info.end_time
    return {
        "variant": tags.get("variant", ""),
        "run_id": run.info.run_id,
        "status": run.info.status,
        "test_accuracy": metrics.get("test_accuracy"),
        "best_val_accuracy": _best_val_accuracy(client, run),
        "epochs_run": int(metrics["epochs_run"]) if "epochs_run" in metrics else None,
        "duration_s": round((end - run.info.start_time) / 1000, 1) if end and run.info.start_time else None,
        "dataset": tags.get("dataset", ""),
        "dataset_digest": tags.get("dataset_digest", ""),
    }


def _rank(row: dict) -> tuple:
    # Best test accuracy first; runs without one (failed, running) last; ties: the earlier run id order.
    accuracy = row["test_accuracy"]
    return (accuracy is None, -(accuracy or 0.0), row["variant"], row["run_id"])


def compare(experiment: str | None = None, suite: str | None = None) -> list[dict]:
    """One row per variant run (COLUMNS), best test accuracy first."""
    import mlflow

    client = mlflow.MlflowClient()
    return sorted((_row(client, run) for run in variant_runs(experiment, suite)), key=_rank)


def render(rows: list[dict], fmt: str) -> str:
    """rows as an aligned table, CSV or JSON (the same rows, the same order)."""
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        return out.getvalue()
    if fmt != "table":
        raise RegistryError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    def cell(key, value):
        if value is None:
            return "-"
        if key in ("test_accuracy", "best_val_accuracy"):
            return f"{value:.4f}"
        if key == "dataset_digest":
            return value[:12]
        return str(value)

    cells = [list(COLUMNS)] + [[cell(k, row[k]) for k in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() + "\n" for line in cells)


# --- promote ----------------------------------------------------------------------------------

@dataclass
class Promotion:
    name: str  # registered model name
    version: str  # the version holding the best run's model
    run_id: str
    variant: str
    test_accuracy: float
    dataset_digest: str
    registered: bool  # a new version was created by this call
    promoted: bool  # @champion moved to `version` by this call
    champion: str  # the version that holds @champion after this call
    message: str  # what was decided and why, one line


def default_model_name(dataset: str, base: str) -> str:
    """`cifar10-vgg16`: what was learnt (the dataset) from what (the base)."""
    return re.sub(r"[^a-z0-9._-]+", "-", f"{dataset}-{base}".lower()).strip("-") or "tlkit-model"


# Refused in a registered model name: '/' and ':' by MLflow, '%' by its file store, and "'" by the
# search filters here (name = '...'). The SQL stores keep at most 256 characters.
NAME_FORBIDDEN = ("/", ":", "%", "'")
NAME_MAX = 256


def check_model_name(name: str) -> str:
    """The name, if every MLflow store accepts it; else RegistryError, before anything is registered."""
    if not name.strip():
        why = "is empty"
    elif name != name.strip():
        why = "starts or ends with whitespace"
    elif len(name) > NAME_MAX:
        why = f"is {len(name)} characters long; the registry keeps at most {NAME_MAX}"
    elif any(c in name for c in NAME_FORBIDDEN):
        why = f"contains {next(c for c in NAME_FORBIDDEN if c in name)!r}; not allowed: {' '.join(NAME_FORBIDDEN)}"
    elif name in (".", "..") or name.startswith(".."):
        why = "is not a name MLflow accepts ('.', '..' and names starting with '..' are refused)"
    else:
        return name
    raise RegistryError(f"model name {name!r} {why}")


def candidates(experiment: str | None = None, suite: str | None = None) -> list:
    """FINISHED variant runs that logged a test accuracy, a dataset digest and a model."""
    runs = variant_runs(experiment, suite, status="FINISHED")
    models = logged_models(sorted({r.info.experiment_id for r in runs})) if runs else {}
    return [r for r in runs if "test_accuracy" in r.data.metrics and r.data.tags.get("dataset_digest")
            and r.info.run_id in models]


def _pick_digest(runs: list, digest: str | None, where: str) -> str:
    digests = {}
    for run in runs:
        digests.setdefault(run.data.tags["dataset_digest"], []).append(run)
    if digest:
        matches = [d for d in digests if d.startswith(digest)]
        if len(matches) != 1:
            raise RegistryError(f"{'no' if not matches else 'more than one'} candidate run in {where} on dataset "
                                f"digest {digest!r}; digests there: {_describe(digests)}")
        return matches[0]
    if len(digests) > 1:
        raise RegistryError(f"runs in {where} were tested on {len(digests)} datasets, which cannot be compared: "
                            f"{_describe(digests)}; choose one with --dataset-digest")
    return next(iter(digests))


def _describe(digests: dict) -> str:
    return ", ".join(f"{d[:12]} ({runs[0].data.tags.get('dataset', '?')}, {len(runs)} runs)"
                     for d, runs in digests.items()) or "none"


def _champion_accuracy(client, version) -> float | None:
    from mlflow.exceptions import MlflowException

    if "test_accuracy" in version.tags:
        return float(version.tags["test_accuracy"])
    if version.run_id:  # registered by hand, without our tags
        try:
            return client.get_run(version.run_id).data.metrics.get("test_accuracy")
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("@%s v%s: its run %s no longer exists (deleted, then `mlflow gc`)", CHAMPION,
                        version.version, version.run_id)
    return None


def _what_is_there(experiment: str | None, suite: str | None) -> str:
    """Why no run can be promoted, counted: '1 FAILED, 2 FINISHED without a logged model'."""
    runs = variant_runs(experiment, suite)
    if not runs:
        return "there is no variant run there"
    finished = [r for r in runs if r.info.status == "FINISHED"]
    models = logged_models(sorted({r.info.experiment_id for r in finished})) if finished else {}
    counts: dict[str, int] = {}
    for run in runs:
        if run.info.status != "FINISHED":
            what = run.info.status
        elif run.info.run_id not in models:
            what = "FINISHED without a logged model"
        else:
            what = "FINISHED without test_accuracy or dataset_digest"
        counts[what] = counts.get(what, 0) + 1
    return "variant runs there: " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))


def promote(experiment: str | None = None, suite: str | None = None, dataset_digest: str | None = None,
            model_name: str | None = None, force: bool = False) -> Promotion:
    """Register the best candidate run's model; move @champion to it if it beats the champion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if model_name:  # '' means the default (MLproject passes it so)
        check_model_name(model_name)  # before anything is searched or registered
    client = mlflow.MlflowClient()
    where = f"suite run {suite}" if suite else f"experiment {_experiment_name(experiment)}"
    runs = candidates(experiment, suite)
    if not runs:
        raise RegistryError(f"nothing to promote in {where}: no FINISHED run with a logged model and test_accuracy "
                            f"({_what_is_there(experiment, suite)})")
    digest = _pick_digest(runs, dataset_digest, where)
    # Highest test accuracy; on a tie the earlier run, so that promoting again picks the same one.
    best = max((r for r in runs if r.data.tags["dataset_digest"] == digest),
               key=lambda r: (r.data.metrics["test_accuracy"], -r.info.start_time))
    tags = best.data.tags
    accuracy = float(best.data.metrics["test_accuracy"])
    name = model_name or default_model_name(tags.get("dataset", "data"), tags.get("base", "model"))

    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == best.info.run_id]
    if existing:
        version, registered = min(existing, key=lambda v: int(v.version)), False
    else:
        model = logged_models([best.info.experiment_id])[best.info.run_id]
        version_tags = {"variant": tags.get("variant", ""), "test_accuracy": repr(accuracy),
                        "dataset": tags.get("dataset", ""), "dataset_digest": digest, "run_id": best.info.run_id}
        version = mlflow.register_model(model.model_uri, name, tags=version_tags)
        registered = True
        log.info("registered %s version %s from run %s (%s)", name, version.version, best.info.run_id,
                 tags.get("variant"))

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):  # no such alias
            raise
        champion = None
    said = f"{name} v{version.version} ({tags.get('variant')}, test_accuracy {accuracy:.4f})"
    if champion is not None and str(champion.version) == str(version.version):
        move, message = False, f"{said} is already @{CHAMPION}"
    elif champion is None:
        move, message = True, f"{said} is now @{CHAMPION} (there was none)"
    else:
        held = _champion_accuracy(client, champion)
        other = champion.tags.get("dataset_digest", "")
        was = f"v{champion.version} ({champion.tags.get('variant', '?')}, test_accuracy " + \
              (f"{held:.4f})" if held is not None else "unknown)")
        if other != digest or held is None:
            why = (f"was tested on another dataset (digest {other[:12] or 'unknown'})" if other != digest
                   else "has no test_accuracy")
            move = force
            message = (f"{said} replaces @{CHAMPION} {was}, which {why} (forced)" if force else
                       f"{said} registered; @{CHAMPION} stays {was}: it {why}, so the two cannot be "
                       "compared (--force replaces it)")
        elif accuracy > held or force:
            move, message = True, f"{said} is now @{CHAMPION}, replacing {was}"
        else:
            move, message = False, f"{said} does not beat @{CHAMPION} {was}: champion kept"
    if move:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return Promotion(name=name, version=str(version.version), run_id=best.info.run_id,
                     variant=tags.get("variant", ""), test_accuracy=accuracy, dataset_digest=digest,
                     registered=registered, promoted=move,
                     champion=str(version.version) if move else (str(champion.version) if champion else ""),
                     message=message)


# --- use a model ------------------------------------------------------------------------------

def load(model_uri: str):
    """The pyfunc at model_uri (models:/NAME@champion, runs:/ID/model, a folder).

    A model in a tracking store is downloaded into a temporary folder that is removed once the
    model is in memory: MLflow would otherwise leave a copy (about 60 MB for VGG16) in the
    system's temp folder at every load. A local folder is loaded where it is."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        download = (contextlib.nullcontext() if Path(model_uri).is_dir()
                    else tempfile.TemporaryDirectory(prefix="tlkit-model-"))
        with warnings.catch_warnings(), download as download_to:  # None for a local folder
            # models logged before serving.py annotated predict warn on load
            warnings.filterwarnings("ignore", message=".*type hints.*")
            return mlflow.pyfunc.load_model(model_uri, dst_path=download_to)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            first = str(err).strip().splitlines()[0][:200]
            raise RegistryError(f"model {model_uri}: {first}") from None
        raise
    except OSError as err:
        raise RegistryError(f"model {model_uri}: {err}") from None


def read_image(path: str) -> np.ndarray:
    """The file's pixels as uint8 (H, W, 3) at their own size: the model resizes. The served model
    decodes a file's bytes with this very function (serving.decode)."""
    from tlkit.serving import UNREADABLE, decode

    try:
        return decode(Path(path).read_bytes())
    except FileNotFoundError:
        raise RegistryError(f"image {path} does not exist") from None
    except UNREADABLE as err:
        raise RegistryError(f"image {path} cannot be read: {err}") from None


def predict(model_uri: str, paths: list[str]) -> list[tuple[str, str, float]]:
    """(path, label, probability) per image, in the order given."""
    import pandas as pd

    from tlkit.serving import COLUMN

    images = [read_image(p) for p in paths]  # all checked before the model loads
    model = load(model_uri)
    schema = model.metadata.get_input_schema()
    if schema is not None and schema.is_tensor_spec():
        # A model logged before the `image` column took a uint8 (N, H, W, C) array: one per size.
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        frames = [(indices, model.predict(np.stack([images[i] for i in indices]))) for indices in by_shape.values()]
    else:
        frames = [(range(len(images)), model.predict(pd.DataFrame({COLUMN: images})))]
    answers: list = [None] * len(paths)
    for indices, frame in frames:
        for i, label, probability in zip(indices, frame["label"], frame["probability"]):
            answers[i] = (paths[i], str(label), float(probability))
    return answers


def download(model_uri: str, dst: str) -> Path:
    """Copy the model at model_uri into dst: it then loads with mlflow.pyfunc.load_model(dst), offline."""
    import mlflow
    from mlflow.exceptions import MlflowException

    target = Path(dst)
    if target.exists() and any(target.iterdir()):
        raise RegistryError(f"--dst {dst} is not empty: choose a new or empty folder")
    made = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(target))
    except BaseException as err:
        if made:
            shutil.rmtree(target, ignore_errors=True)  # no empty or half-written folder left behind
        if isinstance(err, MlflowException) and err.error_code in ("RESOURCE_DOES_NOT_EXIST",
                                                                    "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise RegistryError(f"model {model_uri}: {str(err).strip().splitlines()[0][:200]}") from None
        raise
    return Path(local)
