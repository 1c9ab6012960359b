"""The search's own error, in a module of its own: every module of the package raises it, and the
package's __init__ re-exports it with the rest, so it need not be defined before those imports."""


class TuneError(RuntimeError):
    """The search ran but cannot finish: a worker died, or no trial completed. One line."""
