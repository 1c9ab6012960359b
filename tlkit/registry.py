"""Promote the best run to the Model Registry (gated on the paired test), and use the champion.

promote: among FINISHED runs that logged a model and a test accuracy on one dataset digest (the
    candidates that compare.py lists), the best is registered under a model name (default
    `<dataset>-<base>`, e.g. `cifar10-vgg16`) and gets the alias `champion` only if it beats the
    champion on the same digest: a gain of at least `min_gain` points that McNemar's exact test on
    the two runs' per-image test predictions finds real (p below `significance`). The decision, the
    gain with its interval and the per-class changes go on the version's tags and description and
    on the candidate's run (promotion/). A test accuracy measured on other images is no evidence
    either way, so runs on different digests never compete, and a champion tested on another
    digest is kept unless forced. Promoting twice in a row changes nothing: a run already
    registered is not registered again.
    With repeated variants among the candidates (tlkit/repeats.py), they compete on their mean
    test accuracy over seeds (single runs do not: one seed is no match for a mean); the best
    variant's best-validation seed's model is registered, and it replaces the champion only if the
    mean gain reaches `min_gain` and the stratified McNemar test (stats.Stratified, exact) over
    the seed pairings with the champion's seeds (a champion of one run: one pairing) is below
    `significance`.
predict / download: the pyfunc in serving.py, from any model URI (`models:/NAME@champion`).

Every function talks to the tracking server named by MLflow's own rules (MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlkit import compare, reports, runs as found_runs, stats, tracking
from tlkit.messages import first_line
from tlkit.runs import REPEAT, REPEATS, RegistryError, experiment_name, logged_models, variant_runs
from tlkit.serving import COLUMN, UNREADABLE, decode


log = logging.getLogger(__name__)

CHAMPION = "champion"


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
    # The comparison with the champion it was weighed against (promotion_report), when there was one.
    report: dict | None = None
    seeds: int = 0  # a repeated variant's: how many seeds test_accuracy (their mean) is over; 0: one run
    repeats_run_id: str = ""  # a repeated variant's parent run (run_id is its registered seed's)


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


def check_gate(min_gain: float, significance: float) -> None:
    if not min_gain >= 0:
        raise RegistryError(f"--min-gain must be 0 or more points, got {min_gain}")
    if not 0 < significance <= 1:
        raise RegistryError(f"--significance must be in (0, 1], got {significance}")


def promote(experiment: str | None = None, suite: str | None = None, dataset_digest: str | None = None,
            model_name: str | None = None, force: bool = False, min_gain: float = 0.0,
            significance: float = 0.05) -> Promotion:
    """Register the best candidate run's model; move @champion to it if it beats the champion.

    Beating it means, on the same dataset digest: a test accuracy higher by at least `min_gain`
    points, and McNemar's exact test on the two runs' per-image test predictions giving p below
    `significance` (1 restores the plain rule: any gain). A champion (or candidate) logged without
    per-image predictions is weighed by the plain rule, and the message says so. No champion yet:
    the best run becomes it."""
    import mlflow

    if model_name:  # '' means the default (MLproject passes it so)
        check_model_name(model_name)  # before anything is searched or registered
    check_gate(min_gain, significance)
    client = mlflow.MlflowClient()
    groups = repeated_candidates(experiment, suite)
    if groups:
        return _promote_repeated(client, groups, experiment, suite, dataset_digest, model_name, force=force,
                                 min_gain=min_gain, significance=significance)
    best, digest = _best_candidate(experiment, suite, dataset_digest)
    tags, accuracy = best.data.tags, float(best.data.metrics["test_accuracy"])
    name = model_name or default_model_name(tags.get("dataset", "data"), tags.get("base", "model"))
    version, registered = _register(client, name, best, digest)
    champion = _current_champion(client, name)
    # The best run's per-image predictions: downloaded once, and only if the description or the
    # decision needs them.
    candidate_predictions = functools.cache(lambda: tracking.load_predictions(best.info.run_id))
    move, message, report = _decide(client, name, version, champion, best, digest, candidate_predictions,
                                    force=force, min_gain=min_gain, significance=significance)
    if registered and report is None:  # what it beat, in its description: nothing it was weighed against
        client.update_model_version(name, version.version, description=_description(
            best, accuracy, digest, candidate_predictions()) + (
            f" It became @{CHAMPION}: there was none." if champion is None else f" {message}."))
    return _settle(client, name, version, champion, move, run_id=best.info.run_id, variant=tags.get("variant", ""),
                   test_accuracy=accuracy, dataset_digest=digest, registered=registered, message=message,
                   report=report)


def _settle(client, name: str, version, champion, move: bool, **decided) -> Promotion:
    """Move @champion to `version` if `move`; the Promotion, with the version that holds it now."""
    if move:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return Promotion(name=name, version=str(version.version), promoted=move,
                     champion=str(version.version) if move else (str(champion.version) if champion else ""), **decided)


def _best_candidate(experiment: str | None, suite: str | None, dataset_digest: str | None):
    """The candidate run with the highest test accuracy on the chosen dataset digest, and that digest."""
    where = f"suite run {suite}" if suite else f"experiment {experiment_name(experiment)}"
    runs = candidates(experiment, suite)
    if not runs:
        raise RegistryError(f"nothing to promote in {where}: no FINISHED run with a logged model and test_accuracy "
                            f"({_what_is_there(experiment, suite)})")
    digest = _pick_digest(runs, dataset_digest, where)
    # Highest test accuracy; on a tie the earlier run, so that promoting again picks the same one.
    best = max((r for r in runs if r.data.tags["dataset_digest"] == digest),
               key=lambda r: (r.data.metrics["test_accuracy"], -r.info.start_time))
    return best, digest


def _register(client, name: str, best, digest: str, extra_tags: dict | None = None):
    """The best run's model version under `name`, and whether it is new: a run registered before keeps
    its first version, so that promoting twice registers nothing new. extra_tags: more version tags
    (a repeated variant's aggregate)."""
    import mlflow

    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == best.info.run_id]
    if existing:
        return min(existing, key=lambda v: int(v.version)), False
    tags, accuracy = best.data.tags, float(best.data.metrics["test_accuracy"])
    model = logged_models([best.info.experiment_id])[best.info.run_id]
    version_tags = {"variant": tags.get("variant", ""), "test_accuracy": repr(accuracy),
                    "dataset": tags.get("dataset", ""), "dataset_digest": digest, "run_id": best.info.run_id,
                    **(extra_tags or {})}
    version = mlflow.register_model(model.model_uri, name, tags=version_tags)
    log.info("registered %s version %s from run %s (%s)", name, version.version, best.info.run_id,
             tags.get("variant"))
    return version, True


