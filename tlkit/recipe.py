"""The recipe search: the best configuration for these images and these bases, within a time budget.

The notebook tried one lever at a time at 32 px and stopped near 61%. The levers that matter are
the base, the image size and its preprocessing (the frozen features), the head, flips and
fine-tuning, and each costs a pass of the base or epochs through a block. The search spends on the
good candidates, successive halving across fidelities:

    probe    a few batches of each input's pass, a few steps of each head and fine-tuning depth
    plan     every candidate with its estimated seconds; what the budget leaves out, and its cost
    screen   every input x head (candidates.py) on a stratified sample, a third of the epochs
    screen-ft each base's best input fine-tuned on the sample (the bases' order), the leader's also
             with flips in training and at test time (whether fine-tuning takes them)
    full     the best third of the screen on every image, every epoch
    flip     the best with cached flips (one more pass, of the training images)
    finetune the best, its top blocks unfrozen: the fine-tuning levers, in the order the budget buys

Every configuration is a nested run of an ordinary `tlkit train` (its spec as a .toml diff, its
fidelity in its params, its metrics, reports and model), chosen on validation accuracy
(`val_accuracy_final`, the model as it ends); test accuracy is logged and never used to choose.
Configurations that share an input share its cached pass, and the full rung caches below the
deepest fine-tuning depth, so one pass serves every depth. Nothing starts whose estimate does not
fit in what is left of the budget (budget.py), and epochs stop at the budget's end. The best
configuration so far is written as a variant file (`--output`) after every rung, so a failure
later loses nothing: `tlkit train <file>` reruns it alone.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tlkit import budget as budgets
from tlkit import candidates, deadlines, models, tracking, train
from tlkit import spec as specs
from tlkit.messages import first_line

log = logging.getLogger(__name__)

DEFAULT_BUDGET = "30m"  # without --budget: enough to screen and fine-tune on CIFAR-10-sized data here
SCREEN_IMAGES = 5000  # training and validation images a screened candidate sees at most (a tenth of CIFAR-10)
SCREEN_TEST_IMAGES = 1000  # test images it is scored on (logged, never chosen on)
SCREEN_SHARE = 0.35  # the screen may plan at most this share of the budget
# A screen candidate is left out when its run on every image is estimated at more than this many
# times what the budget leaves after the screen (Search.prune).
PRUNE_MARGIN = 1.5
ETA = 3  # successive halving: the best 1/ETA of a rung go on to the next
# Fine-tuning that does not fit at its epochs runs at the most that fit, down to this many: its
# cosine schedule decays over the epochs it has (the 45-minute VGG16 run left fine-tuning out,
# 1,670 s for 6 epochs with 16 minutes left, where 3 epochs would have fit).
MIN_FINETUNE_EPOCHS = 2
# The screen's best input of each base is also fine-tuned on the sample for this many epochs, and
# the bases go on in the order those reach, a tie within one standard error to the cheaper on every
# image (rank_by_bases).
FINETUNE_SCREEN_EPOCHS = 2
# ... and the leader's once more with these: flips in training (from cached mirrored features, a
# coin per image per epoch) and at test time. Fine-tuning on every image takes each where it paid on
# validation in that screen (paying_extras) and fits the budget at its epochs (first_finetune).
FINETUNE_SCREEN_EXTRAS = {"flip": True, "tta": True}
# ... and in 16-bit compute, where the probe says that fine-tuning the leader on every image (its
# pass and its epochs) would take at most 1/PRECISION_SPEEDUP of the time in float32. On an AMD EPYC
# Zen 4 (AVX512_BF16) VGG16's pass at 64 px ran 2.0-2.6x faster in mixed_bfloat16 and block5's
# training step 1.1-1.3x (benchmarks/precision.py); a CPU without bf16 instructions emulates it,
# slower, and never gets here. The rest of the search takes it where the sample's validation
# accuracy held (keeps_precision): the time it saves buys flips or epochs in fine-tuning.
FASTER_PRECISION = "mixed_bfloat16"
PRECISION_SPEEDUP = 1.25
# Below this budget the lever is not tried: its probe (a second pass and step of every input: 6 s
# of a 60-s search on a tiny folder, where CI then ran 7.6 s over) and its screen cost more than
# a pass it could shorten.
PRECISION_MIN_BUDGET_SECONDS = 600
# The full rung's pass stops below the deepest fine-tuning candidate: one pass serves every depth.
DEEPEST = max((lever["unfreeze"] for lever in candidates.finetunes()), key=lambda depth: int(depth[3:]))
# ... and the fine-tuning screen tries that depth on the leader too, where it could run on every
# image at MIN_FINETUNE_EPOCHS in what is left: fine-tuning on every image then takes the depth that
# reached more on the sample (VGG16's two top blocks: +2.8 points over one on a 10,000-image sample,
# benchmarks/finetune_levers.py), at the most epochs that fit.
DEEPER_FINETUNE = next(lever for lever in candidates.finetunes() if lever["unfreeze"] == DEEPEST)
DEEPER_FINETUNE_SCREEN = {**DEEPER_FINETUNE, "finetune_epochs": FINETUNE_SCREEN_EPOCHS}  # at the screen's epochs
# The fine-tuning screen's re-runs that the plan does not keep back from the screen's share.
AFTER_THE_SCREEN = ("extras", "deeper")


class RecipeError(RuntimeError):
    """The search cannot go on (nothing could run): the message says why."""


@dataclass
class Tried:
    rung: str  # screen, screen-ft, full, head, finetune, tta, flip
    name: str  # the nested run's name, e.g. screen-3
    diff: dict  # its fields that differ from the search's own spec
    spec: dict  # everything it ran with
    estimate: float = 0.0  # seconds, before it started
    run_id: str = ""
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    val_accuracy_without_tta: float | None = None  # with tta: the same weights scored without the flips
    seconds: float = 0.0
    ended_at: float = 0.0  # seconds since the process started, when it ended
    error: str = ""


@dataclass
class RecipeResult:
    run_id: str
    chosen: Tried | None
    tried: list[Tried] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)  # {"rung", "diff", "estimate"}: what more time would buy
    seconds: float = 0.0
    variant_text: str = ""  # the chosen configuration as a variant file (also the parent's chosen.toml)


def variant_file(diff: dict, description: str) -> str:
    """A spec diff as an experiments/-style .toml file (a variant `tlkit train` accepts)."""
    lines = [f"description = {json.dumps(description)}"]
    for key, value in diff.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


def parse_bases(base: str, weights: str) -> dict[str, str]:
    """--base VGG16,Xception --weights VGG16=PATH,Xception=PATH -> {base: weights}. One base and
    one weights value (a path, 'imagenet', 'none') stands for itself; one value for several bases
    is each base's."""
    names = [b.strip() for b in base.split(",") if b.strip()]
    if not names:
        raise specs.SpecError("--base names no base")
    for name in names:
        if name not in models.BASES:
            raise specs.SpecError(f"unknown base {name!r}; choose one of {', '.join(models.BASES)}")
    given = [w.strip() for w in weights.split(",") if w.strip()] or ["imagenet"]
    if not any("=" in w for w in given):
        if len(given) != 1:
            raise specs.SpecError(f"--weights {weights!r}: give one value, or BASE=PATH for each base")
        return {name: given[0] for name in names}
    pairs = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise specs.SpecError(f"--weights {item!r} names no base of --base {base} (use BASE=PATH)")
        pairs[name.strip()] = value.strip()
    missing = [n for n in names if n not in pairs]
    if missing:
        raise specs.SpecError(f"--weights gives nothing for {', '.join(missing)} (use BASE=PATH for each base)")
    return pairs


