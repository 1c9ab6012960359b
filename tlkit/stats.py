"""How sure a test accuracy is: Wilson intervals, McNemar's exact test on paired predictions, its
stratified form over repeats at several seeds, the t-interval of a mean over seeds, and the
per-image predictions file every run logs so that any two runs can be paired later.

Two runs scored on the same test images (the same dataset digest) are paired: on each image both
are right, both wrong, or one of them right. Only the images where they disagree say which is
better; McNemar's exact test asks whether the split of those disagreements could be a fair coin's.
Two variants repeated at several seeds are paired seed by seed (seed k of one with seed k of the
other, on the same test images): Stratified holds one such pairing per stratum.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals
PREDICTIONS_ARTIFACT = "predictions/test_predictions.npz"  # in every run that logs test_accuracy


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion correct/total (95% by default). Unlike the normal
    approximation it stays inside [0, 1] and is sound near 0 and 1 and for small totals."""
    if total <= 0:
        return (float("nan"), float("nan"))
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact p-value of McNemar's test: the images only the first got right against those
    only the second got right, under the null that each disagreement is a fair coin (binomial
    n = b + c, p = 1/2; doubled tail, capped at 1). No disagreement: p = 1."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    # The tail in exact integer arithmetic: sums of binomial coefficients over 2^n, no underflow.
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclass(frozen=True)
class Paired:
    """Two runs' outcomes on the same test images."""

    images: int
    only_a: int  # images a got right and b wrong
    only_b: int  # images b got right and a wrong

    @property
    def gain(self) -> float:
        """b's accuracy minus a's, as a fraction."""
        return (self.only_b - self.only_a) / self.images

    def gain_interval(self, z: float = Z95) -> tuple[float, float]:
        """95% interval of the gain from the paired outcomes (Wald on the discordant counts: the
        variance of a paired difference of proportions is ((b + c) - (c - b)^2 / n) / n^2)."""
        n, b, c = self.images, self.only_a, self.only_b
        half = z * math.sqrt(max(0.0, (b + c) - (c - b) ** 2 / n)) / n
        return (self.gain - half, self.gain + half)

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.only_a, self.only_b)