def _current_champion(client, name: str):
    """The version `name`@champion points to, or None when there is no such alias yet."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):  # no such alias
            raise
        return None


def _decide(client, name: str, version, champion, best, digest: str, candidate_predictions, *, force: bool,
            min_gain: float, significance: float):
    """Whether `version` replaces `champion` (move), the sentence that says so, and the gate's report
    (None when the two were not weighed against each other); a weighed decision is recorded on the
    version and the candidate's run."""
    tags, accuracy = best.data.tags, float(best.data.metrics["test_accuracy"])
    said = f"{name} v{version.version} ({tags.get('variant')}, test_accuracy {accuracy:.4f})"
    if champion is not None and str(champion.version) == str(version.version):
        return False, f"{said} is already @{CHAMPION}", None
    if champion is None:
        return True, f"{said} is now @{CHAMPION} (there was none)", None
    held = _champion_accuracy(client, champion)
    was = f"v{champion.version} ({champion.tags.get('variant', '?')}, test_accuracy " + \
          (f"{held:.4f})" if held is not None else "unknown)")
    refused = _not_comparable(said, was, champion, digest, held, force)
    if refused is not None:
        return *refused, None
    report = promotion_report(candidate_predictions(), champion, best.info.run_id, accuracy, held,
                              min_gain, significance)
    move, verdict = (True, "forced") if force else (report["promoted"], report["reason"])
    message = (f"{said} is now @{CHAMPION}, replacing {was}: {verdict}" if move else
               f"{said} does not beat @{CHAMPION} {was}: {verdict}; champion kept")
    report.update(promoted=move, candidate_version=str(version.version), message=message)
    _record(client, name, version, best, report, candidate_predictions())
    return move, message, report


