"""All the devices of one machine: the spec's `strategy` as a tf.distribute strategy.

    auto      MirroredStrategy over every visible GPU when there are 2 or more, else one device
    one       one device (TensorFlow's default placement)
    mirrored  MirroredStrategy over every visible GPU or, with no GPU, over every logical CPU
              device; an error with only one device (tests/test_distribute.py makes two logical
              CPUs to run it on a CPU)

MirroredStrategy keeps a copy of every variable on each device, splits each batch between them
and sums the gradients. `batch_size` is the global batch: each of N replicas takes batch_size / N
images a step, and the learning rate stays the spec's. A step then sees the same images and takes
the same gradient (to float rounding) on any number of devices, and a spec means the same run on
a laptop and on an 8-GPU machine; the speed-up goes to more images a second, not to another
optimisation. A user who wants the per-device batch kept raises batch_size (and may then raise
the learning rate) in the spec, where the change is seen and logged.

Everything that makes variables, the network (models.build, load_base, head_model, extractor),
the optimizer and a training view, must be made inside the strategy's scope: Keras reads the
strategy from the scope at a model's and an optimizer's creation, and fit, predict and evaluate
then run on every replica. The feature pass goes a batch at a time through predict_on_batch below,
which splits each batch between the replicas. train, pretrain and tune open `scope(spec)` around
all of it. keras-tuner empties TensorFlow's graph at every trial
(keras.backend.clear_session), which drops any scope open around it: a search instead hands its
tuner `current()` (keras-tuner's public `distribution_strategy`, which enters the scope for each
trial's model) and opens the scope for its own work only (`entered()`).

The fast path (tlkit/fastpath) steps aside while a strategy is in use (`in_use()`): its fused
optimizers, prebuilt state, datasets and rewritten views are single-device tricks, so Keras's own
compile, fit and predict run. Training across machines (MultiWorkerMirroredStrategy) is not
offered: Keras 3 does not work with it (keras-team/keras#20585, open).
"""

from __future__ import annotations

import contextlib
import logging

from tlkit.spec import SpecError

log = logging.getLogger(__name__)

# The strategy of each run in progress in this process (innermost last; None: one device). A run
# records its strategy here so that `in_use()` holds where Keras runs outside the scope (a trial's
# fit under keras-tuner), and so that its parts reach it without passing it down.
_RUNS: list = []

# One MirroredStrategy per set of devices, made once per process: a suite's children, a search's
# parent run and its final network share it (and TensorFlow's collective set-up is done once).
_MADE: dict[tuple[str, ...], object] = {}


def devices(name: str, gpus: list[str], cpus: list[str]) -> list[str] | None:
    """The devices to mirror over for strategy `name` (one of spec.STRATEGIES), given the logical
    GPUs and CPUs this process sees; None for one device. A SpecError says when it cannot be done."""
    if name == "one":
        return None
    if name == "auto":
        return list(gpus) if len(gpus) >= 2 else None
    mirrored = list(gpus) if gpus else list(cpus)
    if len(mirrored) < 2:
        raise SpecError(f"strategy 'mirrored' needs 2 or more devices, and this process sees only one "
                        f"({', '.join(mirrored) or 'none'}): use 'auto' or 'one'")
    return mirrored


def strategy_for(spec: dict):
    """The spec's strategy: a tf.distribute.MirroredStrategy, or None for one device. Initialises
    TensorFlow's devices (after that, no logical device can be added in this process)."""
    import tensorflow as tf

    chosen = devices(spec.get("strategy", "auto"), [d.name for d in tf.config.list_logical_devices("GPU")],
                     [d.name for d in tf.config.list_logical_devices("CPU")])
    if chosen is None:
        return None
    key = tuple(chosen)
    if key not in _MADE:
        _MADE[key] = tf.distribute.MirroredStrategy(devices=chosen)
    return _MADE[key]


def current():
    """The strategy of the innermost run in progress (chosen()), or None."""
    return _RUNS[-1] if _RUNS else None


def in_use() -> bool:
    """Whether a strategy other than one device is in use: a run's (chosen()), or any open
    tf.distribute scope, a caller's own included. Imports nothing: TensorFlow not yet imported
    means no scope can be open."""
    import sys

    if current() is not None:
        return True
    tf = sys.modules.get("tensorflow")
    return tf is not None and tf.distribute.has_strategy()


def tags() -> dict[str, str]:
    """The current run's tags: `strategy` as chosen ('mirrored' or 'one'; the spec's own value, such
    as 'auto', is its param) and `replicas`, how many copies of the network train."""
    strategy = current()
    if strategy is None:
        return {"strategy": "one", "replicas": "1"}
    return {"strategy": "mirrored", "replicas": str(strategy.num_replicas_in_sync)}


def predict_on_batch(model, batch):
    """model.predict_on_batch(batch), the batch split between the replicas of the current run's
    strategy. Keras's own predict_on_batch (3.15) hands every replica the whole batch and
    concatenates what they return: each row's outputs num_replicas times over
    (tests/test_distribute.py). Here each replica gets its part (its rows, in order) as the
    distributed value Keras's predict step runs on, so the step stays Keras's own (XLA under `jit`)
    and the outputs come back one per row, in the batch's order."""
    import numpy as np
    import tensorflow as tf

    strategy = current()
    if strategy is None:
        return model.predict_on_batch(batch)
    parts = np.array_split(np.asarray(batch), strategy.num_replicas_in_sync)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(parts[context.replica_id_in_sync_group]))
    return model.predict_on_batch(per_replica)


@contextlib.contextmanager
def chosen(spec: dict):
    """The spec's strategy (strategy_for), recorded as this process's current run's for the block;
    yields it. No scope is opened: entered() does that."""
    strategy = strategy_for(spec)
    if strategy is None:
        log.info("strategy %s: one device", spec.get("strategy", "auto"))
    else:
        log.info("strategy %s: MirroredStrategy, %d replicas on %s", spec.get("strategy", "auto"),
                 strategy.num_replicas_in_sync, ", ".join(strategy.extended.worker_devices))
    _RUNS.append(strategy)
    try:
        yield strategy
    finally:
        _RUNS.pop()


@contextlib.contextmanager
def entered():
    """current()'s scope, if it is a strategy: models, optimizers and views made inside are
    distributed, and so are their fit, predict and evaluate."""
    strategy = current()
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        yield strategy


@contextlib.contextmanager
def scope(spec: dict):
    """chosen(spec) and its scope entered, for a run that makes and trains its models inside."""
    with chosen(spec) as strategy, entered():
        yield strategy