def mean_interval(values, confidence: float = 0.95) -> tuple[float, float, float | None, float | None]:
    """(mean, sd, low, high) of a few values, one per seed: the sample sd (n - 1) and the two-sided
    t-interval mean +- t(n - 1) sd / sqrt(n). t, not the normal 1.96: the sd is itself estimated
    from the n values, and with n = 3 the 97.5% quantile is t(2) = 4.30, not 1.96, so a normal
    interval would be less than half as wide as it must be. One value: sd nan, no interval."""
    from scipy.stats import t

    values = np.asarray(list(values), dtype=float)
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"), None, None)
    mean = float(values.mean())
    if n == 1:
        return (mean, float("nan"), None, None)
    sd = float(values.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return (mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Stratified:
    """Two variants' paired outcomes at several seed pairings (seed k of a with seed k of b, both on
    the same test images), one stratum each, and the Cochran-Mantel-Haenszel test across them.

    Each image of a stratum is a matched pair (a's answer, b's answer). The CMH test whose strata
    are these matched pairs is a function of the discordant counts alone, summed over the seed
    strata: concordant pairs carry no information (their table's variance is 0), and a discordant
    pair contributes 1/2 to sum(O - E) with variance 1/4, so the statistic is

        X2 = (sum_k b_k - sum_k c_k)^2 / sum_k (b_k + c_k)

    (b_k: images only a got right at pairing k; c_k: only b), McNemar's statistic on the strata's
    pooled disagreements. The p-value is the exact conditional one, not X2's chi-square tail:
    given each stratum's n_k = b_k + c_k disagreements, under the null (on every image, at every
    pairing, a and b equally likely to be the one that is right) each b_k is Binomial(n_k, 1/2),
    independently, since different seeds train independently, so sum b_k is Binomial(N, 1/2) with
    N = sum n_k, and p = min(1, 2 P(X <= min(B, C))). Exact, because it is valid at every count
    (a small test set, or a few classes, leaves few disagreements, where the chi-square tail is
    off) and errs only on the conservative side (a mid-p is smaller but can exceed its level); and
    with one stratum it is McNemar's exact test itself, so one seed per variant is gated exactly
    as before repeats existed. Its smallest reachable p, all N disagreements going one way, is
    2 / 2^N (smallest_p). A test on the per-seed accuracies alone cannot get near that: a sign or
    signed-rank test on 3 paired differences never goes below 2 / 2^3 = 0.25, and a paired t-test
    on them has 2 degrees of freedom; the per-image outcomes carry the evidence."""

    strata: tuple[Paired, ...]

    @property
    def only_a(self) -> int:
        return sum(s.only_a for s in self.strata)

    @property
    def only_b(self) -> int:
        return sum(s.only_b for s in self.strata)

    @property
    def disagreements(self) -> int:
        return self.only_a + self.only_b

    @property
    def gain(self) -> float:
        """b's accuracy minus a's, as a fraction, averaged over the strata."""
        return sum(s.gain for s in self.strata) / len(self.strata)

    @property
    def statistic(self) -> float:
        """The CMH chi-square statistic (no continuity correction); 0 without disagreements."""
        n = self.disagreements
        return (self.only_a - self.only_b) ** 2 / n if n else 0.0

    @property
    def p_value(self) -> float:
        """Exact conditional two-sided p (see the class)."""
        return mcnemar_exact(self.only_a, self.only_b)

    @property
    def smallest_p(self) -> float:
        """The smallest p these strata could give with their number of disagreements: 2 / 2^N (1 if N <= 1)."""
        # A float power: 2.0 / 2 ** N converts 2 ** N to a float, which overflows past N = 1023
        # (a full CIFAR-10 comparison has thousands of disagreements); this underflows to 0.0.
        return min(1.0, 2.0 ** (1 - self.disagreements))


def stratify(pairings) -> Stratified | None:
    """Stratified over the pairings that are paired (Paired, or None where two runs were scored on
    other images); None if none is."""
    strata = tuple(p for p in pairings if p is not None)
    return Stratified(strata) if strata else None


def pair(truth, predicted_a, predicted_b) -> Paired:
    truth, a, b = (np.asarray(v) for v in (truth, predicted_a, predicted_b))
    if not (truth.shape == a.shape == b.shape):
        raise ValueError(f"paired predictions differ in length: {len(truth)}, {len(a)}, {len(b)}")
    right_a, right_b = a == truth, b == truth
    return Paired(images=len(truth), only_a=int(np.sum(right_a & ~right_b)), only_b=int(np.sum(right_b & ~right_a)))


def per_class_accuracy(truth, predicted, num_classes: int) -> np.ndarray:
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    return np.array([float(np.mean(predicted[truth == k] == k)) if np.any(truth == k) else float("nan")
                     for k in range(num_classes)])


# --- the per-image predictions file -----------------------------------------------------------

@dataclass
class Predictions:
    """A run's predictions on its test images, in the data set's order."""

    truth: np.ndarray  # true class index per image
    predicted: np.ndarray  # predicted class index per image
    probability: np.ndarray  # the predicted class's probability
    class_names: list[str]
    dataset_digest: str

    @property
    def correct(self) -> int:
        return int(np.sum(self.truth == self.predicted))

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.truth)

    def interval(self) -> tuple[float, float]:
        """Wilson's 95% interval of this run's test accuracy."""
        return wilson_interval(self.correct, len(self.truth))

    def paired_with(self, other: "Predictions") -> Paired | None:
        """This run (a) against `other` (b) image by image; None unless both were scored on the very
        same test images (one digest, the same true classes in the same order)."""
        if (self.dataset_digest != other.dataset_digest or self.truth.shape != other.truth.shape
                or not np.array_equal(self.truth, other.truth)):
            return None
        return pair(self.truth, self.predicted, other.predicted)


def predictions_bytes(truth, probabilities: np.ndarray, class_names, dataset_digest: str) -> bytes:
    """The .npz file (about 9 bytes an image): int16 classes, float32 probability, names, digest."""
    probabilities = np.asarray(probabilities)
    out = io.BytesIO()
    np.savez_compressed(out, truth=np.asarray(truth).astype(np.int16),
                        predicted=probabilities.argmax(axis=1).astype(np.int16),
                        probability=probabilities.max(axis=1).astype(np.float32),
                        class_names=np.asarray(list(class_names)), dataset_digest=np.asarray(dataset_digest))
    return out.getvalue()


def read_predictions(data: bytes) -> Predictions:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return Predictions(truth=arrays["truth"].astype(int), predicted=arrays["predicted"].astype(int),
                           probability=arrays["probability"], class_names=[str(c) for c in arrays["class_names"]],
                           dataset_digest=str(arrays["dataset_digest"]))
