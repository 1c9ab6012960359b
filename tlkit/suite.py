"""The suite: every variant as a child run of one parent run, compared, the best promoted.

    suite (parent run)
      finetune, baseline, conv_head, l2, sgd, dropout, tune, augment   (one child run each)
      comparison/  test_accuracy.png, comparison.txt / .csv / .json    (on the parent)

The children run in this process, one after the other, not as `mlflow.projects.run` subprocesses:
TensorFlow starts once instead of once per variant (about 10 s each here), and the frozen
variants (baseline, conv_head, l2, sgd, dropout) ask the feature cache for the same entry, so the
first computes the features and the rest read them (their `feature_cache` tags say miss, then
hit), and the data is decoded once for all of them (shared_datasets). finetune runs first: it
caches below the block it unfreezes and stores the base's output from those features too
(train.frozen_features), so the whole suite makes one pass of the base; the tuner's trials read
the same entry; augment adds one pass over the mirrored training images (its cached flips).
The cost of one process: a child that crashes the interpreter (out of memory) ends the suite; a
child that raises is marked FAILED, the suite goes on, and the suite fails at the end.

With repeats N > 1 each child is a repeated variant (tlkit/repeats.py): a parent run per variant,
nested under the suite's, with its N seeds' runs nested under it; the data of each seed is loaded
once for all the variants, and comparison and promotion weigh the variants on their aggregates.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tlkit import compare, registry, repeats as repeating, runs, spec as specs, tracking, train, tune
from tlkit.messages import first_line
from tlkit.sources import DataError
from tlkit.spec import SpecError

log = logging.getLogger(__name__)

# The order the children run in: finetune's pass of the base serves every frozen variant after it.
DEFAULT_VARIANTS = ("finetune", "baseline", "conv_head", "l2", "sgd", "dropout", "tune", "augment")


@dataclass
class SuiteResult:
    run_id: str  # the parent run
    rows: list[dict]  # compare.compare of the children, best first
    failed: dict[str, str] = field(default_factory=dict)  # variant -> one-line error
    promotion: object | None = None  # registry.Promotion, None when nothing could be promoted


class SuiteError(RuntimeError):
    """Some children failed: the message names them. The suite still compared and promoted."""

    def __init__(self, message: str, result: SuiteResult):
        super().__init__(message)
        self.result = result


def parse_variants(text: str) -> list[str]:
    """'all' or a comma-separated subset of DEFAULT_VARIANTS (or .toml spec files), checked."""
    if text.strip() in ("", "all"):
        return list(DEFAULT_VARIANTS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        specs.variant_path(name)  # raises SpecError naming the choices
    if len(set(names)) != len(names):
        raise specs.SpecError(f"variants lists a name twice: {text}")
    return names


def child_specs(variants: list[str], overrides: dict) -> dict[str, dict]:
    """Every child's full spec, validated before anything runs (bad input fails at once)."""
    specs_by_variant = {v: specs.load(v, overrides) for v in variants}
    for variant in variants:
        search = specs.variant_search(variant)
        if search is not None:  # a search variant (tune): its settings checked now too
            tune.check(specs_by_variant[variant], tune.load_search(variant))
    return specs_by_variant


def _run_child(variant: str, spec: dict, cache_dir: str | None, dataset=None, repeats: int = 1):
    """One child: a run (or a search), or with repeats > 1 a repeated variant, whose `dataset` is
    then the list of its seeds' data."""
    if repeats > 1:
        return repeating.run(variant, spec, repeats, cache_dir=cache_dir, nested=True, datasets=dataset)
    if specs.variant_search(variant) is None:
        return train.train(variant, spec, cache_dir=cache_dir, nested=True, dataset=dataset)
    return tune.tune(spec, variant=variant, cache_dir=cache_dir, nested=True, dataset=dataset)


