"""Uncertainty where a test accuracy is shown, and promotions that mean something: the statistics
against scipy, and promote's decisions on runs in a temporary store whose per-image predictions the
test builds, so the right answer is known."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tlkit import compare, registry, stats

from conftest import CLASSES, invoke, versions

DIGEST = "d" * 64
NAME = "shapes-vgg16"  # the default name promote gives: <dataset>-<base>
IMAGES = 1200


# --------------------------------------------------------------------------- the statistics

@pytest.mark.parametrize("correct, total", [(6087, 10000), (0, 20), (20, 20), (7, 9), (1, 1)])
def test_wilson_interval_is_scipys(correct, total):
    from scipy.stats import binomtest

    want = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    got = stats.wilson_interval(correct, total)
    assert got == pytest.approx((want.low, want.high), abs=1e-9)


@pytest.mark.parametrize("b, c", [(0, 0), (0, 5), (3, 12), (40, 60), (250, 318), (7, 7)])
def test_mcnemar_exact_is_scipys_two_sided_binomial_test(b, c):
    from scipy.stats import binomtest

    want = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(want, rel=1e-9)


def test_a_hand_computed_case():
    # b = 1, c = 5: P(X <= 1) for Binomial(6, 1/2) = (1 + 6) / 64; two-sided: 14 / 64.
    assert stats.mcnemar_exact(1, 5) == 14 / 64
    paired = stats.pair([0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 1])
    assert (paired.only_a, paired.only_b, paired.images) == (2, 5, 8)  # a right on 1 and 7... b on 2-6
    assert paired.gain == pytest.approx(3 / 8)
    low, high = paired.gain_interval()
    half = 1.959963984540054 * np.sqrt((2 + 5) - 3 ** 2 / 8) / 8
    assert (low, high) == pytest.approx((3 / 8 - half, 3 / 8 + half))


def test_the_predictions_file_round_trips_and_is_small():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10), size=10000).astype("float32")
    truth = rng.integers(0, 10, 10000)
    data = stats.predictions_bytes(truth, probabilities, [f"c{i}" for i in range(10)], DIGEST)
    assert len(data) < 120_000  # 10,000 images
    back = stats.read_predictions(data)
    np.testing.assert_array_equal(back.truth, truth)
    np.testing.assert_array_equal(back.predicted, probabilities.argmax(axis=1))
    np.testing.assert_allclose(back.probability, probabilities.max(axis=1))
    assert back.class_names[3] == "c3" and back.dataset_digest == DIGEST


# --------------------------------------------------------------------------- runs with known answers

TRUTH = np.arange(IMAGES) % len(CLASSES)


def answers(right: np.ndarray) -> np.ndarray:
    """Predicted classes: the truth where `right`, another class elsewhere."""
    return np.where(right, TRUTH, (TRUTH + 1) % len(CLASSES))


def make_run(network, predicted: np.ndarray | None, *, variant: str, accuracy: float | None = None) -> str:
    """A finished variant run as train.py leaves it, with these per-image predictions (None: a run
    logged before tlkit logged them)."""
    from tlkit import spec as specs, tracking

    accuracy = float(np.mean(predicted == TRUTH)) if accuracy is None else accuracy
    with mlflow.start_run(run_name=variant) as run:
        mlflow.set_tags({"variant": variant, "base": "VGG16", "dataset": "shapes", "dataset_digest": DIGEST})
        mlflow.log_metrics({"test_accuracy": accuracy, "epochs_run": 2})
        if predicted is not None:
            probabilities = np.eye(len(CLASSES))[predicted] * 0.8 + 0.2 / len(CLASSES)
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / "test_predictions.npz"
                file.write_bytes(stats.predictions_bytes(TRUTH, probabilities, CLASSES, DIGEST))
                mlflow.log_artifact(str(file), "predictions")
        tracking.log_model(network, list(CLASSES), np.zeros((1, 32, 32, 3), np.uint8), specs.DEFAULTS)
    return run.info.run_id


def right_on(fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random(IMAGES) < fraction


def champion_version() -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def test_a_clear_gain_is_promoted_with_its_evidence_recorded(tracking, tiny_network):
    base = right_on(0.60, 1)
    first = make_run(tiny_network, answers(base), variant="baseline")
    assert registry.promote().promoted  # no champion yet: the best run becomes it
    assert versions(NAME)[0].description.endswith("It became @champion: there was none.")
    better = base | right_on(0.5, 2)  # right wherever the champion was, and on half of the rest
    candidate = make_run(tiny_network, answers(better), variant="finetune")
    result = registry.promote()
    assert result.promoted and result.run_id == candidate and champion_version() == result.version
    report = result.report
    assert report["p_value"] < 1e-10 and report["only_champion_right"] == 0
    assert report["gain_points"] == pytest.approx(100 * (better.mean() - base.mean()))
    low, high = report["gain_interval_points"]
    assert low < report["gain_points"] < high and low > 0
    assert "McNemar p = " in result.message and "is now @champion" in result.message
    version = versions(NAME)[-1]
    assert version.tags["promotion_decision"] == "promoted" and float(version.tags["promotion_p_value"]) < 1e-10
    assert version.tags["promotion_against"] == "1"
    assert "finetune variant" in version.description and "95% interval" in version.description
    assert first not in version.description and candidate in version.description
    saved = json.loads(mlflow.artifacts.load_text(f"runs:/{candidate}/promotion/report.json"))
    assert saved["promoted"] and saved["champion_version"] == "1"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(candidate, "promotion")}
    assert artifacts == {"promotion/report.json", "promotion/per_class_accuracy.png"}
    # Promoting again: nothing new registered, the champion stays.
    again = registry.promote()
    assert not again.registered and len(versions(NAME)) == 2 and "already @champion" in again.message


def test_a_gain_within_noise_keeps_the_champion_and_says_so(tracking, tiny_network):
    base = right_on(0.60, 3)
    make_run(tiny_network, answers(base), variant="baseline")
    registry.promote()
    # Half a point better, but the two disagree on 586 images, split 296 to 290: a fair coin's split.
    noisy = base.copy()
    noisy[np.flatnonzero(base)[:290]] = False
    noisy[np.flatnonzero(~base)[:296]] = True
    assert noisy.mean() - base.mean() == pytest.approx(6 / IMAGES)
    make_run(tiny_network, answers(noisy), variant="conv_head")
    result = registry.promote()
    assert not result.promoted and champion_version() == "1"
    assert "within noise" in result.message and "champion kept" in result.message
    assert result.report["p_value"] > 0.05
    assert versions(NAME)[-1].tags["promotion_decision"] == "kept"
    # --significance 1 is the old rule: any gain wins.
    forced = invoke("promote", "--significance", "1")
    assert forced.exit_code == 0, forced.output
    assert "is now @champion" in forced.output and champion_version() == "2"


def test_a_per_class_regression_is_reported_beside_the_overall_gain(tracking, tiny_network):
    base = right_on(0.5, 6)
    make_run(tiny_network, answers(base), variant="baseline")
    registry.promote()
    better = base | right_on(0.8, 7)
    better[TRUTH == 0] = base[TRUTH == 0] & right_on(0.5, 8)[TRUTH == 0]  # class 0 gets worse
    make_run(tiny_network, answers(better), variant="augment")
    result = invoke("promote")
    assert result.exit_code == 0, result.output
    per_class = mlflow.artifacts.load_dict(f"runs:/{versions(NAME)[-1].run_id}/promotion/report.json")["per_class"]
    assert [row["class"] for row in per_class] == list(CLASSES)
    assert per_class[0]["change_points"] < -10 and per_class[1]["change_points"] > 10
    assert "per-class accuracy change (candidate - champion, points): circle -" in result.output


def test_min_gain_is_required_on_top_of_significance(tracking, tiny_network):
    base = right_on(0.6, 9)
    make_run(tiny_network, answers(base), variant="baseline")
    registry.promote()
    better = base | right_on(0.05, 10)  # about 2 points, all on images the champion missed
    make_run(tiny_network, answers(better), variant="dropout")
    gain = 100 * (better.mean() - base.mean())
    kept = registry.promote(min_gain=gain + 1)
    assert not kept.promoted and f"below the required {gain + 1:g} pts" in kept.message
    assert registry.promote(min_gain=gain - 0.5).promoted


def test_a_champion_without_predictions_falls_back_to_the_old_rule(tracking, tiny_network):
    make_run(tiny_network, None, variant="baseline", accuracy=0.60)
    registry.promote()
    make_run(tiny_network, answers(right_on(0.605, 11)), variant="sgd", accuracy=0.605)
    result = registry.promote()
    assert result.promoted and "the champion has no per-image test predictions" in result.message
    assert versions(NAME)[-1].tags["promotion_test"].startswith("none")


@pytest.mark.parametrize("args, message", [(["--min-gain", "-1"], "--min-gain must be 0 or more"),
                                           (["--significance", "0"], "--significance must be in (0, 1]"),
                                           (["--significance", "1.5"], "--significance must be in (0, 1]")])
def test_a_bad_gate_is_one_line_and_exit_2(args, message, tracking):
    result = invoke("promote", *args)
    assert result.exit_code == 2 and message in result.output


def test_compare_shows_intervals_and_mcnemar_against_the_best(tracking, tiny_network):
    base = right_on(0.6, 12)
    best = base | right_on(0.5, 13)
    make_run(tiny_network, answers(base), variant="baseline")
    make_run(tiny_network, answers(best), variant="finetune")
    make_run(tiny_network, None, variant="old", accuracy=0.5)
    rows = compare.compare()
    assert [r["variant"] for r in rows] == ["finetune", "baseline", "old"]
    top, second, old = rows
    want = stats.wilson_interval(int(best.sum()), IMAGES)
    assert (top["test_accuracy_low"], top["test_accuracy_high"]) == pytest.approx(want)
    assert top["diff_vs_best"] == 0 and top["p_vs_best"] is None
    assert second["diff_vs_best"] == pytest.approx(base.mean() - best.mean())
    assert second["p_vs_best"] == pytest.approx(stats.mcnemar_exact(int((best & ~base).sum()), 0))
    assert old["test_accuracy_low"] is None and old["p_vs_best"] is None
    table = compare.render(rows, "table").splitlines()
    assert "95%_interval" in table[0] and "p_mcnemar" in table[0]
    assert f"{want[0]:.4f}-{want[1]:.4f}" in table[1]
    assert json.loads(compare.render(rows, "json"))[1]["p_vs_best"] == second["p_vs_best"]
    assert "test_accuracy_low" in compare.render(rows, "csv").splitlines()[0]
