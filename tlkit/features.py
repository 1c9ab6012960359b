"""The frozen-feature cache: the base's outputs computed once, keyed by what produced them.

While the base is frozen its outputs never change, so pushing every image through it again on
every epoch (what the seed's `model.fit` does) is wasted work: about 0.63 GFLOP per 32x32 image
for VGG16. We run the base once over the train, validation and test images and train the head on
the stored features. The trade-off (the Keras transfer-learning guide's): a random augmentation
per epoch cannot come from a cache, so the `augment` variant runs the whole network.

An entry is a folder `<cache-dir>/<key>/` with pool.npy (the training images before the validation
split, in the data set's order), test.npy and meta.json (the fields of the key, a sha256 of each
array file, and what made it). The validation split is not in the key: a run takes its training and
validation rows of the pool (Features.split), so runs at other split seeds (repeats) share one pass. The pass streams: the images
are read a batch at a time (stream.py) and each batch's features are appended to the entry's
files as they come, so the pass holds a few batches, not the data set. The entry is written into a
temporary folder and renamed into place, so a crash or a kill never leaves a half-written entry
(the next write removes the temporary folders of writers that died); it is verified on its first
read in a process, and a corrupted entry is recomputed with a warning. Arrays are read from disk a
batch at a time by offsets (sources.FeatureFile), never held whole: a head over an entry of any size
trains in the memory of a few batches.

What runs the pass is an engine: `LocalPass`, this process's extractor over stream.py's batches,
or cluster.py's `RayPass`, Ray actors across a cluster. Either hands `get` the features batch by
batch in order, and the entry, its key and its checks are the same; meta.json's `made_by` says
which engine made it and with how many workers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlkit import deadlines, distribute, sources, stream

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the stored layout or the extractor's meaning changes (2: pool.npy, no split seed)
# What an entry may hold: the training pool (train + val) and the test images; or, mirrored for
# test-time flips without flips in training, the validation images alone.
SPLITS = ("pool", "val", "test")
SWEEP_GRACE_SECONDS = 60  # a temporary folder this young may belong to a writer about to lock it
PROGRESS_SECONDS = 30  # a long pass logs how far it is this often
PASS_BATCH = 128  # images per call of the extractor in a pass, whatever its engine


class FeatureCacheError(OSError):
    """The cache folder cannot be used: the message names it."""


def default_cache_dir() -> Path:
    if os.environ.get("TLKIT_CACHE_DIR"):
        return Path(os.environ["TLKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tlkit" / "features"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_id(weights: str) -> str:
    """'imagenet' and 'none' stand for themselves; a file is known by its content."""
    if weights in ("imagenet", "none"):
        return weights
    return "sha256:" + file_sha256(Path(weights))


def key_fields(spec: dict, dataset_digest: str, boundary: str) -> dict:
    """Everything that determines the features: change any and the key changes."""
    return {
        "format": FORMAT_VERSION,
        "base": spec["base"],
        "weights": weights_id(spec["weights"]),
        "image_size": spec["image_size"],
        "preprocess": spec["preprocess"],
        "boundary": boundary,
        # The digest covers the sampled images (limit, classes, whose sample the seed draws); the
        # validation split is not here: the pool's features serve every split of it.
        "dataset_digest": dataset_digest,
        "limit": spec["limit"],
        "test_limit": spec["test_limit"],
        # 16-bit compute gives other features; float32 entries keep the keys they always had.
        **({"precision": spec["precision"]} if spec.get("precision", "float32") != "float32" else {}),
    }


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _why(err: OSError, folder: Path) -> str:
    """The OS's reason; numpy reports a full disk as a short write ("16384 requested and 4064 written")."""
    if err.strerror:
        return err.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return str(err)
    return f"No space left on device ({free} bytes free; {err})" if free < 1 << 20 else str(err)


