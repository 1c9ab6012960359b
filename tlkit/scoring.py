"""`tlkit predict` over folders: images streamed in batches, answers written as they come.

Files named one by one keep registry.predict's rule (every file read before the model loads, a bad
one is the whole command's error). A folder is walked recursively (every file not hidden, any image
size) and scored a batch at a time: a batch is decoded (registry.read_image, the served model's
decoding), answered by the logged model and written out before the next is read, so memory holds a
batch, never the folder (benchmarks/predict_scale.py measures peak RSS against the number of
images). A progress bar goes to stderr; stdout keeps one tab-separated line per image.

--output FILE.csv or FILE.parquet gets a row per file: path, label, probability, error, and one
probability column per class (`p_<class>`, in class order). A file that cannot be read as an image
gets a row with its error and empty answers, and the rest are scored. The file is written beside
its name and renamed into place at the end: an interrupted command leaves no half-written file.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tlkit.registry import RegistryError, load, read_image

BATCH = 64  # images decoded and answered together: the model's own chunk (serving.ONE_CALL_IMAGES)
OUTPUT_SUFFIXES = (".csv", ".parquet")


@dataclass
class Answer:
    path: str
    label: str  # '' when error
    probability: float  # nan when error
    probabilities: list  # one per class; [] when error
    error: str = ""


def check_output(output: str | None) -> None:
    if output and Path(output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise RegistryError(f"--output {output} must end in .csv or .parquet")
    if output and not Path(output).resolve().parent.is_dir():
        raise RegistryError(f"--output {output}: its folder does not exist")


def walk(sources: list[str]) -> Iterator[str]:
    """Every file to score, in order: a file as given; a folder's files recursively, sorted, hidden
    ones (names starting '.') left out. Lazily: a folder is never listed whole into memory."""
    for source in sources:
        if not os.path.isdir(source):
            if not os.path.exists(source):
                raise RegistryError(f"image {source} does not exist")
            yield source
            continue
        for folder, subfolders, files in os.walk(source):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    yield os.path.join(folder, name)


def count(sources: list[str]) -> int:
    return sum(1 for _ in walk(sources))


def _batches(paths: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for path in paths:
        batch.append(path)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def answers(model, sources: list[str], batch: int = BATCH) -> Iterator[Answer]:
    """An Answer per file, in walk order; unreadable files answer with their error."""
    import pandas as pd

    from tlkit.serving import COLUMN

    for paths in _batches(walk(sources), batch):
        images, errors = {}, {}
        for path in paths:
            try:
                images[path] = read_image(path)
            except RegistryError as err:
                errors[path] = str(err)
        frame = model.predict(pd.DataFrame({COLUMN: pd.Series(list(images.values()), dtype=object)})) \
            if images else None
        answered = {} if frame is None else {
            path: (str(label), float(probability), list(probabilities)) for path, label, probability, probabilities
            in zip(images, frame["label"], frame["probability"], frame["probabilities"])}
        for path in paths:
            if path in errors:
                yield Answer(path, "", float("nan"), [], errors[path])
            else:
                yield Answer(path, *answered[path])


class _Table:
    """Rows written as they come to a temporary file beside `output`, renamed into place by close()."""

    def __init__(self, output: str, class_names: list[str]):
        self.output = Path(output)
        self.partial = self.output.with_name(f".{self.output.name}.partial-{os.getpid()}")
        self.columns = ["path", "label", "probability", "error", *[f"p_{name}" for name in class_names]]
        self.parquet = self.output.suffix.lower() == ".parquet"
        self.rows: list[list] = []
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("path", pa.string()), ("label", pa.string()), ("probability", pa.float64()),
                                     ("error", pa.string()), *[(c, pa.float64()) for c in self.columns[4:]]])
            self.writer = pq.ParquetWriter(self.partial, self.schema)
        else:
            self.file = open(self.partial, "w", newline="")
            self.writer = csv.writer(self.file)
            self.writer.writerow(self.columns)
        self.width = len(class_names)

    def add(self, answer: Answer) -> None:
        probabilities = answer.probabilities or [None] * self.width
        probability = None if answer.error else answer.probability
        self.rows.append([answer.path, answer.label, probability, answer.error, *probabilities])
        if len(self.rows) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if self.parquet:
            import pyarrow as pa

            self.writer.write_table(pa.Table.from_pylist([dict(zip(self.columns, row)) for row in self.rows],
                                                         schema=self.schema))
        else:
            self.writer.writerows(["" if v is None else v for v in row] for row in self.rows)
        self.rows = []

    def close(self, keep: bool) -> None:
        try:
            if keep:
                self.flush()
        finally:
            (self.writer if self.parquet else self.file).close()
            if keep:
                os.replace(self.partial, self.output)
            else:
                self.partial.unlink(missing_ok=True)


@dataclass
class Scored:
    images: int
    errors: int


def score(model_uri: str, sources: list[str], output: str | None, echo) -> Scored:
    """Score every file of `sources` (files and folders), calling echo(line) per answer in order,
    with a progress bar on stderr and, with `output`, the table (module docstring)."""
    import click

    check_output(output)
    total = count(sources)  # walked once to size the progress bar; nothing of it is kept
    if total == 0:
        raise RegistryError(f"no files to score in {', '.join(sources)}")
    model = load(model_uri)
    class_names = list((model.metadata.metadata or {}).get("class_names") or model.unwrap_python_model().class_names)
    table = _Table(output, class_names) if output else None
    errors = done = 0
    kept = False
    try:
        with click.progressbar(length=total, label="scoring", file=sys.stderr, show_pos=True) as bar:
            for answer in answers(model, sources):
                if answer.error:
                    errors += 1
                    if table is None:  # no table to hold the error: said where errors go, in order
                        click.echo(f"tlkit: {answer.error}", err=True)
                else:
                    echo(f"{answer.path}\t{answer.label}\t{answer.probability:.4f}")
                if table is not None:
                    table.add(answer)
                done += 1
                bar.update(1)
        kept = True
    finally:
        if table is not None:
            table.close(keep=kept)
    return Scored(done, errors)
