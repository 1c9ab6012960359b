"""A keras-tuner search over the head, every trial a nested MLflow run, in one process or many.

A search is a variant with a [search] table (experiments/tune.toml: the seed's cell 19, RandomSearch
over the hidden Dense width, its L2 factor and the learning rate, objective val_accuracy, 6 trials
of up to 10 epochs with EarlyStopping(val_loss, 3)). The base is frozen, so a trial trains only the
head on the cached features (features.py): the base runs once per search, not once per trial and
epoch. After the search the best trial's head goes back onto the frozen base, and that end-to-end
network is evaluated on the test set and logged as `model`, with the reports of a `train` run.

One parent run per search: the spec, the tuner settings, then the best hyperparameters as params
(under their spec names: they describe the logged model), test_accuracy / test_loss, the reports,
the model, and the tags best_trial_id / best_trial_run_id. The modules, by job:

    space.py        what a search is: the space (data), its settings, the model a trial trains
    trials.py       the tracked trials: keras-tuner's Tuner with a nested run per trial
    resume.py       the search folder's state: a search run again resumes
    distributed.py  the chief and its workers (keras-tuner's gRPC oracle)
    search.py       one search from start to finish (tune, work), and the best network logged
    errors.py       TuneError, which they all raise
"""

from __future__ import annotations

from tlkit.tune.distributed import PARENT_ENV, role
from tlkit.tune.errors import TuneError
from tlkit.tune.search import tune, work
from tlkit.tune.space import OBJECTIVE, TUNERS, Search, check, hypermodel, identity, load as load_search
from tlkit.tune.trials import Context, make_tuner

__all__ = ["Context", "OBJECTIVE", "PARENT_ENV", "Search", "TUNERS", "TuneError", "check", "hypermodel",
           "identity", "load_search", "make_tuner", "role", "tune", "work"]