def _size(count: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


class LocalPass:
    """The one-machine pass: this process's extractor over the images, streamed (stream.py)."""

    made_by = {"engine": "local", "workers": 1}

    def features(self, fields: dict, extractor, images: dict, batch_size: int):
        """(split, features of the next batch) for every batch of every split, in order."""
        for split, x in images.items():
            for batch in stream.batches(sources.of(x), batch_size):
                # predict_on_batch: the extractor's compiled predict step (XLA under `jit`, the
                # batch split between the replicas under a distribution strategy: distribute.py),
                # one batch at a time, so nothing accumulates.
                yield split, distribute.predict_on_batch(extractor, batch)


@dataclass
class Features:
    """An entry's features (sources.FeatureFile: read from disk a batch at a time), and once split()
    the run's training and validation rows of the pool."""

    pool: sources.Source | None  # the training images before the validation split, in order
    test: sources.Source | None
    key: str
    hit: bool  # True when read from the cache, False when computed now
    derived_from: str = ""  # key of the lower entry these were computed from, if any
    # What computed them: {"engine": "local"|"ray", "workers": n, ...} (meta.json's "made_by").
    made_by: dict = field(default_factory=lambda: dict(LocalPass.made_by))
    train: sources.Source | None = None  # the pool's training rows (split)
    val: sources.Source | None = None  # the pool's validation rows (split)
    # The base's output for the same images, when these are from below it (fine-tuning's boundary).
    base_output: Features | None = None
    # The features of the images mirrored left to right (the spec's `flip` for training, `tta` for
    # validation and test), in the same order.
    train_mirrored: sources.Source | None = None
    val_mirrored: sources.Source | None = None
    test_mirrored: sources.Source | None = None

    # The splits the entry holds (not the run's train and val, which split() takes of the pool).
    splits: tuple[str, ...] = ()

    def split(self, train_rows, val_rows) -> Features:
        """Set train and val to those rows of the pool (the data set's validation split)."""
        self.train, self.val = self.pool.take(train_rows), self.pool.take(val_rows)
        return self


class FeatureCache:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def _entry(self, key: str) -> Path:
        return self.root / key

    def check_writable(self) -> None:
        """Fail now, naming the folder, not after a pass of the base over every image."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as err:
            raise FeatureCacheError(f"cannot write the feature cache in {self.root}: {_why(err, self.root)}") from None

    # Entries verified in this process, by what would change if the files were rewritten: a run
    # reads the same entry for every configuration of a search, and hashing gigabytes each time
    # (about a second a gigabyte here) would be most of a small head's training.
    _verified: set = set()

    def has(self, key: str) -> bool:
        """Whether an entry is there (unverified: read checks it)."""
        return (self._entry(key) / "meta.json").is_file()

    def read(self, key: str) -> Features | None:
        """The verified entry, or None if absent or corrupted (then it is removed)."""
        entry = self._entry(key)
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            # Every split an entry was written with (an entry of mirrored images may hold one).
            splits = [split for split in SPLITS if split in meta["sha256"]]
            if not splits:
                raise ValueError("it holds no features")
            for split in splits:
                path = entry / f"{split}.npy"
                status = path.stat()
                seen = (str(path), status.st_ino, status.st_size, status.st_mtime_ns, meta["sha256"][split])
                if seen not in self._verified:
                    if file_sha256(path) != meta["sha256"][split]:
                        raise ValueError(f"{split}.npy does not match its checksum")
                    self._verified.add(seen)
            arrays = {split: sources.FeatureFile(entry / f"{split}.npy") for split in splits}
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("feature cache entry %s is corrupted (%s): recomputing it", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return Features(pool=arrays.get("pool"), val=arrays.get("val"), test=arrays.get("test"), key=key, hit=True,
                        splits=tuple(splits),
                        # Entries older than made_by were all made by this process's pass.
                        made_by=meta.get("made_by") or LocalPass.made_by)

    def sweep_dead_writers(self) -> list[Path]:
        """Remove the temporary folders of writers that died (killed, out of memory, power cut).

        A writer holds an flock on its temporary folder until it is done, and the kernel drops the
        lock when the process dies, so an unlocked folder is a dead writer's. One younger than
        SWEEP_GRACE_SECONDS is left alone: its writer may not have taken the lock yet.
        """
        removed = []
        for folder in self.root.glob(".*.tmp-*"):
            try:
                if time.time() - folder.stat().st_mtime < SWEEP_GRACE_SECONDS:
                    continue
                fd = os.open(folder, os.O_RDONLY)
            except OSError:
                continue  # gone already, or not ours to open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            finally:
                os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        if removed:
            log.info("feature cache: removed %d folder(s) left by writers that died", len(removed))
        return removed

    def write(self, key: str, fields: dict, arrays: dict[str, np.ndarray], made_by: dict | None = None) -> None:
        """Write whole arrays as an entry (writer(), in one go)."""
        with self.writer(key, fields, {split: len(a) for split, a in arrays.items()}, made_by) as entry:
            for split, array in arrays.items():
                entry.append(split, array)

    @contextmanager
    def writer(self, key: str, fields: dict, rows: dict[str, int], made_by: dict | None = None):
        """An entry written as its features come: `with cache.writer(...) as entry: entry.append(split, batch)`.

        rows: how many rows each split will have. The files fill a temporary folder; when the block
        ends with every row appended they are committed by a rename into place (atomic on one
        filesystem). Any exception (Ctrl-C and SIGTERM included: the CLI turns SIGTERM into one)
        removes the folder, so no half entry is ever seen; a writer killed outright leaves its folder
        unlocked, and sweep_dead_writers removes it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.sweep_dead_writers()
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=self.root))
            lock = os.open(tmp, os.O_RDONLY)
        except OSError as err:
            raise FeatureCacheError(f"cannot write the feature cache in {self.root}: {_why(err, self.root)}") from None
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until this writer is done or dead (sweep_dead_writers)
        entry = _EntryFiles(tmp, rows)
        try:
            yield entry
            checksums = entry.close()
            meta = {"fields": fields, "sha256": checksums, "made_by": made_by or LocalPass.made_by}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, self._entry(key))
            except OSError:
                # Another process finished the same entry first: its copy is as good as ours.
                if not (self._entry(key) / "meta.json").is_file():
                    raise
        except OSError as err:
            raise FeatureCacheError(f"cannot write the feature cache in {self.root}: {_why(err, self.root)}") from None
        finally:
            entry.abandon()
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(lock)

    def get(self, fields: dict, extractor, images: dict, batch_size: int = PASS_BATCH, engine=None) -> Features:
        """Cached features for images {'pool', 'test'} (or one of them; arrays or
        sources.ImageFiles), computed in one streaming pass on a miss: by `engine` (default LocalPass;
        cluster.RayPass runs it on Ray), which yields (split, features) batch by batch in order."""
        key = key_of(fields)
        cached = self.read(key)
        if cached is not None:
            log.info("feature cache hit: %s", self._entry(key))
            return cached
        engine = engine or LocalPass()
        splits = [split for split in SPLITS if split in images]
        total = sum(len(images[split]) for split in splits)
        log.info("feature cache miss: computing %s features at %s for %d images (%s)", fields["base"],
                 fields["boundary"], total, engine.made_by["engine"])
        started = last_report = time.monotonic()
        done = 0
        with self.writer(key, fields, {split: len(images[split]) for split in splits}, engine.made_by) as entry:
            for split, batch in engine.features(fields, extractor, {split: images[split] for split in splits},
                                                batch_size):
                entry.append(split, batch)
                done += len(batch)
                deadlines.check_pass(started, done, total)  # the recipe's budget: give up early, not late
                if time.monotonic() - last_report > PROGRESS_SECONDS:
                    last_report = time.monotonic()
                    log.info("feature pass: %d of %d images, %.0f images/s", done, total,
                             done / (last_report - started))
        stored = self.read(key)
        if stored is None:  # written and gone again: only a failing disk does that
            raise FeatureCacheError(f"the feature cache in {self.root} did not keep entry {key}")
        stored.hit = False
        return stored