def _not_comparable(said: str, was: str, champion, digest: str, held: float | None, force: bool):
    """(move, message) when the champion cannot be weighed against the candidate (tested on another
    dataset digest, or without a test accuracy): kept unless forced; None when it can be."""
    other = champion.tags.get("dataset_digest", "")
    if other == digest and held is not None:
        return None
    why = f"was tested on another dataset (digest {other[:12] or 'unknown'})" if other != digest else "has no test_accuracy"
    message = (f"{said} replaces @{CHAMPION} {was}, which {why} (forced)" if force else
               f"{said} registered; @{CHAMPION} stays {was}: it {why}, so the two cannot be "
               "compared (--force replaces it)")
    return force, message


def _description(run, accuracy: float, digest: str, predictions) -> str:
    """The version's one paragraph: what it is, on what data, how good (with the interval, when the
    run logged its per-image predictions), from where."""
    tags = run.data.tags
    interval = ""
    if predictions is not None:
        low, high = predictions.interval()
        interval = f" (95% interval {100 * low:.2f}-{100 * high:.2f}%, {len(predictions.truth):,} test images)"
    return (f"{tags.get('variant', '?')} variant, {tags.get('base', '?')} base, trained on {tags.get('dataset', '?')} "
            f"(dataset digest {digest}): test accuracy {100 * accuracy:.2f}%{interval}. From run {run.info.run_id}.")


def promotion_report(mine, champion, candidate_run: str, accuracy: float, held: float, min_gain: float,
                     significance: float) -> dict:
    """The candidate (its per-image predictions `mine`, or None) weighed against the champion on the
    same test images: the gain with its 95% interval, McNemar's exact p on the paired outcomes,
    per-class accuracy changes, and the verdict."""
    rule = {"min_gain_points": float(min_gain), "significance": float(significance), "champion_version": str(champion.version),
            "champion_run_id": champion.run_id or "", "candidate_run_id": candidate_run}
    theirs = tracking.load_predictions(champion.run_id or "")
    paired = theirs.paired_with(mine) if theirs is not None and mine is not None else None
    if paired is None:
        why = ("the champion has no per-image test predictions" if theirs is None else
               "the candidate has no per-image test predictions" if mine is None else
               "the two runs' prediction files are not of the same test images")
        gain = 100 * (accuracy - held)
        promoted = bool(accuracy > held)
        return {**rule, "test": "none: higher test accuracy wins (the rule before per-image predictions)",
                "gain_points": gain, "promoted": promoted,
                "reason": f"{why}, so the rule before them applies: gain {gain:+.2f} pts"
                          f"{'' if promoted else ' is no gain'}"}
    low, high = paired.gain_interval()
    names = mine.class_names
    before = stats.per_class_accuracy(theirs.truth, theirs.predicted, len(names))
    after = stats.per_class_accuracy(mine.truth, mine.predicted, len(names))
    gain, p = 100 * paired.gain, paired.p_value
    big_enough, real = gain >= min_gain and paired.gain > 0, p < significance
    promoted = bool(big_enough and real)
    reason = (f"gain {gain:+.2f} pts (95% interval {100 * low:+.2f} to {100 * high:+.2f}), McNemar p = {p:.3g} "
              f"on {paired.only_a + paired.only_b} disagreements of {paired.images} images")
    if not big_enough:
        reason += f"; below the required {min_gain:g} pts" if paired.gain > 0 else "; no gain"
    elif not real:
        reason += f", not below {significance:g}: within noise"
    return {**rule, "test": "McNemar exact (two-sided), paired on the test images", "images": paired.images,
            "only_candidate_right": paired.only_b, "only_champion_right": paired.only_a,
            "gain_points": gain, "gain_interval_points": [100 * low, 100 * high], "p_value": p,
            "promoted": promoted, "reason": reason,
            "per_class": [{"class": n, "champion": float(b), "candidate": float(a), "change_points": 100 * float(a - b)}
                          for n, b, a in zip(names, before, after)]}