class Search:
    """One recipe search under one parent run: the steps of `search`, each a method."""

    def __init__(self, overrides: dict, bases: dict[str, str], clock: budgets.Clock, cache_dir: str | None,
                 say=None):
        if overrides.get("precision") == "auto":  # MLproject's recipe default: the search decides, as unset
            overrides = {**overrides, "precision": None}
        self.base_spec = specs.load("baseline", {**overrides, "base": next(iter(bases)),
                                                 "weights": next(iter(bases.values()))})
        self.bases, self.clock, self.cache_dir = bases, clock, cache_dir
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.costs = budgets.Costs()
        self.tried: list[Tried] = []
        self.left_out: list[dict] = []
        self.best: Tried | None = None  # at the highest fidelity reached
        self.counts: dict[tuple, dict[str, int]] = {}  # (limit, test_limit) -> images per split
        self._datasets: dict[tuple, object] = {}
        self.pools: tuple[int, int] | None = None  # (training, test) images the data has
        self.screen_fields = {}
        self.screen_allowance = 0.0  # seconds the screen may take (plan)
        self.finetune_extras: dict = {}  # those of FINETUNE_SCREEN_EXTRAS the fine-tuning screen found paying
        # FASTER_PRECISION is a lever unless the user named a precision (--precision float32 keeps it).
        self.precisions = [self.base_spec["precision"]] + (
            [FASTER_PRECISION] if overrides.get("precision") is None and self.base_spec["precision"] != FASTER_PRECISION
            and clock.budget >= PRECISION_MIN_BUDGET_SECONDS else [])
        self.decided: dict = {}  # fields the search has settled for every run after (the precision)
        self.finetune_lever: dict = candidates.finetunes()[0]  # the depth fine-tuning on every image starts with
        self.on_every_image: dict[str, float] = {}  # base -> its leader's full run and fine-tuning, estimated

    # --- before any long work --------------------------------------------------------------------
    def check(self) -> list[dict]:
        """Every candidate legal for its base; returns the screen's candidates."""
        median = candidates.median_side(self.base_spec["data"])
        screen = candidates.screen(self.bases, median)
        candidates.check(screen, self.base_spec)
        for base in self.bases:
            candidates.check([{**c, "base": base, "weights": self.bases[base],
                               "image_size": candidates.image_sizes(base, median)[-1],
                               "preprocess": "base"} for c in candidates.finetunes()], self.base_spec)
        self.say(f"recipe: images' median side {median} px; screening "
                 + "; ".join(f"{b} at {', '.join(map(str, candidates.image_sizes(b, median)))} px" for b in self.bases))
        limit, test_limit = self.base_spec["limit"], self.base_spec["test_limit"]
        self.screen_fields = {"limit": min(limit, SCREEN_IMAGES) if limit else SCREEN_IMAGES,
                              "test_limit": min(test_limit, SCREEN_TEST_IMAGES) if test_limit else SCREEN_TEST_IMAGES,
                              "epochs": max(1, math.ceil(self.base_spec["epochs"] / ETA))}
        return screen

    def dataset(self, spec: dict):
        key = train.data_key(spec)
        if key not in self._datasets:
            self._datasets.clear()  # one data set at a time: a decoded 64 px CIFAR-10 is 740 MB
            self._datasets[key] = train.load_dataset(spec)
            found = self._datasets[key]
            self.counts[(spec["limit"], spec["test_limit"])] = {
                "train": len(found.y_train), "val": len(found.y_val), "test": len(found.y_test)}
        return self._datasets[key]

    def images(self, spec: dict) -> dict[str, int]:
        """Images per split at the spec's sample: as loaded, or from the counts of the data's files
        (no scan of the images before they are needed)."""
        fidelity = (spec["limit"], spec["test_limit"])
        if fidelity in self.counts:
            return self.counts[fidelity]
        if self.pools is None:
            self.pools = candidates.image_counts(spec["data"])
        train_pool, test_pool = self.pools
        seen = min(spec["limit"], train_pool) if spec["limit"] else train_pool
        val = math.ceil(seen * 0.1)  # data.split_and_encode's 10%
        return {"train": seen - val, "val": val,
                "test": min(spec["test_limit"], test_pool) if spec["test_limit"] else test_pool}

    def probe(self, screen: list[dict]) -> None:
        """The rates of every input of the screen; fine-tuning depths at each base's largest size,
        scaled to the others by their pixels (a block's work grows with its maps' area)."""
        started = time.perf_counter()
        num_classes = None
        depths = sorted({c["unfreeze"] for c in candidates.finetunes()})
        largest_head = max(candidates.HEADS, key=lambda h: h.get("units", 0))
        for base in self.bases:
            sizes = sorted({c["image_size"] for c in screen if c["base"] == base})
            for precision in self.precisions:
                for size in reversed(sizes):
                    spec = specs.merge({"base": base, "image_size": size, "preprocess": "base", "precision": precision},
                                       self.base_spec)
                    if num_classes is None:
                        num_classes = len(self.dataset(dict(spec, **self.screen_fields)).class_names)
                    top = sizes[-1]
                    rates = budgets.probe(spec, num_classes, depths if size == top else [], largest_head)
                    if size != top:
                        ratio = (size / top) ** 2
                        rates.finetune_sample = {d: s * ratio for d, s in
                                                 self.costs.rates[(base, top, precision)].finetune_sample.items()}
                    self.costs.rates[budgets.rates_key(spec)] = rates
        self.say(f"recipe: probed {len(self.costs.rates)} inputs in {time.perf_counter() - started:.0f} s "
                 f"[{budgets.minutes(self.clock.elapsed())} in, {budgets.minutes(self.clock.left())} left]")

    def order(self, screen: list[dict]) -> list[dict]:
        """The order the screen runs in: every input once with the seed's head, cheapest first, then
        the other head levers the same way, so a short budget still sees every size and base."""
        return sorted(screen, key=lambda c: (_head_tier(c), self._estimate(c, self.screen_fields)))

    def prune(self, ordered: list[dict]) -> list[dict]:
        """The screen's candidates less those whose run on every image cannot fit what the budget
        leaves after the screen, where some can: screening them buys a winner the search cannot
        then run (the 45-minute run screened VGG16 at 128 px, 380 s, whose full run was 2,822 s).
        The estimates are the probe's, uncorrected yet: PRUNE_MARGIN leaves room for a probe taken
        on a loaded machine (one at load average 6 put VGG16's 64 px at 2,428 s, three times its rate
        on an idle machine). They are listed as left out, with that cost. Where none fits, all are
        screened: the best on the sample is then the answer."""
        after_screen = PRUNE_MARGIN * (1 - SCREEN_SHARE) * (self.clock.left() - budgets.WRAP_UP_SECONDS)
        full = {id(c): self._estimate(c, {}) for c in ordered}
        fitting = [c for c in ordered if full[id(c)] <= after_screen]
        if not fitting:
            return ordered
        for candidate in ordered:
            if full[id(candidate)] > after_screen:
                self._leave_out("full", candidate, full[id(candidate)])
        return fitting

    def affordable(self, ordered: list[dict], screened: list[Tried]) -> int:
        """How many of `ordered` the screen can still run within its share of the budget
        (SCREEN_SHARE of what was left when it began), the screened candidates' seconds counted."""
        spent = sum(t.seconds for t in screened)
        for count in range(len(ordered), 0, -1):
            if spent + sum(self._total([(c, self.screen_fields) for c in ordered[:count]])) <= self.screen_allowance:
                return count
        return 0

    def plan(self, ordered: list[dict]) -> None:
        """Prints the plan: the screen's candidates in order with their estimates, the rungs after
        it, the total, and what the budget leaves out for now (the screen re-plans as its runs show
        what they cost)."""
        # The screen's share: the rest buys the best on every image, flips and fine-tuning, each
        # bought while its own estimate fits what is left when it starts.
        self.screen_allowance = SCREEN_SHARE * (self.clock.left() - budgets.WRAP_UP_SECONDS)
        finetune_screen = self._finetune_screen_estimates(ordered)
        # Kept back from the screen's own share: each base's fine-tuning screen (it ranks the bases)
        # and the precision re-run (it buys time for all that follows). The extras and the depth
        # re-runs are paid from the time after the screen, each where the full rung and fine-tuning
        # still fit after it (Search.leaves_room): keeping all five back left the two-base 45-minute
        # run at 288f1b9 64 s of its 910-s share, and it screened only VGG16 at 32 px.
        self.screen_allowance -= sum(seconds for kind, seconds in finetune_screen.items()
                                     if kind not in AFTER_THE_SCREEN)
        count = max(1, self.affordable(ordered, []))
        screened = self._total([(c, self.screen_fields) for c in ordered])
        later = self._later(ordered[:count])
        self.say(f"recipe plan ({budgets.minutes(self.clock.left())} left of {budgets.minutes(self.clock.budget)}):")
        for number, (candidate, seconds) in enumerate(zip(ordered, screened), 1):
            mark = "" if number <= count else "  (left out for now: the budget)"
            self.say(f"  screen-{number:<3d} {seconds:7.0f} s  {_describe(candidate)}{mark}")
        for base, seconds in finetune_screen.items():
            if base == "deeper":
                self.say(f"  screen-ft {seconds:6.0f} s at most  the leader's with {DEEPER_FINETUNE['unfreeze']} "
                         "fine-tuned, where the full rung and that depth on every image still fit after it")
            elif base == "precision":
                self.say(f"  screen-ft {seconds:6.0f} s at most  the leader's in {FASTER_PRECISION}, where the probe "
                         f"says it saves {1 - 1 / PRECISION_SPEEDUP:.0%} of fine-tuning on every image")
            elif base == "extras":
                self.say(f"  screen-ft {seconds:6.0f} s at most  the leader's again with "
                         f"{_describe(FINETUNE_SCREEN_EXTRAS)}, where the full rung and fine-tuning still fit after it")
            else:
                self.say(f"  screen-ft {seconds:6.0f} s at most  {base}'s best screened input, its top block "
                         f"fine-tuned on the sample for {FINETUNE_SCREEN_EPOCHS} epochs")
        self.say(f"  full     the best {len(later['full'])} of the screen on every image: {sum(later['full']):.0f} s "
                 "at most")
        self.say(f"  head     the best with the other heads, on its cached features: about {sum(later['head']):.0f} s "
                 "at most")
        finetunes = list(zip(candidates.finetunes(), later["finetune"]))
        for lever, seconds in finetunes[:1]:
            self.say(f"  finetune {seconds:7.0f} s at most  {_describe(lever)}")
        self.say(f"  tta      the best with test-time flips: about {sum(later['tta']):.0f} s at most")
        self.say(f"  flip     the best with cached flips: about {sum(later['flip']):.0f} s at most")
        for lever, seconds in finetunes[1:]:
            self.say(f"  finetune {seconds:7.0f} s at most  {_describe(lever)}")
        total = sum(screened[:count]) + sum(finetune_screen.values()) + sum(sum(rung) for rung in later.values())
        self.say(f"  total about {total:.0f} s ({budgets.minutes(total)}) for {count} of {len(ordered)} screened, "
                 f"were every later rung to run at its dearest; all {len(ordered)} screened would add "
                 f"{sum(screened) - sum(screened[:count]):.0f} s; the screen's share of the budget: "
                 f"{self.screen_allowance:.0f} s")

    def _finetune_screen_estimates(self, ordered: list[dict]) -> dict[str, float]:
        """The most each base's fine-tuning screen may cost (its dearest input led the screen), and
        the leader's with FINETUNE_SCREEN_EXTRAS ('extras': the dearest of them), after the
        screen's passes."""
        screen = [(c, self.screen_fields) for c in ordered]
        estimates, runs = {}, []
        for base in dict.fromkeys(c["base"] for c in ordered):
            dearest = max((c for c in ordered if c["base"] == base), key=lambda c: self._estimate(c, {}))
            runs.append((_finetune_screen_diff(dearest), self.screen_fields))
            estimates[base] = self._total(screen + runs)[-1]
        def again(change: dict) -> float:  # the dearest leader's screen run again with `change`
            return max(self._total(screen + runs + [({**diff, **change}, fixed)])[-1] for diff, fixed in runs)

        estimates["extras"] = again(FINETUNE_SCREEN_EXTRAS)
        if len(self.precisions) > 1:
            estimates["precision"] = again({"precision": FASTER_PRECISION})
        estimates["deeper"] = again(DEEPER_FINETUNE_SCREEN)
        return estimates

    def _later(self, screened: list[dict]) -> dict[str, list[float]]:
        """Estimated seconds of the rungs after a screen of these candidates, were the dearest of
        them the ones that go on (the most the budget must hold for them)."""
        dearest = sorted(screened, key=lambda c: -self._estimate(c, {}))
        survivors = dearest[: max(1, math.ceil(len(screened) / ETA))]
        full = [(c, {}) for c in survivors]
        best = dearest[0]
        return {"full": self._total(full),
                "head": self._total(full + [({**best, **head}, {}) for head in candidates.HEADS[1:]])[len(full):],
                "flip": self._total(full + [({**best, "flip": True}, {})])[len(full):],
                "tta": self._total(full + [({**best, "flip": True}, {}), ({**best, "flip": True, "tta": True}, {})])
                [len(full) + 1:],
                "finetune": self._total(full + [({**best, "flip": True, **lever}, {}) for lever in
                                                candidates.finetunes()])[len(full):]}

    def _total(self, runs: list[tuple[dict, dict]]) -> list[float]:
        """Each run's estimate, in order, where a later run finds the passes of the earlier ones."""
        costs = budgets.Costs(rates=self.costs.rates, done_passes=set(self.costs.done_passes),
                              correction=self.costs.correction, overhead=self.costs.overhead,
                              finetune_correction=self.costs.finetune_correction)
        seconds = []
        for candidate, fixed in runs:
            spec = self._spec(candidate, fixed)
            seconds.append(costs.estimate(spec, self.images(spec)))
            costs.made(spec, self.images(spec), below_a_block=not fixed)  # as run() caches them
        return seconds

    # --- the rungs ---------------------------------------------------------------------------------
    def run_screen(self, ordered: list[dict], parent_id: str, tmp: Path, earlier: list[Tried] = ()) -> list[Tried]:
        """The screen's candidates in order while they fit (affordable, re-planned after each run),
        ranked with the `earlier` screened ones."""
        remaining, done = list(ordered), list(earlier)
        while remaining and (not done or self.affordable(remaining, done) > 0):
            done.append(self.run("screen", remaining.pop(0), self.screen_fields, tmp, parent_id))
        for candidate in remaining:
            self._leave_out("screen", candidate, self._estimate(candidate, self.screen_fields))
        return self._keep(done, "screen")

    def run_finetune_screen(self, screened: list[Tried], parent_id: str, tmp: Path) -> list[Tried]:
        """The screen's best input of each base, its top block fine-tuned on the sample
        (FINETUNE_SCREEN_EPOCHS); returns the screen re-ranked base by base on those. Then the
        leader's again: in FASTER_PRECISION where the probe says it pays (precision_pays_off; every
        run after takes it where keeps_precision), with FINETUNE_SCREEN_EXTRAS (fine-tuning on every
        image takes those that paid on validation: paying_extras, first_finetune), and at
        DEEPER_FINETUNE's depth (run_depth_screen), each against the plain run in the same precision.

        A frozen screen cannot see what fine-tuning adds, and that differs by base: in the 45-minute
        runs (docs/recipe.md) Xception at 128 px led VGG16 at 64 px frozen by 3.4 points on the
        sample and was chosen, reaching 79.34% test with its top block fine-tuned for 2 epochs,
        while VGG16 alone, its block5 fine-tuned, reached more. These runs cost a pass of the sample
        below the block and a few epochs through it; they stay at the screen's fidelity and only
        rank the bases and choose the fine-tuning's flips (never the chosen configuration). With one
        base the plain run is what the flips are measured against, and it corrects the estimates of
        fine-tuning (budget.Costs.finetune_correction) before fine-tuning on every image is planned."""
        leaders: dict[str, Tried] = {}
        for tried in screened:  # best first
            leaders.setdefault(tried.spec["base"], tried)
        tuned: dict[str, Tried] = {}
        for base, leader in leaders.items():
            attempt = self.run("screen-ft", _finetune_screen_diff(_lever_diff(leader)), self.screen_fields, tmp,
                               parent_id, cache_below=DEEPEST)
            if not attempt.error:
                tuned[base] = attempt
        accuracies = {base: attempt.val_accuracy for base, attempt in tuned.items()}
        val_images = self.images(next(iter(tuned.values())).spec)["val"] if tuned else 0
        self.on_every_image = {  # each base's leader: its full run and fine-tuning, estimated
            base: sum(self._total([(_lever_diff(leader), {}), ({**_lever_diff(leader), **self.finetune_lever}, {})]))
            for base, leader in leaders.items()}
        ranked = rank_by_bases(screened, accuracies, val_images, self.on_every_image)
        if ranked is not screened and len(leaders) > 1:
            self.say(_bases_order(accuracies, ranked[0].spec["base"], val_images, self.on_every_image))
        plain = tuned.get(ranked[0].spec["base"]) if ranked else None
        if plain is not None and self.precision_pays_off(ranked[0]):
            fast = self.screen_again(plain, {"precision": FASTER_PRECISION}, parent_id, tmp)
            if fast is not None:
                kept = keeps_precision(plain, fast, self.images(fast.spec)["val"])
                self.say(f"recipe: {'every run after takes' if kept else 'the search stays in'} "
                         f"{FASTER_PRECISION if kept else plain.spec['precision']}: val {plain.val_accuracy:.4f} in "
                         f"{plain.spec['precision']} ({plain.seconds:.0f} s), {fast.val_accuracy:.4f} in "
                         f"{FASTER_PRECISION} ({fast.seconds:.0f} s), on the sample")
                if kept:
                    self.decided = {"precision": FASTER_PRECISION}
                    plain = fast  # what the extras are measured against: the same precision
        if plain is not None:
            extras = self.screen_again(plain, FINETUNE_SCREEN_EXTRAS, parent_id, tmp,
                                       then=(ranked[0], self.finetune_lever))
            if extras is not None:
                self.finetune_extras = paying_extras(plain, extras)
                flips_alone = extras.val_accuracy_without_tta
                self.say(f"recipe: fine-tuning takes {_describe(self.finetune_extras) if self.finetune_extras else 'neither'} of flip, tta: "
                         f"val {plain.val_accuracy:.4f} plain, "
                         f"{'?' if flips_alone is None else f'{flips_alone:.4f}'} with flips, "
                         f"{extras.val_accuracy:.4f} with flips and tta, on the sample")
            self.run_depth_screen(plain, ranked[0], parent_id, tmp)
        return ranked

    def screen_again(self, plain: Tried, change: dict, parent_id: str, tmp: Path,
                     then: tuple[Tried, dict] | None = None) -> Tried | None:
        """`plain`'s fine-tuning screen run again with `change` (same sample, epochs and cache
        boundary, so only the change differs); None where that run failed (it is still listed) or,
        with `then` (the leader and a fine-tuning lever), where it would not leave room for them
        on every image (leaves_room)."""
        if then is not None and not self.leaves_room(plain, change, *then):
            return None
        attempt = self.run("screen-ft", {**_lever_diff(plain), **change}, self.screen_fields, tmp, parent_id,
                           cache_below=DEEPEST)
        return None if attempt.error else attempt

    def leaves_room(self, plain: Tried, change: dict, leader: Tried, lever: dict) -> bool:
        """Whether `plain`'s fine-tuning screen run again with `change` still leaves what the
        leader's full run and then `lever` on every image (at MIN_FINETUNE_EPOCHS) need: a re-run
        that only chooses how to fine-tune is not worth the fine-tuning itself. Where it does not,
        says so and lists the re-run as left out."""
        again, on_every_image = {**self.decided, **_lever_diff(plain), **change}, _lever_diff(leader)
        seconds = self._total([(again, self.screen_fields), (on_every_image, {}),
                               ({**on_every_image, **lever, "finetune_epochs": MIN_FINETUNE_EPOCHS}, {})])
        if sum(seconds) <= self.clock.left() - budgets.WRAP_UP_SECONDS:
            return True
        self.say(f"recipe: screen-ft with {_describe(change)} is not run: it (about {seconds[0]:.0f} s), the full "
                 f"rung ({seconds[1]:.0f} s) and {lever['unfreeze']} on every image ({seconds[2]:.0f} s at "
                 f"{MIN_FINETUNE_EPOCHS} epochs) need about {sum(seconds):.0f} s, "
                 f"{budgets.minutes(self.clock.left())} left")
        self._leave_out("screen-ft", again, seconds[0])
        return False

    def run_depth_screen(self, plain: Tried, leader: Tried, parent_id: str, tmp: Path) -> None:
        """The leader's fine-tuning screen again at DEEPER_FINETUNE's depth, where the full rung and
        that depth on every image (at MIN_FINETUNE_EPOCHS) still fit after it (leaves_room);
        fine-tuning on every image then starts with it if it beat `plain` on validation (the same
        sample, epochs and precision)."""
        if plain.spec["unfreeze"] == DEEPER_FINETUNE["unfreeze"]:
            return
        deeper = self.screen_again(plain, DEEPER_FINETUNE_SCREEN, parent_id, tmp, then=(leader, DEEPER_FINETUNE))
        if deeper is None:
            return
        if deeper.val_accuracy > plain.val_accuracy:
            self.finetune_lever = DEEPER_FINETUNE
        self.say(f"recipe: fine-tuning starts with {self.finetune_lever['unfreeze']}: val {plain.val_accuracy:.4f} "
                 f"with {plain.spec['unfreeze']}, {deeper.val_accuracy:.4f} with {DEEPER_FINETUNE['unfreeze']}, "
                 "on the sample")

    def precision_pays_off(self, leader: Tried) -> bool:
        """Whether FASTER_PRECISION is worth a screen: the probe's estimate of fine-tuning the
        screen's leader on every image (its pass below the block, its epochs) is at most
        1/PRECISION_SPEEDUP of the same in the search's own precision."""
        if len(self.precisions) < 2:
            return False
        diff = {**_lever_diff(leader), **candidates.finetunes()[0]}
        own, fast = (self._estimate({**diff, "precision": precision}, {}) for precision in self.precisions)
        self.say(f"recipe: the probe puts fine-tuning {leader.name}'s input on every image at {own:.0f} s in "
                 f"{self.precisions[0]}, {fast:.0f} s in {FASTER_PRECISION}"
                 + ("" if fast * PRECISION_SPEEDUP <= own else f": not {PRECISION_SPEEDUP}x faster, not screened"))
        return fast * PRECISION_SPEEDUP <= own

    def first_finetune(self) -> dict:
        """The fine-tuning lever the screen chose (finetune_lever) with those of its extras that
        paid, the most of them that fit: flips (a pass of the training images) only at the lever's
        own epochs, since the screen compared them at equal epochs and flips bought with fewer would
        be a configuration it never saw; tta (a pass of the test images; the training is the same)
        at the most epochs that fit. Where none fits, the lever alone (its epochs fitted by
        run_levers); what is dropped is listed as left out."""
        lever = self.finetune_lever
        if not self.finetune_extras or self.best is None or self.best.rung == "screen":
            return lever
        tries = [dict(self.finetune_extras)]
        if self.finetune_extras.get("flip") and self.finetune_extras.get("tta"):
            tries.append({"tta": True})  # tta alone: the same training, scored with the flips
        for extras in tries:
            diff = {**_lever_diff(self.best), **lever, **extras}
            if not extras.get("flip"):
                diff = self._fitted_epochs(diff)
            seconds = self._estimate(diff, {})
            if seconds <= self.clock.left() - budgets.WRAP_UP_SECONDS:
                return {k: v for k, v in diff.items() if k in {**lever, **extras}}
            self._leave_out("finetune", diff, seconds)
        return lever

    def rest_on_screen(self, parent_id: str, tmp: Path) -> None:
        """When nothing after the screen fits what is left, the rest of the budget screens the
        candidates the screen's share left out: the best is then the best screened."""
        waiting = [item["diff"] for item in self.left_out if item["rung"] == "screen"]
        if not waiting or self.clock.left() <= budgets.WRAP_UP_SECONDS:
            return
        self.left_out = [item for item in self.left_out if item["rung"] != "screen"]
        earlier = [t for t in self.tried if t.rung == "screen"]
        self.screen_allowance = sum(t.seconds for t in earlier) + self.clock.left() - budgets.WRAP_UP_SECONDS
        self.say(f"recipe: nothing after the screen fits {budgets.minutes(self.clock.left())}: screening more")
        self.run_screen(waiting, parent_id, tmp, earlier)

    def run_full(self, screened: list[Tried], tmp: Path, parent_id: str) -> list[Tried]:
        survivors = screened[: max(1, math.ceil(len(screened) / ETA))]
        done = []
        for tried in survivors:
            # Once one has run on every image, each after it keeps back what flips and the first
            # fine-tuning of the best of them would take: those are what a search with little time
            # left should still buy. Before that (the screen's best did not fit), none is kept back.
            # The top block's fine-tuning, even where the screen chose two blocks: two blocks' 6-epoch
            # estimate would leave out the cheap head runs, and fine-tuning fits its epochs anyway.
            finished = [t for t in done if not t.error]
            best = _lever_diff(max(finished, key=lambda t: t.val_accuracy)) if finished else None
            reserve = 0.0 if best is None else (self._estimate({**best, "flip": True}, {})
                                                + self._estimate({**best, **candidates.finetunes()[0]}, {}))
            done.append(self.run("full", _lever_diff(tried), {}, tmp, parent_id, cache_below=DEEPEST, reserve=reserve))
        return self._keep(done, "full")

    def run_levers(self, rung: str, levers: list[dict], tmp: Path, parent_id: str) -> list[Tried]:
        """Each lever on top of the best so far; the best stays a contender (same images)."""
        incumbent = self.best
        if incumbent.rung == "screen":  # no full run finished: a lever on every image has nothing to beat
            for lever in levers:
                diff = {**_lever_diff(incumbent), **lever}
                self._leave_out(rung, diff, self._estimate(diff, {}))
            return []
        done = []
        for lever in levers:
            diff = {**_lever_diff(incumbent), **lever}
            if rung == "finetune":
                diff = self._fitted_epochs(diff)
            done.append(self.run(rung, diff, {}, tmp, parent_id, cache_below=DEEPEST))
        return self._keep([incumbent] + done, rung)  # first: a lever that only ties does not replace it

    def run(self, rung: str, candidate: dict, fixed: dict, tmp: Path, parent_id: str, cache_below: str = "",
            reserve: float = 0.0) -> Tried:
        """One configuration as a nested `tlkit train` run, if its estimate fits what is left (less
        `reserve`, the seconds kept for the rungs after this one)."""
        import keras
        import mlflow

        spec = self._spec(candidate, fixed)
        diff = {k: v for k, v in {**self.decided, **candidate, **fixed}.items() if self.base_spec.get(k) != v}
        attempt = Tried(rung, f"{rung}-{sum(t.rung == rung for t in self.tried) + 1}", diff, spec)
        if any(t.spec == spec and not t.error for t in self.tried):
            return next(t for t in self.tried if t.spec == spec and not t.error)  # it ran already
        images = self.images(spec)
        attempt.estimate = self.costs.estimate(spec, images)
        if attempt.estimate + reserve > self.clock.left() - budgets.WRAP_UP_SECONDS:
            self._leave_out(rung, diff, attempt.estimate)
            attempt.error = "left out: the budget"
            return attempt
        self.say(f"recipe: {attempt.name} starts, about {attempt.estimate:.0f} s: {_describe(diff)} "
                 f"[{budgets.minutes(self.clock.elapsed())} in, {budgets.minutes(self.clock.left())} left]")
        path = tmp / f"recipe-{attempt.name}.toml"
        path.write_text(variant_file(diff, f"recipe search, rung {rung}: {_describe(diff)}"))
        clock = time.perf_counter()
        try:
            with deadlines.deadline(self.clock.deadline()):
                result = train.train(str(path), spec, cache_dir=self.cache_dir, nested=True,
                                     dataset=self.dataset(spec), cache_below=cache_below)
            attempt.run_id, attempt.val_accuracy = result.run_id, result.val_accuracy
            attempt.test_accuracy = result.test_accuracy
            attempt.val_accuracy_without_tta = result.val_accuracy_without_tta
            client = mlflow.MlflowClient()
            client.set_tag(result.run_id, "recipe_rung", rung)
            client.set_tag(result.run_id, "recipe_estimate_seconds", f"{attempt.estimate:.0f}")
        except Exception as err:  # noqa: BLE001 - one failed configuration must not end the search
            attempt.error = f"{type(err).__name__}: {first_line(err, 300)}"
            log.error("recipe: %s failed: %s", attempt.name, attempt.error)
            while mlflow.active_run() and mlflow.active_run().info.run_id != parent_id:
                mlflow.end_run("FAILED")
            if isinstance(err, deadlines.DeadlineError):  # slower than its estimate: what more time would buy
                attempt.error = f"left out: the budget ({first_line(err, 300)})"
                self._leave_out(rung, diff, err.projected_seconds)
        finally:
            keras.backend.clear_session()  # drop the finished configuration's graph and weights
            gc.collect()
        attempt.seconds = time.perf_counter() - clock
        attempt.ended_at = self.clock.elapsed()
        if not attempt.error.startswith("left out"):  # a pass given up made nothing, and says nothing of the rate
            self.costs.observe(attempt.estimate, attempt.seconds, fine_tuned=bool(spec["unfreeze"]))
            self.costs.made(spec, images, below_a_block=bool(cache_below))
        self.tried.append(attempt)
        outcome = f"val {attempt.val_accuracy:.4f}" if not attempt.error else f"FAILED ({attempt.error})"
        self.say(f"recipe: {attempt.name} ends, {outcome} in {attempt.seconds:.0f} s "
                 f"[{budgets.minutes(self.clock.elapsed())} in, {budgets.minutes(self.clock.left())} left]")
        return attempt

    def _keep(self, done: list[Tried], rung: str) -> list[Tried]:
        """The rung's finished configurations, best first by validation accuracy; the best is the
        search's best from now on (the highest fidelity reached)."""
        finished = sorted({id(t): t for t in done if t is not None and not t.error and t.val_accuracy is not None}
                          .values(), key=lambda t: -t.val_accuracy)
        if finished:
            self.best = finished[0]
            log.info("recipe: rung %s keeps %s (val_accuracy %.4f)", rung, self.best.name, self.best.val_accuracy)
        return finished

    def _fitted_epochs(self, diff: dict) -> dict:
        """A fine-tuning lever at the most epochs (of its own, down to MIN_FINETUNE_EPOCHS) whose
        estimate fits what is left; as it is where none fits (run() then leaves it out)."""
        left = self.clock.left() - budgets.WRAP_UP_SECONDS
        for epochs in range(self._spec(diff, {})["finetune_epochs"], MIN_FINETUNE_EPOCHS - 1, -1):
            fitted = {**diff, "finetune_epochs": epochs}
            if self._estimate(fitted, {}) <= left:
                return fitted
        return diff

    # --- small pieces ------------------------------------------------------------------------------
    def _spec(self, candidate: dict, fixed: dict) -> dict:
        return specs.merge({**self.decided, **candidate, **fixed}, self.base_spec)

    def _estimate(self, candidate: dict, fixed: dict) -> float:
        spec = self._spec(candidate, fixed)
        return self.costs.estimate(spec, self.images(spec))

    def _leave_out(self, rung: str, diff: dict, seconds: float) -> None:
        if any(item["diff"] == diff for item in self.left_out):
            return  # one configuration, met again by a later rung (fine-tuning with flips, then flips)
        self.left_out.append({"rung": rung, "diff": diff, "estimate_seconds": round(seconds, 1)})
        self.say(f"recipe: leaves out {rung} {_describe(diff)} (about {seconds:.0f} s; "
                 f"{budgets.minutes(self.clock.left())} left)")


