"""The recipe search: which input, head, flips and fine-tuning lift accuracy, and what each costs.

The notebook tried one lever at a time at 32 px and stopped near 61%. The levers that matter are
elsewhere (image size and the base's own preprocessing for the frozen features; flips; fine-tuning
the top block), and each costs a pass of the base or epochs through a block. The search is greedy
over STAGES, cheapest first: each stage tries its candidates on top of the best configuration so
far (the incumbent) and keeps whichever has the highest validation accuracy (`val_accuracy_final`,
the model as it ends). Every configuration is a nested run of an ordinary `tlkit train` (its spec
as a .toml diff, its metrics, reports and model), and configurations that share the base's input
share its cached pass. Test accuracy is logged for every run and never used to choose.

    recipe (parent run)                  chosen.toml, stages.json; best_* and search_seconds
      input-1 ... input-N   a stratified sample (SCREEN): image size x preprocessing, frozen head
      head-1 ...            all images at the chosen input: the head
      flip-1                cached flips
      finetune-1 ...        the top block unfrozen after the head

The chosen configuration is written as a variant file (`--output`): `tlkit train <file>` reruns
it alone.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# The search as data: (stage, fields fixed for that stage only, candidates). A candidate is a spec
# diff laid over the incumbent. Only the `input` stage runs on a sample: the sample's limit and
# test_limit are not carried into later stages.
SCREEN = {"limit": 10000, "test_limit": 2000}  # 9,000 training / 1,000 validation images, stratified
STAGES: list[tuple[str, dict, list[dict]]] = [
    ("input", SCREEN, [
        {"image_size": 32, "preprocess": "unit"},  # the notebook's
        {"image_size": 32, "preprocess": "base"},
        {"image_size": 48, "preprocess": "base"},
        {"image_size": 64, "preprocess": "base"},
    ]),
    ("head", {}, [
        {},  # the notebook's head on every image at the chosen input
        {"units": 1024, "dropout": 0.5},
    ]),
    ("flip", {}, [{"flip": True}]),
    ("finetune", {}, [{"unfreeze": "block5", "finetune_epochs": 6, "patience": 2}]),
]


class RecipeError(RuntimeError):
    """The search cannot go on (every candidate of a stage failed): the message names the stage."""


@dataclass
class Tried:
    stage: str
    name: str  # the nested run's name, e.g. head-2
    diff: dict  # its fields that differ from the search's own spec
    spec: dict  # everything it ran with
    fixed: dict = field(default_factory=dict)  # its stage's stage-only fields (a screen's sample)
    run_id: str = ""
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class RecipeResult:
    run_id: str
    chosen: Tried
    tried: list[Tried] = field(default_factory=list)
    seconds: float = 0.0
    variant_text: str = ""  # the chosen configuration as a variant file (also the parent's chosen.toml)


def variant_file(diff: dict, description: str) -> str:
    """A spec diff as an experiments/-style .toml file (a variant `tlkit train` accepts)."""
    lines = [f"description = {json.dumps(description)}"]
    for key, value in diff.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


def _diff_from_defaults(spec: dict) -> dict:
    from tlkit import spec as specs

    return {k: v for k, v in spec.items() if v != specs.DEFAULTS[k]}


def search(overrides: dict, *, stages=None, experiment: str | None = None, cache_dir: str | None = None,
           output: str | None = None) -> RecipeResult:
    """Run the stages under one parent run; returns the chosen configuration and everything tried."""
    import gc

    import keras
    import mlflow

    from tlkit import spec as specs, tracking, train

    stages = STAGES if stages is None else stages
    base_spec = specs.load("baseline", overrides)  # every check before data is loaded or a run is made
    for stage, fixed, candidates in stages:  # and every candidate's, too
        for candidate in candidates:
            specs.validate(specs.merge({**fixed, **candidate}, base_spec))
    tracking.use_experiment(experiment)
    tracking.check_reachable()
    started = time.perf_counter()
    datasets: dict[tuple, object] = {}

    def dataset_for(spec: dict):
        key = train.data_key(spec)
        if key not in datasets:
            datasets.clear()  # one decoded data set at a time: a 64 px CIFAR-10 is 740 MB
            datasets[key] = train.load_dataset(spec)
        return datasets[key]

    tried: list[Tried] = []
    with tracking.run("recipe", tags={"recipe_stages": ",".join(s for s, _, _ in stages)}) as parent, \
            tempfile.TemporaryDirectory() as tmp:
        tracking.log_params_once({k: v for k, v in overrides.items() if v is not None})
        incumbent: Tried | None = None
        with train.long_lived_objects_frozen():
            for stage, fixed, candidates in stages:
                # The incumbent's own stage-only fields (a screen's sample) do not carry over.
                carried = {k: v for k, v in incumbent.diff.items() if k not in incumbent.fixed} if incumbent else {}
                contenders = []
                # A sample smaller than the screen's, asked for by the caller, stays the caller's.
                fixed = {k: min(v, base_spec[k]) if k in ("limit", "test_limit") and base_spec[k] else v
                         for k, v in fixed.items()}
                for number, candidate in enumerate(candidates, 1):
                    diff = {**carried, **fixed, **candidate}
                    spec = specs.merge(diff, base_spec)
                    if incumbent is not None and spec == incumbent.spec:
                        contenders.append(incumbent)  # it ran already
                        continue
                    name = f"{stage}-{number}"
                    path = Path(tmp) / f"recipe-{name}.toml"
                    path.write_text(variant_file(diff, f"recipe search, stage {stage}: {candidate or 'as it stands'}"))
                    attempt = Tried(stage, name, diff, spec, fixed=dict(fixed))
                    log.info("recipe: %s %s", name, diff)
                    clock = time.perf_counter()
                    try:
                        # Frozen runs cache below the top block: the fine-tuning stage reuses their pass.
                        result = train.train(str(path), spec, cache_dir=cache_dir, nested=True,
                                             dataset=dataset_for(spec), cache_below="top1")
                        attempt.run_id, attempt.val_accuracy = result.run_id, result.val_accuracy
                        attempt.test_accuracy = result.test_accuracy
                        mlflow.MlflowClient().set_tag(result.run_id, "recipe_stage", stage)
                    except Exception as err:  # noqa: BLE001 - one failed configuration must not end the search
                        attempt.error = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
                        log.error("recipe: %s failed: %s", name, attempt.error)
                        while mlflow.active_run() and mlflow.active_run().info.run_id != parent.info.run_id:
                            mlflow.end_run("FAILED")
                    finally:
                        keras.backend.clear_session()  # drop the finished configuration's graph and weights
                        gc.collect()
                    attempt.seconds = time.perf_counter() - clock
                    tried.append(attempt)
                    if not attempt.error:
                        contenders.append(attempt)
                # The incumbent competes where it ran on the same images as this stage's candidates.
                if incumbent is not None and incumbent not in contenders and contenders and \
                        train.data_key(incumbent.spec) == train.data_key(contenders[0].spec):
                    contenders.insert(0, incumbent)
                if not contenders:
                    raise RecipeError(f"every candidate of stage {stage!r} failed: "
                                      + "; ".join(t.error for t in tried if t.stage == stage))
                incumbent = max(contenders, key=lambda t: t.val_accuracy)
                log.info("recipe: stage %s keeps %s (val_accuracy %.4f)", stage, incumbent.name, incumbent.val_accuracy)
                mlflow.log_metric(f"stage_{stage}_val_accuracy", incumbent.val_accuracy)

        seconds = time.perf_counter() - started
        chosen = incumbent
        # The data and the weights file are given on the command line, as for any variant.
        chosen_diff = {k: v for k, v in _diff_from_defaults(chosen.spec).items()
                       if k not in ("data", "weights") and k not in chosen.fixed}
        text = variant_file(chosen_diff, f"chosen by the recipe search (run {parent.info.run_id}): "
                                         f"val_accuracy {chosen.val_accuracy:.4f}")
        mlflow.log_text(text, "chosen.toml")
        mlflow.log_dict([vars(t) for t in tried], "stages.json")
        mlflow.log_metrics({"best_val_accuracy": chosen.val_accuracy, "best_test_accuracy": chosen.test_accuracy,
                            "search_seconds": seconds, "configurations": float(len(tried))})
        mlflow.set_tags({"best_run_id": chosen.run_id, "best_configuration": chosen.name})
        if output:
            Path(output).write_text(text)
    return RecipeResult(run_id=parent.info.run_id, chosen=chosen, tried=tried, seconds=seconds, variant_text=text)


def table(result: RecipeResult) -> str:
    """What each configuration bought: one line each, in the order tried."""
    lines = [f"{'configuration':14s} {'val acc':>8s} {'test acc':>8s} {'seconds':>8s}  diff"]
    for t in result.tried:
        val = f"{t.val_accuracy:.4f}" if t.val_accuracy is not None else "FAILED"
        test = f"{t.test_accuracy:.4f}" if t.test_accuracy is not None else ""
        mark = " *" if t is result.chosen else ""
        lines.append(f"{t.name + mark:14s} {val:>8s} {test:>8s} {t.seconds:8.0f}  {t.diff}{'  ' + t.error if t.error else ''}")
    return "\n".join(lines)
