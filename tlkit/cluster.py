"""The base's pass across a cluster: the feature cache's entries made by Ray Data's actors.

`tlkit features VARIANT --engine ray` makes every entry that `tlkit train VARIANT` (with the same
data and base options) would look up, by the same rules, because train.frozen_features decides
which: the base's output for a frozen variant; for fine-tuning the cut below the unfrozen block
and the base's output derived from it; with `flip` the mirrored training images' entries too.
Only the pass runs on the cluster. The run that follows finds its features (feature_cache=hit,
feature_engine=ray) and trains its head, or fine-tunes the top block, on this machine: features
are small (VGG16 at 32 px: 512 float32 an image, 2 KB), and Keras 3 does not train one model
across machines (docs/scale.md).

Why Ray Data, not Spark (the two engines the issue names):
- install: `pip install 'tlkit[cluster]'` is `ray[data]`, wheels only (about 240 MB installed; its
  pyarrow and pandas already come with MLflow), no JVM. A cluster is `ray start --head` on one
  machine and `ray start --address=HEAD:6379` on the others (or KubeRay). PySpark needs a Java
  runtime on every machine and a cluster manager, and runs Python UDFs in processes beside the JVM.
- the frozen base loads once per worker: map_batches with a callable class runs an actor pool
  (ActorPoolStrategy(size=workers)), each actor building the extractor in its constructor and
  keeping it. A Spark pandas UDF is a function, so a model is loaded per task unless cached by
  hand in the Python worker.
- GPUs: `num_gpus` per actor is Ray's own scheduling (an actor is placed on a node with a free GPU
  and given it in CUDA_VISIBLE_DEVICES; fractions share one). Spark schedules GPUs only with
  resource discovery scripts and `spark.*.resource.gpu.*` settings made on the cluster.
- CI: Ray's local mode, `ray.init(num_cpus=2)`, starts in 7-9 s here, and the code is the one
  that runs against a cluster address. Spark's local mode needs a Java runtime in CI.
- faults: Ray Data restarts an actor that dies and retries its batch (the actors' `max_restarts`
  and `max_task_retries`; Ray Data's default for both is -1, forever, so a pass whose workers
  always die would never end: tlkit sets both to `retries`, 3 by default). When they are spent
  the pass fails with one line, and the entry's temporary folder is removed (features.writer).

How: each split's sources.Source (the list of files, or the array) goes to the actors once,
through Ray's object store, and the items are (split, row) in blocks of about a batch; actors read
the rows with stream.reader, the function the local pass reads with (sources.read_image for files),
so the pixels are the same, and return the features with their split and row. Ray keeps the blocks in
order (DataContext's preserve_order), and the driver appends each batch to the entry's files as it
comes (features.FeatureCache.writer), checking the rows: its memory holds a few batches.

On a cluster every path must be readable at the same place on every node: the image folder (a
shared filesystem) and a weights file. Array sources (cifar10, .npz) go with their pixels. Each node needs tlkit's dependencies installed (TensorFlow, Keras,
Pillow, scikit-learn: the cluster's image); the runtime environment's `py_modules` ships this
machine's own tlkit package folder (kilobytes) to the workers, so they run the code that computed
the keys. `working_dir` would upload the current folder, whatever it holds (images, mlruns, caches).
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import tlkit
from tlkit import distribute, features, models, sources, stream, train
from tlkit.messages import first_line
from tlkit.sources import DataError
from tlkit.spec import SpecError

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
RETRIES = 3  # restarts of a worker that dies, and retries of its batch, before the pass fails
INSTALL = "pip install 'tlkit[cluster]'"
CONNECT_SECONDS = 10  # a cluster address that does not answer a TCP connection in this long is unreachable


class ClusterError(RuntimeError):
    """The engine failed while running (unreachable, workers dead for good): one line naming it.

    Not an OSError: the cache's writer turns those into "cannot write the feature cache"."""


@dataclass
class Pass:
    """One pass an engine ran: an entry made."""

    key: str
    boundary: str
    transform: str
    images: int
    seconds: float


@dataclass
class Made:
    """What make_features did: the entry a run of the variant trains on, and the passes it took."""

    key: str
    boundary: str
    outcome: str  # hit, derived or miss (as the training run's feature_cache tag says)
    made_by: dict
    passes: list[Pass] = field(default_factory=list)