def _record(client, name: str, version, run, report: dict, predictions) -> None:
    """The decision on the version (tags, description) and as a report on the candidate's run."""
    import mlflow

    tags = {"promotion_decision": "promoted" if report["promoted"] else "kept",
            "promotion_against": report.get("champion_version", ""), "promotion_gain_points": f"{report['gain_points']:.4f}",
            "promotion_test": report["test"]}
    if "p_value" in report:
        low, high = report["gain_interval_points"]
        tags.update(promotion_p_value=f"{report['p_value']:.6g}", promotion_gain_interval=f"{low:.4f},{high:.4f}")
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    verdict = ("It beat" if report["promoted"] else "It did not beat") + f" @{CHAMPION} v{report['champion_version']}: "
    description = _description(run, float(run.data.metrics["test_accuracy"]), run.data.tags["dataset_digest"],
                               predictions)
    client.update_model_version(name, version.version, description=f"{description} {verdict}{report['reason']}.")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "report.json").write_text(json.dumps(report, indent=1))
        if "per_class" in report:
            reports.per_class_comparison_png(report["per_class"], folder / "per_class_accuracy.png",
                                             f"candidate v{version.version} against @{CHAMPION} "
                                             f"v{report['champion_version']}")
        mlflow.MlflowClient().log_artifacts(run.info.run_id, str(folder), "promotion")


# --- promote repeated variants: on the aggregate -------------------------------------------------

# The version tags that carry a repeated variant's aggregate: what a later promotion weighs it by.
REPEATS_RUN_TAG = "repeats_run_id"
REPEATED_TEST = "stratified McNemar (Cochran-Mantel-Haenszel, exact conditional, two-sided) over the seed pairings"


def repeated_candidates(experiment: str | None = None, suite: str | None = None) -> list:
    """FINISHED repeated variants' parent runs with their aggregate and a dataset digest (their
    seeds' models are checked when one is chosen)."""
    return [r for r in variant_runs(experiment, suite, status="FINISHED") if REPEATS in r.data.tags
            and "test_accuracy_mean" in r.data.metrics and r.data.tags.get("dataset_digest")]


def _chosen_seed(client, parent):
    """The parent's FINISHED seed with a logged model and the highest best validation accuracy (a
    tie: the lower seed), and that accuracy; RegistryError when no seed logged a model."""
    models = logged_models([parent.info.experiment_id])
    seeds = [s for s in compare.finished_seeds(parent) if s.info.run_id in models]
    if not seeds:
        raise RegistryError(f"repeated variant {parent.data.tags.get('variant')} (run {parent.info.run_id}): no "
                            "FINISHED seed run with a logged model")
    scored = [(found_runs.best_val_accuracy(client, s), s) for s in seeds]
    val, seed = max(scored, key=lambda vs: (vs[0] if vs[0] is not None else float("-inf"),
                                            -int(vs[1].data.tags[REPEAT])))
    return seed, val


def _aggregate_tags(parent, seed, val: float | None) -> dict:
    m = parent.data.metrics
    return {REPEATS_RUN_TAG: parent.info.run_id, "n_seeds": str(int(m.get("n_seeds", 0))),
            "test_accuracy_mean": repr(m["test_accuracy_mean"]), "test_accuracy_sd": repr(m.get("test_accuracy_sd")),
            "test_accuracy_ci_low": repr(m.get("test_accuracy_ci_low")),
            "test_accuracy_ci_high": repr(m.get("test_accuracy_ci_high")),
            "seed": seed.data.tags.get(found_runs.REPEAT_SEED, ""), "seed_val_accuracy": repr(val)}


def _repeated_description(parent, seed, val: float | None, digest: str) -> str:
    """The version's paragraph: the variant, its seeds, their mean and interval, which seed it is."""
    tags, m = parent.data.tags, parent.data.metrics
    low, high = m.get("test_accuracy_ci_low"), m.get("test_accuracy_ci_high")
    interval = f" (95% t-interval across seeds {100 * low:.2f}-{100 * high:.2f}%)" if low is not None else ""
    own = seed.data.metrics.get("test_accuracy")
    return (f"{tags.get('variant', '?')} variant at {int(m.get('n_seeds', 0))} seeds, {tags.get('base', '?')} base, "
            f"trained on {tags.get('dataset', '?')} (dataset digest {digest}): mean test accuracy "
            f"{100 * m['test_accuracy_mean']:.2f}%{interval}. This version is seed "
            f"{seed.data.tags.get(found_runs.REPEAT_SEED, '?')}'s model, the best validation accuracy of the seeds"
            + (f" ({100 * val:.2f}%)" if val is not None else "")
            + (f", test accuracy {100 * own:.2f}%" if own is not None else "")
            + f". From run {seed.info.run_id} of repeats run {parent.info.run_id}.")


