"""The time by which work must end (the recipe search's budget), seen by what it starts.

The recipe sets it around each configuration (`deadline`); inside, training stops after the epoch
that ends past it (train.py) and a feature pass gives up as soon as its own progress says it would
end past it (features.py, `check_pass`): a pass that the load of a shared machine made slower than
its estimate should not spend the rest of the budget on features it cannot use.
"""

from __future__ import annotations

import contextlib
import contextvars
import time

# A pass is judged on its rate only after this share of its images and these seconds: the first
# batches trace the model and warm the decoders.
JUDGE_AFTER_SHARE = 0.05
JUDGE_AFTER_SECONDS = 20.0

# The time.time() at which work stops; None: it runs as it is.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


class DeadlineError(RuntimeError):
    """The work would end past the deadline: the message says when it would have."""

    def __init__(self, message: str, projected_seconds: float):
        super().__init__(message)
        self.projected_seconds = projected_seconds  # what the whole work would have taken


@contextlib.contextmanager
def deadline(at: float | None):
    """Work started inside stops by `at` (a time.time() value), as each kind of work can."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def current() -> float | None:
    return _DEADLINE.get()


def check_pass(started: float, done: int, total: int) -> None:
    """Raise DeadlineError when a pass that started at `started` (time.monotonic()) and has done
    `done` of `total` images would, at its rate so far, end past the deadline."""
    at = _DEADLINE.get()
    if at is None or done <= 0:
        return
    spent = time.monotonic() - started
    projected = spent * total / done
    if time.time() > at or (done >= JUDGE_AFTER_SHARE * total and spent >= JUDGE_AFTER_SECONDS
                            and time.time() + projected - spent > at):
        raise DeadlineError(f"the feature pass would end past the budget: {done} of {total} images in {spent:.0f} s, "
                            f"about {projected:.0f} s in all", projected)