def check(spec: dict, variant: str, engine: str, workers: int, gpus_per_worker: float, cpus_per_worker: float) -> None:
    """Every bad input, before any data is loaded or Ray started (SpecError: one line, exit 2)."""
    if spec["augment"] or spec["trainable_base"]:
        raise SpecError(f"{variant}: augment / trainable_base run the whole network every epoch, so it has no "
                        "features to cache: pick a variant with a frozen base (baseline, finetune, ...)")
    if engine not in ENGINES:
        raise SpecError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers < 1:
        raise SpecError(f"workers must be 1 or more, got {workers}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise SpecError(f"gpus-per-worker must be 0 or more and cpus-per-worker above 0, got {gpus_per_worker} "
                        f"and {cpus_per_worker}")
    if engine == "ray" and spec.get("strategy") == "mirrored":
        # Ray's actors are the pass's parallelism, each with its own GPUs (--gpus-per-worker).
        raise SpecError("--strategy mirrored is for this machine's pass (--engine local); with --engine ray "
                        "give each worker its GPUs with --gpus-per-worker")
    if engine == "ray":
        try:
            import ray.data  # noqa: F401
        except ImportError:
            raise SpecError(f"--engine ray needs Ray Data, which is not installed: {INSTALL}") from None


def make_features(variant: str, spec: dict, *, engine: str = "ray", address: str = "local", workers: int = 2,
                  gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, retries: int = RETRIES,
                  cache_dir: str | None = None, worker: type | None = None) -> Made:
    """Make (or find) every feature-cache entry that `tlkit train VARIANT` would look up for this
    validated spec; on a miss the pass runs on `engine`: 'local' (this process) or 'ray' (Ray Data
    at `address`: 'local' starts Ray here with workers x cpus_per_worker CPUs, anything else is
    ray.init's address, 'auto' or ray://HEAD:10001). An already running Ray (ray.is_initialized())
    is used as it is. worker: the actor class (a subclass of BaseWorker; tests use one that dies)."""
    check(spec, variant, engine, workers, gpus_per_worker, cpus_per_worker)
    features.FeatureCache(cache_dir).check_writable()  # now, not after a pass over every image
    with connected(address, workers, cpus_per_worker) if engine == "ray" else nullcontext():
        import keras  # after the checks and the connection: they fail in a second, TensorFlow takes several to load

        # The entries' features in the spec's precision, and here on its strategy's devices, as train builds them.
        with models.precision(spec), distribute.scope(spec) if engine == "local" else nullcontext():
            keras.utils.set_random_seed(spec["seed"])
            # The base first, as train does: a weights file that does not fit fails before the data is read.
            base = models.load_base(spec["base"], spec["weights"], spec["image_size"], spec["seed"])
            dataset = train.load_dataset(spec)
            network = models.build(spec, len(dataset.class_names), base)
            if engine == "ray":
                if gpus_per_worker:
                    _check_gpus(address, workers, gpus_per_worker)
                runner = RayPass(spec, len(dataset.class_names), address, workers, gpus_per_worker, cpus_per_worker,
                                 retries, worker or BaseWorker)
            else:
                runner = features.LocalPass()
            timed = _Timed(runner)
            got = train.frozen_features(network, dataset, spec, cache_dir, engine=timed)
    tags = train.feature_tags(got, network)
    return Made(key=got.key, boundary=network.boundary, outcome=tags["feature_cache"],
                made_by=got.made_by, passes=timed.passes)


class _Timed:
    """An engine that records each pass the engine it wraps runs (what `tlkit features` prints)."""

    def __init__(self, engine):
        self.engine, self.passes = engine, []

    @property
    def made_by(self) -> dict:
        return self.engine.made_by

    def features(self, fields: dict, extractor, images: dict, batch_size: int):
        started = time.monotonic()
        yield from self.engine.features(fields, extractor, images, batch_size)
        self.passes.append(Pass(key=features.key_of(fields), boundary=fields["boundary"],
                                transform=fields.get("transform", ""), images=sum(len(x) for x in images.values()),
                                seconds=time.monotonic() - started))


# --- Ray -----------------------------------------------------------------------------------------

def runtime_env() -> dict:
    """What Ray's workers get: this machine's tlkit package (py_modules: the folder alone, so the
    workers run the code that computed the keys), and TensorFlow's settings."""
    return {"py_modules": [str(Path(tlkit.__file__).parent)],
            "env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's info lines, from every worker, buried tlkit's
                         # TensorFlow takes all of a GPU's memory by default: actors sharing one
                         # (--gpus-per-worker 0.5) would fail to start.
                         "TF_FORCE_GPU_ALLOW_GROWTH": "true"}}