def shared_datasets(specs_by_variant: dict, *, one_digest: bool) -> dict:
    """Each child's data, loaded once per distinct data spec (usually one for all): decoding full
    CIFAR-10 takes 8 s, and every child then sees the same snapshot of an image folder.

    one_digest: the children will be compared and one promoted, which needs one test set: children
    whose data differ in digest fail here, before any training, naming them (SpecError). Without
    it, children whose data differ each load their own when they run (None here): one data set in
    memory at a time."""
    if not one_digest and len({train.data_key(spec) for spec in specs_by_variant.values()}) > 1:
        return dict.fromkeys(specs_by_variant)
    loaded: dict[tuple, object] = {}
    for spec in specs_by_variant.values():
        if train.data_key(spec) not in loaded:
            dataset = train.load_dataset(spec)
            # A child that wrote into them would change the next child's data.
            for images in (dataset.x_train, dataset.x_val, dataset.x_test):
                images.make_read_only()  # (an image folder's images are files, read afresh)
            for labels in (dataset.y_train, dataset.y_val, dataset.y_test):
                labels.flags.writeable = False
            loaded[train.data_key(spec)] = dataset
    by_variant = {v: loaded[train.data_key(spec)] for v, spec in specs_by_variant.items()}
    digests = {d.digest for d in by_variant.values()}
    if one_digest and len(digests) > 1:
        which = ", ".join(f"{v if isinstance(v, str) else v[0]} ({d.digest[:12]})" for v, d in by_variant.items())
        raise SpecError(f"the variants would be tested on different data ({which}): promotion compares one test "
                        "set; give them the same data options, or pass --no-promote")
    return by_variant


def repeated_datasets(specs_by_variant: dict[str, dict], repeats: int, *, one_digest: bool) -> dict[str, list]:
    """shared_datasets for repeated variants: each variant's list of its seeds' data, the first
    seed's loaded once for every variant that agrees on the data fields; the other seeds' are None,
    which repeats.run makes from the first by its other split (Dataset.with_split), not loaded again."""
    firsts = shared_datasets({v: repeating.seed_spec(spec, 0) for v, spec in specs_by_variant.items()},
                             one_digest=one_digest)
    return {v: [firsts[v]] + [None] * (repeats - 1) for v in specs_by_variant}


def _mark_failed(suite_id: str, variant: str, error: str, since_ms: int) -> None:
    """Tag the child's FAILED run with the error; a child that failed before its run began (its
    base or data did not load) gets an empty FAILED run, so that the failure shows in the UI too."""
    import mlflow

    client = mlflow.MlflowClient()
    name = Path(variant).stem
    runs = [r for r in mlflow.search_runs(experiment_ids=[mlflow.get_run(suite_id).info.experiment_id],
                                          filter_string=f"tags.mlflow.parentRunId = '{suite_id}' and "
                                                        f"tags.variant = '{name}'", output_format="list")
            if r.info.start_time >= since_ms]
    if runs:
        for run in runs:
            client.set_tag(run.info.run_id, "error", error)
        return
    mlflow.start_run(run_name=name, nested=True, tags={"variant": name, "error": error})
    mlflow.end_run("FAILED")


def _chart(finished: list[dict], failed: dict[str, str], path: Path) -> None:
    """Bar chart of test accuracy per finished variant, best first, with its 95% interval and each
    run's difference from the best (points) and McNemar p against it, then the failed ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    repeated = any(r.get("seeds") is not None for r in finished)
    names = [r["variant"] for r in finished] + [Path(v).stem for v in failed]
    values = [r["test_accuracy"] for r in finished] + [0.0] * len(failed)
    below = [r["test_accuracy"] - r["test_accuracy_low"] if r["test_accuracy_low"] is not None else 0.0
             for r in finished] + [0.0] * len(failed)
    above = [r["test_accuracy_high"] - r["test_accuracy"] if r["test_accuracy_high"] is not None else 0.0
             for r in finished] + [0.0] * len(failed)
    labels = [f"{r['test_accuracy']:.3f}" + (f"\n{100 * r['diff_vs_best']:+.2f} pts\np={r['p_vs_best']:.2g}"
                                             if r["p_vs_best"] is not None else "")
              for r in finished] + ["FAILED"] * len(failed)
    colors = ["tab:green" if i == 0 else "tab:blue" for i in range(len(finished))] + ["tab:gray"] * len(failed)
    fig, ax = plt.subplots(figsize=(1.1 * max(len(names), 3) + 2, 4.5))
    bars = ax.bar(range(len(names)), values, color=colors, tick_label=names, yerr=[below, above], capsize=4)
    for bar, value, high, label in zip(bars, values, above, labels):
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, value + high), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy (95% interval)" if repeated else "test accuracy (95% Wilson interval)")
    ax.set_title("suite: mean test accuracy over seeds per variant (95% t-interval), best first; p: stratified "
                 "McNemar (CMH, exact) against the best" if repeated else
                 "suite: test accuracy per variant, best first; p: McNemar's exact test against the best")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run_children(variants: list[str], specs_by_variant: dict, cache_dir: str | None, datasets: dict,
                  suite_id: str, repeats: int = 1) -> dict[str, str]:
    """Each child in turn, nested under the suite's run; returns {variant: one-line error} of those that failed."""
    import keras
    import mlflow

    failed: dict[str, str] = {}
    for number, variant in enumerate(variants, 1):
        log.info("suite: %s (%d of %d)", variant, number, len(variants))
        started = int(time.time() * 1000)
        try:
            result = _run_child(variant, specs_by_variant[variant], cache_dir, datasets[variant], repeats)
            # Tagged, so that compare finds it even where it is not a direct child (a reopened search).
            mlflow.MlflowClient().set_tag(result.run_id, "suite", suite_id)
        except DataError:
            raise  # every child reads the same data: the rest would fail the same way
        except Exception as err:  # noqa: BLE001 - one failed variant must not stop the others
            line = first_line(err, 300)
            failed[variant] = f"{type(err).__name__}: {line}"
            log.error("suite: %s failed: %s", variant, failed[variant])
            while mlflow.active_run() and mlflow.active_run().info.run_id != suite_id:
                mlflow.end_run("FAILED")  # a child left open by an error outside its own run()
            _mark_failed(suite_id, variant, failed[variant], started)
        finally:
            keras.backend.clear_session()  # drop the finished child's graph and weights
            gc.collect()
    return failed