def rank_by_bases(screened: list[Tried], tuned: dict[str, float], val_images: int,
                  seconds: dict[str, float]) -> list[Tried]:
    """The screened configurations, the bases in the order of their fine-tuned screen's validation
    accuracy (`tuned`: base -> accuracy), each base's own best first. Bases no further below the
    best than one standard error of its accuracy on `val_images` images (about 2 points on the
    sample's 500) are tied, and of those the one whose leader costs least on every image goes first
    (`seconds`: base -> its full run and fine-tuning): the time it leaves buys epochs and flips,
    which a difference the sample cannot show does not (the one-standard-error rule, as
    keeps_precision; in the two-base 45-minute run at 2b6d387 Xception at 128 px led VGG16 at 64 px
    by 0.2 points, 0.7120 to 0.7100, and its full run took 826 s, VGG16's 429-442 s in that day's
    other runs, both in mixed_bfloat16). As they were, unless every
    screened base has a fine-tuned accuracy: an order on some bases only would rank a base that
    failed its fine-tuning below one that never tried."""
    if not tuned or any(t.spec["base"] not in tuned for t in screened):
        return screened
    first = tied_and_cheapest(tuned, val_images, seconds)
    return sorted(screened, key=lambda t: (t.spec["base"] != first, -tuned[t.spec["base"]], -t.val_accuracy))