@contextmanager
def connected(address: str, workers: int, cpus_per_worker: float):
    """Ray running for the block: a new local one for address 'local', the cluster at `address`
    otherwise; one already running in this process (a test's, a notebook's) is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    _check_reachable(address)
    options = {"address": address, "runtime_env": runtime_env(), "logging_level": logging.WARNING}
    if address == "local":
        options.update(num_cpus=max(1, math.ceil(workers * cpus_per_worker)), include_dashboard=False)
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError, SystemExit) as err:
        # SystemExit: ray.init exits the process when a GCS address stops answering mid-handshake.
        raise ClusterError(f"ray: cannot connect to {address}: {first_line(err)}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """A host:port address (ray://HOST:PORT or HOST:PORT) that refuses a TCP connection fails now:
    ray.init would wait 30 s (Ray Client) or over 3 minutes (a GCS address) before giving up."""
    if address in ("local", "auto"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise ClusterError(f"ray: address {address!r} is not 'local', 'auto', ray://HOST:PORT or HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
    except OSError as err:
        raise ClusterError(f"ray: cannot reach {address}: {err.strerror or err}") from None


def _check_gpus(address: str, workers: int, gpus_per_worker: float) -> None:
    """GPUs asked for where Ray has none: the actors would wait for them forever."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if have < gpus_per_worker:
        raise ClusterError(f"ray: --gpus-per-worker {gpus_per_worker:g}, but the Ray at {address} has {have:g} GPU(s)")
    if have < workers * gpus_per_worker:
        # A cluster with an autoscaler adds nodes for actors that wait; a fixed one runs fewer workers.
        log.warning("ray: %d workers x %g GPU need %g GPUs and the cluster has %g now", workers, gpus_per_worker,
                    workers * gpus_per_worker, have)


class BaseWorker:
    """A Ray actor of the pass: builds the extractor once, then turns batches of rows into features.

    sources: per split, an ObjectRef of its sources.Source (the list of files, or the array), read
    through the source's own batch reader as the local pass reads it."""

    def __init__(self, spec: dict, num_classes: int, layer: str, sources: dict):
        import ray
        import tensorflow as tf

        # TensorFlow sizes its thread pools by the node's cores, not by the CPUs Ray gave this actor:
        # N actors on a node would each run as many threads as the node has cores.
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(cpus)
        import keras

        with models.precision(spec):
            keras.utils.set_random_seed(spec["seed"])  # as train and make_features do: 'none' weights are the seed's
            network = models.build(spec, num_classes, models.load_base(spec["base"], spec["weights"],
                                                                       spec["image_size"], spec["seed"]))
            layer = models.layer_named(network.base, layer)  # the key's name for it (models.layer_key)
            # The extractor train would use for this boundary (frozen_features): the network's own, or a cut.
            self.extractor = network.extractor if layer == network.boundary else models.extractor_to(network, spec,
                                                                                                      layer)
        self.sources = {split: ray.get(source) for split, source in sources.items()}

    def images(self, split: str, batch: dict):
        """The uint8 pixels of the batch's rows of `split`, read as the local pass reads them."""
        import numpy as np

        return stream.reader(self.sources[split])(np.asarray(batch["row"], dtype=np.int64))

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        splits = np.asarray(batch["split"])
        # Ray may join the end of one split's blocks and the start of the next into one batch.
        parts = [self.images(split, {k: v[splits == split] for k, v in batch.items()})
                 for split in dict.fromkeys(splits.tolist())]
        out = np.asarray(self.extractor.predict_on_batch(np.concatenate(parts)))
        if out.dtype.name == "bfloat16":
            out = out.astype(np.float32)  # as the cache stores it (features._EntryFiles); Arrow has no bfloat16
        return {"split": splits, "row": batch["row"], "features": out}


class RayPass:
    """The feature pass as a Ray Data job: an engine for features.FeatureCache.get."""

    def __init__(self, spec: dict, num_classes: int, address: str, workers: int, gpus_per_worker: float,
                 cpus_per_worker: float, retries: int, worker: type):
        self.spec, self.num_classes, self.workers, self.retries, self.worker = spec, num_classes, workers, retries, worker
        self.gpus, self.cpus = gpus_per_worker, cpus_per_worker
        self.made_by = {"engine": "ray", "workers": workers, "address": address, "gpus_per_worker": gpus_per_worker}

    def features(self, fields: dict, extractor, images: dict, batch_size: int):
        """(split, features of the next batch) in order, computed by `workers` actors."""
        import numpy as np
        import ray

        context = ray.data.DataContext.get_current()
        before = (context.execution_options.preserve_order, context.enable_progress_bars)
        # Blocks in order: the driver appends each as it comes and holds a few. No progress bars: under
        # the tlkit command stderr is a pipe (console.py), where Ray logs a 7-line status every 10 s;
        # features.FeatureCache.get logs the pass's progress.
        context.execution_options.preserve_order, context.enable_progress_bars = True, False
        try:
            dataset = self._dataset(fields["boundary"], images, batch_size)
            done = dict.fromkeys(images, 0)
            for batch in self._batches(dataset):
                splits = np.asarray(batch["split"])
                for split in dict.fromkeys(splits.tolist()):
                    mask = splits == split
                    rows = np.asarray(batch["row"])[mask]
                    if split not in done or not np.array_equal(rows, np.arange(done[split], done[split] + len(rows))):
                        raise ClusterError(f"ray: the pass returned rows of {split} out of order (at row {done.get(split)})")
                    done[split] += len(rows)
                    yield split, batch["features"][mask]
        finally:
            context.execution_options.preserve_order, context.enable_progress_bars = before

    def _dataset(self, layer: str, images: dict, batch_size: int):
        """The items, in blocks of about a batch, mapped by an actor pool."""
        import ray

        # Each split's source once in Ray's object store (an array's pixels go out of band: the workers
        # on a node map one copy), the items its rows.
        refs = {split: ray.put(sources.of(x)) for split, x in images.items()}
        items = [{"split": split, "row": row} for split, x in images.items() for row in range(len(x))]
        # from_items builds the blocks here (from_pandas ran a Ray task per block to read its schema);
        # a block a batch gives every worker work from the start.
        blocks = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // batch_size)))
        with warnings.catch_warnings():
            # Ray 2.60 deprecates passing remote arguments as keywords, but names no parameter for these two.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            return blocks.map_batches(
                self.worker, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=self.workers),
                num_gpus=self.gpus or None, num_cpus=self.cpus,
                fn_constructor_kwargs={"spec": self.spec, "num_classes": self.num_classes, "layer": layer,
                                       "sources": refs},
                # Ray Data's defaults are -1, forever: a worker that always dies would never end the pass.
                max_restarts=self.retries, max_task_retries=self.retries)

    def _batches(self, dataset):
        """The dataset's output blocks in order; Ray's failures as one line (ClusterError), or the
        worker's own DataError (a file changed since loading) as the local pass raises it."""
        blocks = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
        while True:
            try:
                batch = next(blocks)
            except StopIteration:
                return
            except Exception as err:
                raised = raised_in_worker(err)
                if raised and raised[0] == f"{DataError.__module__}.{DataError.__name__}":
                    raise DataError(raised[1]) from None
                raise ClusterError(self._failure(err, raised)) from None
            yield batch

    def _failure(self, err: Exception, raised: tuple[str, str] | None) -> str:
        import ray

        if isinstance(err, ray.exceptions.RayActorError):
            return (f"ray: a worker of the feature pass died and Ray's retries are spent (--retries {self.retries}): "
                    f"{first_line(err)}")
        if raised:
            return f"ray: a worker of the feature pass failed: {raised[0].rsplit('.', 1)[-1]}: {raised[1]}"
        return f"ray: the feature pass failed: {type(err).__name__}: {first_line(err)}"


# How Python joins chained tracebacks; Ray sends a worker's traceback back as this text.
_CAUSE = "The above exception was the direct cause of the following exception:"
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$")


def raised_in_worker(err: BaseException) -> tuple[str, str] | None:
    """(qualified type name, first line of the message) of the exception a worker's code raised, or None.

    Ray Data wraps it in a UserCodeException, and the exception object does not come back (its
    __cause__ is lost on the way): only the worker's traceback does, as text, the user's exception
    in the part just before the wrapper's: the first unindented `name: message` line after Ray's
    header (the frames are indented; a message's later lines may look like one, "Hint: ...")."""
    parts = str(err).split(_CAUSE)
    if len(parts) < 2:
        return None
    for line in parts[-2].splitlines():
        found = _EXCEPTION_LINE.match(line)
        if found:
            return found.group(1), found.group(2).strip()
    return None