def _champion_seeds(client, champion) -> tuple[float | None, dict, int]:
    """The champion's aggregate test accuracy, its per-image predictions by seed index and its
    number of seeds: a repeated variant's from its parent run, a single run's as seed 0."""
    from mlflow.exceptions import MlflowException

    parent_id = champion.tags.get(REPEATS_RUN_TAG)
    if parent_id:
        try:
            parent = client.get_run(parent_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            parent = None
        if parent is not None:
            seeds = compare.finished_seeds(parent)
            return float(champion.tags["test_accuracy_mean"]), compare.seed_predictions(parent, seeds), len(seeds)
    return _champion_accuracy(client, champion), {0: tracking.load_predictions(champion.run_id or "")}, 1


def _promote_repeated(client, groups: list, experiment: str | None, suite: str | None, dataset_digest: str | None,
                      model_name: str | None, *, force: bool, min_gain: float, significance: float) -> Promotion:
    """promote among repeated variants: the best mean wins, its best-validation seed is registered,
    and @champion moves if the mean gain reaches min_gain and the stratified test is significant."""
    where = f"suite run {suite}" if suite else f"experiment {experiment_name(experiment)}"
    digest = _pick_digest(groups, dataset_digest, where)
    # The highest mean; on a tie the earlier parent, so that promoting again picks the same one.
    parent = max((g for g in groups if g.data.tags["dataset_digest"] == digest),
                 key=lambda g: (g.data.metrics["test_accuracy_mean"], -g.info.start_time))
    seed, val = _chosen_seed(client, parent)
    tags, mean = parent.data.tags, float(parent.data.metrics["test_accuracy_mean"])
    seeds = int(parent.data.metrics.get("n_seeds", 0))
    name = model_name or default_model_name(tags.get("dataset", "data"), tags.get("base", "model"))
    version, registered = _register(client, name, seed, digest, _aggregate_tags(parent, seed, val))
    champion = _current_champion(client, name)
    said = (f"{name} v{version.version} ({tags.get('variant')}, mean test_accuracy {mean:.4f} over {seeds} seeds; "
            f"seed {seed.data.tags.get(found_runs.REPEAT_SEED, '?')}'s model)")
    description = _repeated_description(parent, seed, val, digest)
    report = None
    if champion is not None and str(champion.version) == str(version.version):
        move, message = False, f"{said} is already @{CHAMPION}"
    elif champion is None:
        move, message = True, f"{said} is now @{CHAMPION} (there was none)"
    else:
        move, message, report = _decide_repeated(client, name, version, champion, parent, digest, said,
                                                 force=force, min_gain=min_gain, significance=significance)
    if registered:
        verdict = (f" It became @{CHAMPION}: there was none." if champion is None else
                   f" {message}." if report is None else
                   f" {'It beat' if report['promoted'] else 'It did not beat'} @{CHAMPION} "
                   f"v{report['champion_version']}: {report['reason']}.")
        client.update_model_version(name, version.version, description=description + verdict)
    if report is not None:
        _record_repeated(client, name, version, parent, report)
    return _settle(client, name, version, champion, move, run_id=seed.info.run_id, variant=tags.get("variant", ""),
                   test_accuracy=mean, dataset_digest=digest, registered=registered, message=message, report=report,
                   seeds=seeds, repeats_run_id=parent.info.run_id)


def _decide_repeated(client, name: str, version, champion, parent, digest: str, said: str, *, force: bool,
                     min_gain: float, significance: float):
    """Whether the repeated variant's version replaces `champion`, the sentence, and the report
    (None when the two could not be weighed: another digest, no accuracy)."""
    held, theirs, their_seeds = _champion_seeds(client, champion)
    was = f"v{champion.version} ({champion.tags.get('variant', '?')}, " + (
        "unknown test_accuracy)" if held is None else
        f"mean test_accuracy {held:.4f} over {their_seeds} seeds)" if champion.tags.get(REPEATS_RUN_TAG) else
        f"test_accuracy {held:.4f})")
    refused = _not_comparable(said, was, champion, digest, held, force)
    if refused is not None:
        return *refused, None
    mean = float(parent.data.metrics["test_accuracy_mean"])
    mine = compare.seed_predictions(parent, compare.finished_seeds(parent))
    paired = compare.pair_seeds(theirs, mine)
    report = repeated_report(paired, champion, parent.info.run_id, mean, held, min_gain, significance)
    move, verdict = (True, "forced") if force else (report["promoted"], report["reason"])
    message = (f"{said} is now @{CHAMPION}, replacing {was}: {verdict}" if move else
               f"{said} does not beat @{CHAMPION} {was}: {verdict}; champion kept")
    report.update(promoted=move, candidate_version=str(version.version), message=message)
    return move, message, report


def repeated_report(paired, champion, parent_run: str, mean: float, held: float, min_gain: float,
                    significance: float) -> dict:
    """A repeated variant (its mean over seeds) weighed against the champion's aggregate (or its one
    run): the gain of the means in points, and the stratified McNemar test over the seed pairings
    (paired: compare.pair_seeds of the champion's seeds against the candidate's; None when no
    pairing was scored on the same images, and the rule before per-image predictions applies)."""
    gain = 100 * (mean - held)
    rule = {"min_gain_points": float(min_gain), "significance": float(significance),
            "champion_version": str(champion.version), "champion_run_id": champion.run_id or "",
            "candidate_repeats_run_id": parent_run, "gain_points": gain}
    if paired is None:
        promoted = bool(mean > held)
        return {**rule, "test": "none: higher test accuracy wins (the rule before per-image predictions)",
                "promoted": promoted,
                "reason": f"no seed pairing has per-image test predictions of the same test images, so the rule "
                          f"before them applies: mean gain {gain:+.2f} pts{'' if promoted else ' is no gain'}"}
    p = paired.p_value
    big_enough, real = gain >= min_gain and gain > 0, p < significance
    reason = (f"mean gain {gain:+.2f} pts, stratified McNemar (CMH, exact) p = {p:.3g} over {len(paired.strata)} "
              f"seed pairing(s), {paired.disagreements} disagreements (smallest reachable p {paired.smallest_p:.2g})")
    if not big_enough:
        reason += f"; below the required {min_gain:g} pts" if gain > 0 else "; no gain"
    elif not real:
        reason += f", not below {significance:g}: within noise"
    return {**rule, "test": REPEATED_TEST, "seed_pairings": len(paired.strata),
            "only_candidate_right": paired.only_b, "only_champion_right": paired.only_a,
            "statistic": paired.statistic, "p_value": p, "smallest_p": paired.smallest_p,
            "promoted": bool(big_enough and real), "reason": reason}


def _record_repeated(client, name: str, version, parent, report: dict) -> None:
    """The decision on the version (tags) and as promotion/report.json on the repeated variant's parent run."""
    tags = {"promotion_decision": "promoted" if report["promoted"] else "kept",
            "promotion_against": report["champion_version"], "promotion_gain_points": f"{report['gain_points']:.4f}",
            "promotion_test": report["test"]}
    if "p_value" in report:
        tags.update(promotion_p_value=f"{report['p_value']:.6g}", promotion_smallest_p=f"{report['smallest_p']:.6g}",
                    promotion_seed_pairings=str(report["seed_pairings"]))
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.log_dict(parent.info.run_id, report, "promotion/report.json")


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
            raise RegistryError(f"model {model_uri}: {first_line(err, 200)}") from None
        raise
    except OSError as err:
        raise RegistryError(f"model {model_uri}: {err}") from None


def read_image(path: str) -> np.ndarray:
    """The file's pixels as uint8 (H, W, 3) at their own size: the model resizes. The served model
    decodes a file's bytes with this very function (serving.decode)."""
    try:
        return decode(Path(path).read_bytes())
    except FileNotFoundError:
        raise RegistryError(f"image {path} does not exist") from None
    except UNREADABLE as err:
        from PIL import Image

        # Pillow's message for an unknown format names only the in-memory file object it was given.
        why = "not an image file that Pillow can read" if isinstance(err, Image.UnidentifiedImageError) else err
        raise RegistryError(f"image {path} cannot be read: {why}") from None


def predict(model_uri: str, paths: list[str]) -> list[tuple[str, str, float]]:
    """(path, label, probability) per image, in the order given."""
    import pandas as pd

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
            raise RegistryError(f"model {model_uri}: {first_line(err, 200)}") from None
        raise
    return Path(local)
