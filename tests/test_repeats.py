"""Repeats: a variant at several seeds under one parent run, the stratified McNemar (CMH) test that
pairs them seed by seed, compare's aggregate rows and promotion on the aggregate.

The statistics against a hand computation, scipy and statsmodels; the data of the repeats against
each other; compare and promote on repeated variants made by hand in a temporary store, whose
per-image predictions the test builds so the right answer is known; and two real runs of the
commands (tiny data, weights none, 1 epoch): `tlkit train --repeats 3` and a suite of a frozen
variant and the search at 2 seeds."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tlkit import compare, registry, repeats, runs, spec as specs, stats, train

from conftest import CLASSES, FAST_ARGS, assert_clear, cli, invoke, versions

DIGEST = "e" * 64
NAME = "shapes-vgg16"  # promote's default name: <dataset>-<base>
IMAGES = 600
TRUTH = np.arange(IMAGES) % len(CLASSES)


# --------------------------------------------------------------------------- the statistics

def test_the_stratified_test_by_hand():
    # Three seed pairings with (only a right, only b right) = (1, 4), (0, 3), (2, 2): B = 3, C = 9.
    strata = stats.Stratified((stats.Paired(10, 1, 4), stats.Paired(10, 0, 3), stats.Paired(10, 2, 2)))
    assert (strata.only_a, strata.only_b, strata.disagreements) == (3, 9, 12)
    assert strata.statistic == (3 - 9) ** 2 / 12  # 3.0
    # Exact: 2 P(X <= 3) for X ~ Binomial(12, 1/2) = 2 (1 + 12 + 66 + 220) / 4096.
    assert strata.p_value == 2 * 299 / 4096
    assert strata.smallest_p == 2 / 4096  # all 12 disagreements one way
    assert strata.gain == pytest.approx((0.3 + 0.3 + 0.0) / 3)
    one = stats.Stratified((stats.Paired(10, 1, 5),))  # one seed each: McNemar's exact test itself
    assert one.p_value == stats.mcnemar_exact(1, 5) and one.smallest_p == 2 / 64
    assert stats.Stratified((stats.Paired(10, 0, 0),)).p_value == 1.0
    assert stats.Stratified((stats.Paired(10, 0, 0),)).smallest_p == 1.0
    assert stats.stratify([None, None]) is None
    # Full CIFAR-10 at 3 seeds: thousands of disagreements; the floor underflows to 0, the p is exact.
    many = stats.Stratified((stats.Paired(10000, 900, 1100), stats.Paired(10000, 950, 1000)))
    assert many.smallest_p == 0.0 and 0.0 < many.p_value < 1e-3


@pytest.mark.parametrize("counts", [[(1, 4), (0, 3), (2, 2)], [(12, 30), (9, 25)], [(5, 5)], [(0, 7), (3, 0), (40, 52)]])
def test_the_stratified_test_is_statsmodels_cmh_on_matched_pairs_and_scipys_binomial(counts):
    """Every image of every seed pairing as its own stratum (a 2x2 table: variant x right/wrong, one
    image each): statsmodels' Cochran-Mantel-Haenszel statistic over them is ours, and the exact p is
    scipy's two-sided binomial test on the pooled disagreements."""
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    from scipy.stats import binomtest

    tables = []
    for b, c in counts:
        both_right, both_wrong = 6, 4  # concordant pairs: no information, and no variance
        tables += [[[1, 0], [0, 1]]] * b + [[[0, 1], [1, 0]]] * c + [[[1, 0], [1, 0]]] * both_right \
            + [[[0, 1], [0, 1]]] * both_wrong
    strata = stats.Stratified(tuple(stats.Paired(b + c + 10, b, c) for b, c in counts))
    want = sm.StratifiedTable(np.array(tables, dtype=float).transpose(1, 2, 0)).test_null_odds(correction=False)
    assert strata.statistic == pytest.approx(want.statistic, rel=1e-9)
    b, c = strata.only_a, strata.only_b
    assert strata.p_value == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