def _bases_order(accuracies: dict[str, float], first: str, val_images: int, seconds: dict[str, float]) -> str:
    """The line that says in which order the bases go on, and why `first` leads where it is a tie."""
    line = "recipe: the bases go on in the order their fine-tuned screens reached: " + ", ".join(
        f"{base} {accuracy:.4f}" for base, accuracy in sorted(accuracies.items(), key=lambda item: -item[1]))
    best = max(accuracies.values())
    if accuracies[first] == best:
        return line
    costs = ", ".join(f"{base} about {seconds[base]:.0f} s" for base in accuracies)
    return (f"{line}; {first} first: within one standard error of the best "
            f"({one_standard_error(best, val_images):.4f} on {val_images} images) and the cheapest on every "
            f"image ({costs})")


def tied_and_cheapest(tuned: dict[str, float], val_images: int, seconds: dict[str, float]) -> str:
    """Of the bases within one standard error of the best fine-tuned accuracy, the cheapest."""
    best = max(tuned.values())
    tied = [base for base, accuracy in tuned.items() if accuracy >= best - one_standard_error(best, val_images)]
    return min(tied, key=lambda base: (seconds.get(base, math.inf), -tuned[base]))


def one_standard_error(accuracy: float, images: int) -> float:
    """The standard error of an accuracy measured on `images` images (binomial)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(images, 1))


def paying_extras(plain: Tried, extras: Tried) -> dict:
    """Which of FINETUNE_SCREEN_EXTRAS paid on validation in the fine-tuning screen: flips where the
    run with them, scored without tta, beat the plain run; tta where the same run scored higher with
    it than without (a tie keeps the cheaper)."""
    paid = {}
    without_tta = extras.val_accuracy_without_tta
    if without_tta is not None and without_tta > plain.val_accuracy:
        paid["flip"] = True
    if without_tta is not None and extras.val_accuracy > without_tta:
        paid["tta"] = True
    return paid


def keeps_precision(own: Tried, fast: Tried, val_images: int) -> bool:
    """Whether the faster precision held on validation in the fine-tuning screen: its accuracy no
    further below the search's own precision's than one standard error of that accuracy on
    `val_images` images (about 2 points on the sample's 500). The check catches a precision that
    breaks training, which costs many points; a fraction of a point is below what 500 images can
    show, and is measured at a larger sample in benchmarks/precision.py."""
    return fast.val_accuracy >= own.val_accuracy - one_standard_error(own.val_accuracy, val_images)


def _finetune_screen_diff(diff: dict) -> dict:
    """A screened input and head with the first fine-tuning lever, at the fine-tuning screen's epochs."""
    return {**diff, **candidates.finetunes()[0], "finetune_epochs": FINETUNE_SCREEN_EPOCHS}


def _head_tier(candidate: dict) -> int:
    """Which head lever of candidates.HEADS a candidate carries: the most specific that matches."""
    return max(number for number, head in enumerate(candidates.HEADS)
               if all(candidate.get(k) == v for k, v in head.items()))


def _lever_diff(tried: Tried) -> dict:
    """A configuration's levers without its fidelity: what the next rung runs at its own."""
    return {k: v for k, v in tried.diff.items() if k not in ("limit", "test_limit", "epochs")}


def _describe(diff: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in diff.items() if k != "weights") or "as it stands"


def search(overrides: dict, *, bases: dict[str, str] | None = None, budget: float | None = None,
           clock: budgets.Clock | None = None, experiment: str | None = None, cache_dir: str | None = None,
           output: str | None = None, say=None) -> RecipeResult:
    """Probe, plan, screen, run the best on every image, try the heads, fine-tuning and flips, within the budget."""
    import mlflow

    bases = bases or {overrides.get("base") or specs.DEFAULTS["base"]: overrides.get("weights") or "imagenet"}
    clock = clock or budgets.Clock(budgets.parse_budget(DEFAULT_BUDGET) if budget is None else budget)
    searching = Search(overrides, bases, clock, cache_dir, say)
    screen = searching.check()  # every check before a run is made
    tracking.use_experiment(experiment)
    tracking.check_reachable()
    with tracking.run("recipe", tags={"recipe_bases": ",".join(bases), "recipe_budget_seconds": f"{clock.budget:.0f}"}) \
            as parent, tempfile.TemporaryDirectory() as tmp, train.long_lived_objects_frozen():
        tracking.log_params_once({k: v for k, v in overrides.items() if v is not None and k not in ("base", "weights")})
        mlflow.log_params({"bases": ",".join(bases), "budget_seconds": round(clock.budget)})
        parent_id, tmp = parent.info.run_id, Path(tmp)
        searching.probe(screen)
        ordered = searching.prune(searching.order(screen))
        searching.plan(ordered)
        try:
            screened = searching.run_screen(ordered, parent_id, tmp)
            if not screened:
                failed = "; ".join(t.error for t in searching.tried if t.error)
                raise RecipeError(f"no screened configuration finished: {failed[:500]}" if failed else
                                  f"the budget ({budgets.minutes(clock.budget)}) left no time for a configuration "
                                  f"after the probe ({budgets.minutes(clock.elapsed())} in): the cheapest needs about "
                                  f"{min(i['estimate_seconds'] for i in searching.left_out):.0f} s")
            _write_chosen(searching, parent_id, output)
            screened = searching.run_finetune_screen(screened, parent_id, tmp)
            if not searching.run_full(screened, tmp, parent_id):
                searching.rest_on_screen(parent_id, tmp)
            _write_chosen(searching, parent_id, output)
            # The head levers again on every image: on the features the full rung cached they cost
            # a head's epochs (seconds to minutes), and a sample can rank them otherwise.
            searching.run_levers("head", candidates.HEADS[1:], tmp, parent_id)
            _write_chosen(searching, parent_id, output)
            # The largest lever measured first (fine-tuning VGG16's top block: +9.5 points at 64 px,
            # flips +0.5: docs/performance.md), then the cheap test-time flips, flips, deeper tuning.
            finetunes = candidates.finetunes()
            searching.run_levers("finetune", [searching.first_finetune()], tmp, parent_id)
            _write_chosen(searching, parent_id, output)
            searching.run_levers("tta", [{"tta": True}], tmp, parent_id)
            _write_chosen(searching, parent_id, output)
            searching.run_levers("flip", [{"flip": True}], tmp, parent_id)
            _write_chosen(searching, parent_id, output)
            searching.run_levers("finetune", [lever for lever in finetunes if lever != searching.finetune_lever],
                                 tmp, parent_id)
        finally:
            text = _write_chosen(searching, parent_id, output)
            _log_summary(searching, clock)
    return RecipeResult(run_id=parent_id, chosen=searching.best, tried=searching.tried, left_out=searching.left_out,
                        seconds=clock.elapsed(), variant_text=text)


def _write_chosen(searching: Search, parent_id: str, output: str | None) -> str:
    """The best so far as a variant file: on the parent run (chosen.toml) and at `output`."""
    import mlflow

    chosen = searching.best
    if chosen is None:
        return ""
    # The data and the weights file are given on the command line, as for any variant (the weights
    # of several bases are named on the parent run).
    diff = {k: v for k, v in chosen.spec.items() if v != specs.DEFAULTS[k] and k not in ("data", "weights")}
    text = variant_file(diff, f"chosen by the recipe search (run {parent_id}): {chosen.name}, "
                              f"val_accuracy {chosen.val_accuracy:.4f}")
    mlflow.log_text(text, "chosen.toml")
    mlflow.set_tags({"best_run_id": chosen.run_id, "best_configuration": chosen.name,
                     "best_weights": chosen.spec["weights"]})
    if output:
        Path(output).write_text(text)
    return text


def _log_summary(searching: Search, clock: budgets.Clock) -> None:
    """The parent's table, plot, metrics and what the budget left out."""
    import mlflow

    mlflow.log_dict([vars(t) for t in searching.tried], "configurations.json")
    mlflow.log_dict(searching.left_out, "left_out.json")
    mlflow.log_text(table(searching.tried, searching.best, searching.left_out), "recipe.txt")
    if searching.tried:
        mlflow.log_figure(plot(searching.tried), "recipe.png")
    metrics = {"search_seconds": clock.elapsed(), "configurations": float(len(searching.tried)),
               "left_out": float(len(searching.left_out))}
    if searching.best is not None:
        metrics.update(best_val_accuracy=searching.best.val_accuracy, best_test_accuracy=searching.best.test_accuracy)
    mlflow.log_metrics(metrics)
    for item in searching.left_out:
        searching.say(f"recipe: more time would buy {item['rung']} {_describe(item['diff'])} "
                      f"(about {item['estimate_seconds']:.0f} s)")


def table(tried: list[Tried], chosen: Tried | None, left_out: list[dict] = ()) -> str:
    """What each configuration cost and bought: one line each, in the order tried."""
    lines = [f"{'configuration':14s} {'val acc':>8s} {'test acc':>8s} {'est s':>6s} {'seconds':>7s}  diff"]
    for t in tried:
        val = f"{t.val_accuracy:.4f}" if t.val_accuracy is not None else "FAILED"
        test = f"{t.test_accuracy:.4f}" if t.test_accuracy is not None else ""
        mark = " *" if t is chosen else ""
        lines.append(f"{t.name + mark:14s} {val:>8s} {test:>8s} {t.estimate:6.0f} {t.seconds:7.0f}  {_describe(t.diff)}"
                     + (f"  {t.error}" if t.error else ""))
    for item in left_out:
        lines.append(f"{'(left out)':14s} {'':>8s} {'':>8s} {item['estimate_seconds']:6.0f} {'':>7s}  "
                     f"{item['rung']}: {_describe(item['diff'])}")
    return "\n".join(lines)


def plot(tried: list[Tried]):
    """Validation accuracy against the seconds spent so far, a colour per rung."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for rung in dict.fromkeys(t.rung for t in tried):
        points = [(t.ended_at, t.val_accuracy) for t in tried if t.rung == rung and t.val_accuracy is not None]
        if points:
            axes.scatter(*zip(*points), label=rung)
    axes.set_xlabel("seconds since the command started")
    axes.set_ylabel("validation accuracy")
    axes.set_title("recipe search: what each configuration bought")
    axes.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure
