"""A time budget and what things cost on this machine: the recipe search's clock and its estimates.

The recipe plans before it works: it measures a few batches of each base's pass at each candidate
size and a few steps of each head and fine-tuning depth (`probe`), turns those rates into seconds
per configuration (`Costs.estimate`), and starts no configuration whose estimate does not fit in
what is left of the budget (`Clock`). The clock runs from the process's start, TensorFlow's import
included: the budget is the user's wall time, not the search's.

After every configuration the estimate is compared with what it took, and the remaining estimates
are scaled by the ratio (`Costs.observe`): the probe's batches miss what a run adds (MLflow,
logging the model, evaluating), and the machine's load changes while the search runs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

from tlkit import distribute, models

log = logging.getLogger(__name__)

PROBE_BATCH = 16  # images per probed batch of the base's pass and of a block: one to warm up, one timed
HEAD_PROBE_BATCH = 256  # feature rows per probed batch of the head
TRAIN_TO_INFERENCE = 3.0  # a training step against a forward pass: the backward pass costs about two forwards
WRAP_UP_SECONDS = 5.0  # what the search keeps back at the end: the parent's table, plot and chosen file
RUN_OVERHEAD_SECONDS = 8.0  # a configuration's run beside its arithmetic (MLflow, the logged model), until observed


class BudgetError(ValueError):
    """A budget that cannot be read: the message shows the forms that can."""


def parse_budget(text: str) -> float:
    """'45m', '2h', '90s', '1h30m' or a plain number of seconds -> seconds."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
        if not text or not parts:
            raise BudgetError(f"budget {text!r} is not a duration: use e.g. 90s, 45m, 2h or 1h30m")
        hours, minutes, secs = (float(p) if p else 0.0 for p in parts.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise BudgetError(f"budget {text!r} must be more than 0 seconds")
    return seconds


def process_started() -> float:
    """When this process started, as a time.time() value (Linux's /proc; else now)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


@dataclass
class Clock:
    """The budget's clock: seconds since the process started, and what is left."""

    budget: float  # seconds
    started: float = field(default_factory=process_started)

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed()

    def deadline(self) -> float:
        """The budget's end as a time.time() value: training stops its epochs there."""
        return self.started + self.budget


def rates_key(spec: dict) -> tuple[str, int, str]:
    """Which probed rates a spec's work runs at: (base, image size, precision)."""
    return spec["base"], spec["image_size"], spec["precision"]


@dataclass
class Rates:
    """Seconds per image of each kind of work for one input (base, size, precision), measured by `probe`."""

    pass_image: float  # the base's pass, per image
    head_sample: float  # one training step of the largest head candidate, per training image
    finetune_sample: dict[str, float] = field(default_factory=dict)  # unfreeze depth -> per training image


@dataclass
class Costs:
    """Estimated seconds of a configuration from the probed rates, corrected as runs finish."""

    rates: dict[tuple, Rates] = field(default_factory=dict)  # rates_key: (base, size, precision) -> Rates
    # passes made already: (base, size, preprocess, precision, images, transform)
    done_passes: set = field(default_factory=set)
    correction: float = 1.0  # actual / estimated seconds over the frozen configurations so far
    overhead: float = RUN_OVERHEAD_SECONDS
    history: list[tuple[float, float, bool]] = field(default_factory=list)  # (estimated, actual, fine-tuned)
    # actual / estimated over the fine-tuning runs alone, once one has run: their probe is a
    # different step (Keras's train_on_batch on random maps) and was 2.1x off in the 45-minute
    # VGG16 run (526 s estimated, 1,121 s taken) while the frozen runs' median ratio was near 1.
    finetune_correction: float | None = None

    def passes(self, spec: dict, images: dict[str, int]) -> list[tuple[tuple, int]]:
        """The passes of the base this spec would make that are not made yet: (identity, images)."""
        key = (spec["base"], spec["image_size"], spec["preprocess"], spec["precision"], images["train"], images["test"])
        # Fine-tuning needs features from below its blocks: a pass that stopped at the base's output
        # (a frozen run's own) does not serve it. The recipe cuts every pass that is not the
        # screen's below its deepest fine-tuning depth, which serves both (train.py derives).
        cut = key + ("", "below a block")
        main = cut if spec["unfreeze"] or cut in self.done_passes else key + ("",)
        wanted = [(main, images["train"] + images["val"] + images["test"])]
        # The mirror images' entries (train.frozen_features): the pool's for flips; the test
        # images' for tta, and the validation images' where the pool's are not made.
        if spec["flip"]:
            wanted.append((key + ("hflip",), images["train"] + images["val"]))
        if spec["tta"]:
            wanted.append((key + ("hflip-test",), images["test"]))
        if spec["tta"] and not spec["flip"]:
            wanted.append((key + ("hflip-val", spec["seed"]), images["val"]))
        return [(identity, n) for identity, n in wanted if identity not in self.done_passes]

    def estimate(self, spec: dict, images: dict[str, int]) -> float:
        """Seconds for one configuration on `images` (train, val, test counts) at the spec's epochs."""
        rates = self.rates[rates_key(spec)]
        seconds = sum(n for _, n in self.passes(spec, images)) * rates.pass_image
        if spec["tta"]:  # the validation and test images scored twice
            seconds += (images["val"] + images["test"]) * rates.head_sample / 3
        # An epoch trains on the training images and scores the validation images (about a third
        # of a training step each); early stopping may end sooner: the estimate is the longest.
        per_epoch = images["train"] + images["val"] / 3
        seconds += spec["epochs"] * per_epoch * rates.head_sample
        if spec["unfreeze"]:
            finetune = rates.finetune_sample.get(spec["unfreeze"])
            if finetune is None:
                finetune = max(rates.finetune_sample.values(), default=rates.pass_image)
            # the block above the cut runs over every image once to derive the head's inputs
            seconds += spec["finetune_epochs"] * per_epoch * finetune + sum(images.values()) * finetune / 3
        return self._correction(bool(spec["unfreeze"])) * (seconds + self.overhead)

    def _correction(self, fine_tuned: bool) -> float:
        """The ratio an estimate of this kind is scaled by: the fine-tuning runs' once there is one."""
        return self.finetune_correction if fine_tuned and self.finetune_correction else self.correction

    def made(self, spec: dict, images: dict[str, int], below_a_block: bool = False) -> None:
        """The spec's passes are cached now; `below_a_block`: its main pass stopped below the
        deepest fine-tuning depth (the recipe's `cache_below`), so fine-tuning finds it too."""
        for identity, _ in self.passes(spec, images):
            self.done_passes.add(identity)
        key = (spec["base"], spec["image_size"], spec["preprocess"], spec["precision"], images["train"], images["test"])
        self.done_passes.add(key + ("",))
        if below_a_block or spec["unfreeze"]:
            self.done_passes.add(key + ("", "below a block"))

    def observe(self, estimated: float, actual: float, fine_tuned: bool = False) -> None:
        """Scale later estimates by how far the finished ones were off (the median ratio: one slow
        configuration, a first trace, should not double everything after it); fine-tuning runs'
        estimates by the fine-tuning runs' own ratio once there is one (`finetune_correction`)."""
        self.history.append((estimated / self._correction(fine_tuned), actual, fine_tuned))
        frozen, tuned = ([entry for entry in self.history if entry[2] == kind] for kind in (False, True))
        self.correction = _median_ratio(frozen or tuned)
        self.finetune_correction = _median_ratio(tuned) if tuned else None


def _median_ratio(history: list[tuple[float, float, bool]]) -> float:
    ratios = [actual / estimated for estimated, actual, _ in history if estimated > 0]
    return float(np.clip(np.median(ratios), 0.5, 4.0)) if ratios else 1.0


def _seconds_per_call(call) -> float:
    call()  # warm up: the first call traces and allocates
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def probe(spec: dict, num_classes: int, depths: list[str], head_spec: dict) -> Rates:
    """Measure one input's rates in the spec's precision, on random inputs (speed does not depend
    on the values): a batch of the base's pass; the head's forward pass times TRAIN_TO_INFERENCE for
    its training step; and a real training step of each fine-tuning depth (its blocks and the head,
    at the spec's batch).

    The head is traced for inference only: it costs milliseconds an image either way and the runs
    correct the estimates (Costs.observe). Fine-tuning is where the budget's big decision lies, and
    3x a forward pass missed it (VGG16's top block at 64 px: 5.2 ms an image against 4.1 ms
    measured, which left fine-tuning out of a 45-minute run with 16 minutes to spare), so its step
    is timed for real: a trace of 1-2 s a depth, at each base's largest size only (Search.probe)."""
    with models.precision(spec):  # the layers compute as train.py builds them
        return _probe(spec, num_classes, depths, head_spec)


def _probe(spec: dict, num_classes: int, depths: list[str], head_spec: dict) -> Rates:
    import keras

    rng = np.random.default_rng(0)
    probe_spec = dict(spec, weights="none")  # the same arithmetic as the weights file, without loading it
    base = models.load_base(spec["base"], "none", spec["image_size"], spec["seed"])
    network = models.build(dict(probe_spec, unfreeze=""), num_classes, base)

    def per_image(model, batch: int) -> float:
        x = rng.standard_normal((batch, *model.input.shape[1:])).astype("float32")
        return _seconds_per_call(lambda: distribute.predict_on_batch(model, x)) / batch

    pixels = rng.integers(0, 256, (PROBE_BATCH, spec["image_size"], spec["image_size"], 3)).astype("uint8")
    pass_image = _seconds_per_call(lambda: distribute.predict_on_batch(network.extractor, pixels)) / PROBE_BATCH
    head_spec = dict(probe_spec, **head_spec)
    head = models.head_model(head_spec, network.extractor.output.shape[1:], num_classes)
    head_sample = TRAIN_TO_INFERENCE * per_image(head, HEAD_PROBE_BATCH)
    finetune_sample = {}
    for depth in depths:
        # What fine-tuning trains (train.py): the block above the depth's cut and the head, on
        # features at the cut, BatchNorm in inference mode.
        tuned = models.build(dict(head_spec, unfreeze=depth), num_classes, base)
        models.set_unfrozen(tuned, True)
        tuned.trainable.compile(optimizer=keras.optimizers.Adam(spec["finetune_learning_rate"]),
                                loss="categorical_crossentropy")
        x = rng.standard_normal((spec["batch_size"], *tuned.trainable.input.shape[1:])).astype("float32")
        y = np.eye(num_classes, dtype="float32")[rng.integers(0, num_classes, spec["batch_size"])]
        finetune_sample[depth] = _seconds_per_call(lambda: tuned.trainable.train_on_batch(x, y)) / spec["batch_size"]
    keras.backend.clear_session()
    log.info("probe %s at %d px, %s: pass %.2f ms/image, head %.3f ms/image, fine-tuning %s", spec["base"],
             spec["image_size"], spec["precision"], pass_image * 1e3, head_sample * 1e3,
             ", ".join(f"{d} {s * 1e3:.2f} ms/image" for d, s in finetune_sample.items()) or "none")
    return Rates(pass_image=pass_image, head_sample=head_sample, finetune_sample=finetune_sample)


def minutes(seconds: float) -> str:
    """90 -> '1 min 30 s'; for the plan and the progress lines."""
    seconds = max(0, int(math.ceil(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