@pytest.mark.parametrize("values", [[0.61, 0.6, 0.625], [0.5, 0.52], [0.7, 0.7, 0.7, 0.71]])
def test_the_mean_interval_is_scipys_t_interval(values):
    from scipy import stats as scipy_stats

    mean, sd, low, high = stats.mean_interval(values)
    assert mean == pytest.approx(np.mean(values)) and sd == pytest.approx(np.std(values, ddof=1))
    want = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (low, high) == pytest.approx(want)
    assert stats.mean_interval([0.6])[2:] == (None, None)


def test_seeds_pair_by_their_index_and_only_on_the_same_test_images():
    truth = np.array([0, 1, 2, 0, 1, 2])

    def scored(predicted, digest=DIGEST):
        return stats.Predictions(truth, np.array(predicted), np.ones(6), list(CLASSES), digest)

    best = {0: scored([0, 1, 2, 0, 1, 2]), 2: scored([0, 1, 2, 0, 0, 0])}  # seed 1 of the best did not finish
    other = {0: scored([0, 0, 0, 0, 1, 2]), 1: scored([1, 1, 1, 1, 1, 1]), 2: scored([0, 1, 2, 0, 1, 2])}
    paired = compare.pair_seeds(best, other)
    assert [(s.only_a, s.only_b) for s in paired.strata] == [(2, 0), (0, 2)]  # indices 0 and 2, not 0 and 1
    assert compare.pair_seeds(best, {0: scored([0] * 6, digest="f" * 64)}) is None  # other images: no pairing


# --------------------------------------------------------------------------- the repeats' data

def test_repeats_share_the_sampled_images_and_not_the_validation_split(image_folder):
    spec = specs.load("baseline", {"data": str(image_folder), "limit": 30, "test_limit": 9})
    loaded = [train.load_dataset(one) for one in repeats.seed_specs(spec, 3)]
    assert [one["seed"] for one in repeats.seed_specs(spec, 3)] == [1995, 1996, 1997]
    assert {one["sample_seed"] for one in repeats.seed_specs(spec, 3)} == {1995}
    assert len({d.digest for d in loaded}) == 1
    for d in loaded:
        assert list(d.x_test.paths) == list(loaded[0].x_test.paths)
        assert sorted([*d.x_train.paths, *d.x_val.paths]) == sorted([*loaded[0].x_train.paths, *loaded[0].x_val.paths])
    assert len({tuple(sorted(d.x_val.paths)) for d in loaded}) == 3  # each seed its own validation split
    # The default (sample_seed 0): the seed draws the samples, as before repeats.
    moved = train.load_dataset(dict(spec, seed=1996))
    assert moved.digest != loaded[0].digest


@pytest.mark.parametrize("value", ["0", "-1", "x"])
@pytest.mark.parametrize("command", [["train", "baseline"], ["suite", "--variants", "baseline"], ["tune"]])
def test_a_bad_repeats_is_one_line_and_exit_2(command, value, tracking):
    result = invoke(*command, "--repeats", value)
    assert_clear(result, 2, "Invalid value for '--repeats'")
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert runs.variant_runs() == []


def test_repeats_of_a_search_refuse_workers(tracking):
    assert_clear(invoke("tune", "--repeats", "2", "--workers", "2"), 2, "--repeats runs its one search in this process")


# --------------------------------------------------------------------------- repeated variants made by hand

def _predictions(run_id: str, right: np.ndarray) -> None:
    predicted = np.where(right, TRUTH, (TRUTH + 1) % len(CLASSES))
    probabilities = np.eye(len(CLASSES))[predicted] * 0.8 + 0.2 / len(CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "test_predictions.npz"
        file.write_bytes(stats.predictions_bytes(TRUTH, probabilities, CLASSES, DIGEST))
        mlflow.MlflowClient().log_artifact(run_id, str(file), "predictions")


def make_repeated(network, variant: str, rights: list, vals: list, *, models: bool = True) -> tuple[str, list[str]]:
    """A repeated variant as repeats.run leaves it: the parent with the aggregate, a seed run per
    array of `rights` (right or wrong per test image) with its predictions, best val_accuracy and model."""
    from tlkit import tracking as tracked

    common = {"variant": variant, "base": "VGG16", "dataset": "shapes", "dataset_digest": DIGEST}
    with mlflow.start_run(run_name=variant, tags={**common, runs.REPEATS: str(len(rights))}) as parent:
        seeds = []
        for index, (right, val) in enumerate(zip(rights, vals)):
            with mlflow.start_run(run_name=variant, nested=True, tags={
                    **common, runs.REPEAT_OF: parent.info.run_id, runs.REPEAT: str(index),
                    runs.REPEAT_SEED: str(1995 + index)}) as seed:
                mlflow.log_metrics({"test_accuracy": float(right.mean()), "epochs_run": 2})
                for step, value in enumerate((val / 2, val)):
                    mlflow.log_metric("val_accuracy", value, step=step)
                _predictions(seed.info.run_id, right)
                if models:
                    tracked.log_model(network, list(CLASSES), np.zeros((1, 32, 32, 3), np.uint8), specs.DEFAULTS)
            seeds.append(seed.info.run_id)
        mlflow.log_metrics(repeats.aggregate([float(r.mean()) for r in rights], vals))
    return parent.info.run_id, seeds


def right_on(fraction: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(IMAGES) < fraction


def test_compare_ranks_repeated_variants_on_the_mean_with_the_stratified_p(tracking, tiny_network):
    strong = [right_on(0.6, k) | right_on(0.3, 10 + k) for k in range(3)]  # about 72%
    weak = [right_on(0.6, k) for k in range(3)]  # about 60%: seed k agrees with strong's seed k but where it gains
    weak[2] = weak[2] | right_on(0.5, 99)  # one seed of the weaker variant above every strong seed
    first, first_seeds = make_repeated(tiny_network, "conv_head", strong, [0.7, 0.71, 0.72], models=False)
    second, _ = make_repeated(tiny_network, "baseline", weak, [0.6, 0.6, 0.8], models=False)
    rows = compare.compare()
    assert [(r["variant"], r["seeds"]) for r in rows] == [("conv_head", 3), ("baseline", 3)]  # no seed's own row
    top, other = rows
    mean, sd, low, high = stats.mean_interval([float(r.mean()) for r in strong])
    assert top["test_accuracy"] == pytest.approx(mean) and top["test_accuracy_sd"] == pytest.approx(sd)
    assert (top["test_accuracy_low"], top["test_accuracy_high"]) == pytest.approx((low, high))
    assert top["best_val_accuracy"] == pytest.approx(0.71) and top["p_vs_best"] is None
    # Seed k with seed k: b_k images only strong's seed k got right, c_k only weak's.
    b = sum(int((s & ~w).sum()) for s, w in zip(strong, weak))
    c = sum(int((w & ~s).sum()) for s, w in zip(strong, weak))
    assert other["p_vs_best"] == stats.mcnemar_exact(b, c) and other["p_smallest"] == pytest.approx(2 / 2 ** (b + c))
    assert other["diff_vs_best"] == pytest.approx(np.mean([w.mean() - s.mean() for s, w in zip(strong, weak)]))
    table = compare.render(rows, "table").splitlines()
    assert "p_cmh" in table[0] and "seeds" in table[0] and f"{low:.4f}-{high:.4f}" in table[1]
    assert "p_smallest" in compare.render(rows, "csv").splitlines()[0]
    assert first_seeds == [s.info.run_id for s in runs.seed_runs(mlflow.get_run(first))]
    assert second != first


def test_promotion_weighs_the_aggregate_and_registers_the_best_validation_seed(tracking, tiny_network):
    strong = [right_on(0.6, k) | right_on(0.3, 10 + k) for k in range(3)]
    weak = [right_on(0.6, k) for k in range(3)]
    weak[0] = weak[0] | right_on(0.6, 98)  # the best single seed is the weaker variant's
    parent, seeds = make_repeated(tiny_network, "conv_head", strong, [0.7, 0.75, 0.72])
    make_repeated(tiny_network, "baseline", weak, [0.9, 0.6, 0.6])
    assert max(float(w.mean()) for w in weak) > max(float(s.mean()) for s in strong)

    promoted = registry.promote()
    assert promoted.promoted and promoted.variant == "conv_head" and promoted.seeds == 3
    assert promoted.run_id == seeds[1] and promoted.repeats_run_id == parent  # val 0.75: seed 1996
    [version] = versions(NAME)
    mean, _, low, high = stats.mean_interval([float(s.mean()) for s in strong])
    assert version.tags["n_seeds"] == "3" and version.tags["seed"] == "1996" and version.tags["run_id"] == seeds[1]
    assert float(version.tags["test_accuracy_mean"]) == pytest.approx(mean)
    assert float(version.tags["test_accuracy"]) == pytest.approx(strong[1].mean())  # the model's own
    assert "at 3 seeds" in version.description and f"{100 * low:.2f}-{100 * high:.2f}%" in version.description
    assert "seed 1996's model" in version.description
    assert registry.promote().message.endswith("is already @champion")
    assert len(versions(NAME)) == 1


def test_the_aggregate_gate_refuses_noise_and_a_small_gain_and_takes_a_real_one(tracking, tiny_network):
    base = [right_on(0.6, k) for k in range(3)]
    make_repeated(tiny_network, "baseline", base, [0.6, 0.6, 0.6])
    assert registry.promote().promoted

    # A hair better on average: at every seed 5 images gained and 3 lost, within noise.
    close = [b.copy() for b in base]
    for c in close:
        gained, lost = np.flatnonzero(~c)[:5], np.flatnonzero(c)[:3]
        c[gained], c[lost] = True, False
    make_repeated(tiny_network, "l2", close, [0.61, 0.6, 0.6])
    kept = registry.promote()
    assert not kept.promoted and kept.champion == "1" and kept.variant == "l2"
    assert "within noise" in kept.message and "stratified McNemar" in kept.message
    assert kept.report["seed_pairings"] == 3 and kept.report["only_champion_right"] == 9
    assert kept.report["p_value"] == stats.mcnemar_exact(9, 15) and kept.report["gain_points"] == pytest.approx(100 * 2 / IMAGES)
    assert versions(NAME)[-1].tags["promotion_decision"] == "kept"

    # A clear gain at every seed: real (about +20 points), but below a 30-point --min-gain; then promoted without it.
    better = [b | right_on(0.5, 50 + k) for k, b in enumerate(base)]
    make_repeated(tiny_network, "conv_head", better, [0.8, 0.7, 0.7])
    demanding = registry.promote(min_gain=30)
    assert not demanding.promoted and "below the required 30 pts" in demanding.message
    taken = registry.promote()
    assert taken.promoted and taken.variant == "conv_head" and taken.champion == taken.version
    assert taken.report["p_value"] < 1e-6 and taken.report["test"] == registry.REPEATED_TEST
    assert mlflow.artifacts.load_dict(f"runs:/{taken.repeats_run_id}/promotion/report.json")["promoted"]


# --------------------------------------------------------------------------- the commands, for real

@pytest.mark.e2e
def test_train_repeats_makes_seed_runs_under_one_parent_with_their_aggregate(tracking, image_folder):
    result = cli("train", "baseline", "--data", str(image_folder), *FAST_ARGS, "--epochs", "1", "--limit", "30",
                 "--test-limit", "9", "--repeats", "3")
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient()
    [parent] = [r for r in runs.variant_runs() if runs.is_repeated(r)]
    assert parent.info.status == "FINISHED" and parent.data.tags[runs.REPEATS] == "3"
    seeds = runs.seed_runs(parent)
    assert [s.data.tags["mlflow.parentRunId"] for s in seeds] == [parent.info.run_id] * 3
    assert [(s.data.tags[runs.REPEAT], s.data.params["seed"], s.data.params["sample_seed"]) for s in seeds] == [
        ("0", "1995", "1995"), ("1", "1996", "1995"), ("2", "1997", "1995")]
    assert {s.data.tags["dataset_digest"] for s in seeds} == {parent.data.tags["dataset_digest"]}
    assert all(s.info.status == "FINISHED" and s.data.tags["variant"] == "baseline" for s in seeds)
    assert [s.info.run_name for s in seeds] == ["baseline-seed1995", "baseline-seed1996", "baseline-seed1997"]
    assert parent.info.run_name == "baseline"
    accuracies = [s.data.metrics["test_accuracy"] for s in seeds]
    vals = [max(m.value for m in client.get_metric_history(s.info.run_id, "val_accuracy")) for s in seeds]
    m = parent.data.metrics
    assert m["n_seeds"] == 3 and m["test_accuracy"] == pytest.approx(np.mean(accuracies))
    assert m["test_accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert m["test_accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1))
    assert m["val_accuracy_mean"] == pytest.approx(np.mean(vals))
    truths = [compare.seed_predictions(parent, seeds)[k].truth for k in range(3)]
    assert all(np.array_equal(t, truths[0]) for t in truths)  # the same test images, so they pair
    assert f"run {parent.info.run_id}: test_accuracy mean" in result.output
    [row] = compare.compare()
    assert row["run_id"] == parent.info.run_id and row["seeds"] == 3


@pytest.mark.e2e
def test_a_suite_with_repeats_nests_variants_searches_once_and_promotes_on_the_aggregate(tracking, image_folder):
    result = cli("suite", "--variants", "baseline,tune", "--data", str(image_folder), *FAST_ARGS, "--epochs", "1",
                 "--limit", "30", "--test-limit", "9", "--repeats", "2")
    assert result.exit_code == 0, result.output
    [suite] = mlflow.search_runs(filter_string="tags.suite_variants != ''", output_format="list")
    children = runs.variant_runs(suite=suite.info.run_id)
    assert sorted(c.data.tags["variant"] for c in children) == ["baseline", "tune"]
    assert all(runs.is_repeated(c) and c.data.tags["mlflow.parentRunId"] == suite.info.run_id for c in children)
    tuned = next(c for c in children if c.data.tags["variant"] == "tune")
    [search] = mlflow.search_runs(filter_string=f"tags.`{runs.REPEAT_OF}` = '{tuned.info.run_id}' and "
                                                f"tags.`{runs.REPEAT}` = 'search'", output_format="list")
    assert search.data.tags["mlflow.parentRunId"] == tuned.info.run_id
    best = mlflow.artifacts.load_dict(f"runs:/{search.info.run_id}/spec.json")
    for seed in runs.seed_runs(tuned):  # the search's best configuration, at each seed
        assert seed.data.params["units"] == str(best["units"]) and seed.data.params["l2"] == str(best["l2"])
    assert len(runs.seed_runs(tuned)) == 2
    assert "p_cmh" in result.output and "seeds" in result.output
    rows = compare.compare(suite=suite.info.run_id)
    assert [r["seeds"] for r in rows] == [2, 2]
    assert "over 2 seeds" in result.output and "@champion" in result.output
    [version] = versions(f"{image_folder.name}-vgg16")
    assert version.tags["n_seeds"] == "2" and version.tags["repeats_run_id"] == rows[0]["run_id"]