class _EntryFiles:
    """The .npy files of an entry being written, one per split, filled in order batch by batch.

    A file's header needs the array's shape, known from the split's row count and the first
    batch's row shape; its sha256 is kept as the bytes go out, so committing reads nothing back."""

    def __init__(self, folder: Path, rows: dict[str, int]):
        self.folder, self.rows = folder, dict(rows)
        self.files, self.hashes, self.written, self.row_shapes = {}, {}, {}, {}

    def append(self, split: str, batch) -> None:
        batch = np.asarray(batch)
        if np.dtype(batch.dtype).name == "bfloat16":
            # bfloat16 features (precision mixed_bfloat16): .npy has no such type (it would store raw
            # 2-byte voids), and float32 holds every bfloat16 value exactly.
            batch = batch.astype(np.float32)
        batch = np.ascontiguousarray(batch)
        if split not in self.rows:
            raise ValueError(f"no rows were announced for split {split!r}")
        if not self.files:
            self._check_room(batch)
        if split not in self.files:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {
                "descr": np.lib.format.dtype_to_descr(batch.dtype), "fortran_order": False,
                "shape": (self.rows[split], *batch.shape[1:])})
            self.files[split] = open(self.folder / f"{split}.npy", "wb")
            self.hashes[split] = hashlib.sha256()
            self.written[split], self.row_shapes[split] = 0, (batch.shape[1:], batch.dtype)
            self._out(split, header.getvalue())
        if (batch.shape[1:], batch.dtype) != self.row_shapes[split]:
            raise ValueError(f"{split}: a batch of {batch.dtype} {batch.shape[1:]} after "
                             f"{self.row_shapes[split][1]} {self.row_shapes[split][0]}")
        if self.written[split] + len(batch) > self.rows[split]:
            raise ValueError(f"{split}: more than the {self.rows[split]} rows announced")
        self._out(split, batch.data)
        self.written[split] += len(batch)

    def _check_room(self, first_batch: np.ndarray) -> None:
        """Fail at the first batch, not the last, where the disk cannot hold the whole entry: the
        first batch's row size times every announced row (every split comes from one extractor).
        Entries are large (a two-base 45-minute recipe's cache reached 27 GB, its 128-px Xception
        entry 11 GB, and filled the disk): a pass that cannot finish should not run for minutes
        first. It costs one statvfs."""
        needed = first_batch[0].nbytes * sum(self.rows.values()) if len(first_batch) else 0
        free = shutil.disk_usage(self.folder).free
        if needed > free:
            raise OSError(errno.ENOSPC, f"No space left on device (this entry needs {_size(needed)}, "
                                        f"{_size(free)} free)")

    def _out(self, split: str, data) -> None:
        self.files[split].write(data)
        self.hashes[split].update(data)

    def close(self) -> dict[str, str]:
        """Flush every file to disk; the sha256 of each. Every announced row must be there."""
        for split, count in self.rows.items():
            if self.written.get(split, 0) != count:
                raise ValueError(f"{split}: {self.written.get(split, 0)} of {count} rows written")
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {split: h.hexdigest() for split, h in self.hashes.items()}

    def abandon(self) -> None:
        for f in self.files.values():
            f.close()
