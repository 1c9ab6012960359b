"""Resuming a search: the search folder's state, so that the same search run again continues.

The folder holds keras-tuner's oracle state and tlkit_search.json (what the search is and its
parent run). Running the same search again reopens that parent run and runs only
the trials that have not finished (trials.py never trains or logs a finished trial twice)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tlkit import features, tracking
from tlkit.spec import SpecError
from tlkit.tune.space import digest


STATE_FILE = "tlkit_search.json"


def default_search_dir(cache_dir: str | None, tuner: str, key: str) -> Path:
    """Next to the feature cache, named by the search and by where its runs go (tracking store,
    experiment, enclosing run): the same search into the same place resumes; anything else starts afresh."""
    import mlflow

    active = mlflow.active_run()
    where = digest([mlflow.get_tracking_uri(), tracking.experiment_id(), active.info.run_id if active else ""])
    root = Path(cache_dir) if cache_dir else features.default_cache_dir()
    return root / "searches" / f"{tuner}-{key[:12]}-{where[:8]}"

def read_state(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_state(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, folder / STATE_FILE)


def resumable_parent(state: dict, folder: Path) -> str:
    """The stored parent run, if this tracking store and experiment still hold it."""
    import mlflow

    run_id = state["parent_run_id"]
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        raise SpecError(f"search folder {folder} belongs to run {run_id}, which {mlflow.get_tracking_uri()} "
                        "does not hold: pass another --search-dir")
    if run.info.experiment_id != tracking.experiment_id():
        raise SpecError(f"search folder {folder} belongs to run {run_id} of experiment {run.info.experiment_id}: "
                        "use that experiment or another --search-dir")
    return run_id