def run_suite(variants: list[str], overrides: dict, *, experiment: str | None = None, cache_dir: str | None = None,
              promote: bool = True, model_name: str | None = None, min_gain: float = 0.0,
              significance: float = 0.05, repeats: int = 1) -> SuiteResult:
    """Run the children under one parent run, then compare and promote. Raises SuiteError at the
    end if any child failed (after comparing and promoting among the finished ones). repeats > 1:
    each child is the variant at that many seeds (tlkit/repeats.py)."""
    import mlflow

    repeating.check(repeats)
    specs_by_variant = child_specs(variants, overrides)
    registry.check_gate(min_gain, significance)
    if promote and model_name:  # '' means the default name
        registry.check_model_name(model_name)  # not after an hour of training
    tracking.use_experiment(experiment)
    tracking.check_reachable()
    # Before the suite's run: data that cannot be compared fails with nothing logged.
    datasets = (shared_datasets(specs_by_variant, one_digest=promote) if repeats == 1 else
                repeated_datasets(specs_by_variant, repeats, one_digest=promote))
    tags = {"suite_variants": ",".join(variants), **({runs.REPEATS: str(repeats)} if repeats > 1 else {})}
    with tracking.run("suite", tags=tags) as parent:
        suite_id = parent.info.run_id
        tracking.log_params_once({"variants": ",".join(variants), **({"repeats": repeats} if repeats > 1 else {}),
                                  **{k: v for k, v in overrides.items() if v is not None}})
        with train.long_lived_objects_frozen():
            failed = _run_children(variants, specs_by_variant, cache_dir, datasets, suite_id, repeats)

        rows = compare.compare(suite=suite_id)
        result = SuiteResult(run_id=suite_id, rows=rows, failed=failed)
        if failed:
            mlflow.set_tag("failed_variants", ",".join(failed))
        finished = [r for r in rows if r["test_accuracy"] is not None and r["status"] == "FINISHED"]
        if finished:
            mlflow.set_tags({"best_variant": finished[0]["variant"], "best_run_id": finished[0]["run_id"]})
            mlflow.log_metric("best_test_accuracy", finished[0]["test_accuracy"])
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for fmt, suffix in (("table", "txt"), ("csv", "csv"), ("json", "json")):
                (folder / f"comparison.{suffix}").write_text(compare.render(rows, fmt))
            _chart(finished, failed, folder / "test_accuracy.png")
            mlflow.log_artifacts(tmp, "comparison")

        if promote and finished:
            # The children were tested on one dataset digest (shared_datasets).
            result.promotion = registry.promote(suite=suite_id, model_name=model_name, min_gain=min_gain,
                                                significance=significance)
            mlflow.set_tags({"registered_model": result.promotion.name,
                             "registered_version": result.promotion.version,
                             "champion_version": result.promotion.champion})
        if failed:
            # Raised inside the run, so the parent ends FAILED, as `mlflow run` would mark it anyway.
            raise SuiteError(f"{len(failed)} of {len(variants)} variants failed: "
                             + "; ".join(f"{v} ({e})" for v, e in failed.items()), result)
    return result
