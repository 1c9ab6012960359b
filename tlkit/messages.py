"""How tlkit says what went wrong: one line.

Every known failure reaches the user as one line (cli_errors.py's table of known errors and exit codes), and
failures from below (Keras, MLflow, Ray, PIL) often carry many: the first says what happened, the
rest is a traceback or a hint. `first_line` is the one way tlkit takes it.
"""

from __future__ import annotations


def first_line(err: BaseException | str, limit: int | None = None) -> str:
    """The first non-blank line of `err`'s message, stripped, cut to `limit` characters; an
    exception's type name when its message is empty (or blank), '' for an empty string."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(err).__name__ if isinstance(err, BaseException) else ""
