"""A search is a variant with a [search] table: its settings and space are data, checked before anything runs."""

from __future__ import annotations

import pytest

from tlkit import spec as specs, tune

from conftest import invoke

SPACE = '''
[search.space]
units = { type = "int", min_value = 32, max_value = 64, step = 32 }
'''


def test_the_seeds_search_is_data_in_experiments_tune_toml():
    search = tune.load_search()
    assert (search.tuner, search.max_trials, search.executions_per_trial) == ("random", 6, 1)
    assert search.space == {"units": {"type": "int", "min_value": 256, "max_value": 1024, "step": 128},
                            "l2": {"type": "float", "min_value": 1e-4, "max_value": 1e-2, "sampling": "log"},
                            "learning_rate": {"type": "float", "min_value": 1e-4, "max_value": 1e-2,
                                              "sampling": "log"}}
    # The spec of the search variant is the baseline's: the table is not a spec field.
    assert specs.load("tune") == specs.load("baseline")
    assert specs.variant_search("baseline") is None
    # Options on top of the file's settings.
    assert tune.load_search(max_trials=2, tuner="bayesian").max_trials == 2


def test_a_search_variant_file_of_ones_own(tmp_path):
    path = tmp_path / "narrow.toml"
    path.write_text('description = "narrow"\nunits = 48\n[search]\ntuner = "bayesian"\nmax_trials = 3\n' + SPACE)
    search = tune.load_search(str(path))
    assert search.tuner == "bayesian" and search.max_trials == 3 and list(search.space) == ["units"]
    assert specs.load(str(path))["units"] == 48


@pytest.mark.parametrize("table, message", [
    ('[search]\ntuner = "grid"\n' + SPACE, "tuner must be one of random, bayesian, hyperband, got 'grid'"),
    ('[search]\nmax_trials = 0\n' + SPACE, "max_trials must be an integer of at least 1, got 0"),
    ('[search]\nmax_trial = 3\n' + SPACE, "unknown search setting(s) max_trial"),
    ('[search]\ntuner = "random"\n', "[search.space] names no hyperparameter"),
    ('[search.space]\npreprocess = { type = "int", min_value = 1, max_value = 2 }\n',
     "search.space.preprocess: not a numeric spec field"),
    ('[search.space]\nunits = { type = "float", min_value = 1, max_value = 2 }\n',
     "search.space.units: units is int, the space says float"),
    ('[search.space]\nl2 = { type = "float", min_value = 0.1, max_value = 0.01 }\n',
     "search.space.l2: min_value 0.1 is above max_value 0.01"),
    ('[search.space]\nl2 = { type = "float", min_value = 0.1 }\n', "search.space.l2 takes min_value, max_value"),
    ('search = 3\n', "search must be a table"),
])
def test_a_bad_search_table_is_one_line_and_exit_2(table, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.toml"
    path.write_text(table)
    for command in (["tune", str(path)], ["train", str(path)]):
        result = invoke(*command, "--weights", "none")
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "mlflow.db").exists()  # refused before the tracking store was opened


def test_a_suite_whose_children_would_be_tested_on_different_data_fails_before_training(image_folder, tracking,
                                                                                      tmp_path):
    """Promotion compares one test set: children whose data differ (here the image size) fail at
    once, with nothing logged, not at promotion after all the training."""
    import mlflow

    bigger = tmp_path / "bigger.toml"
    bigger.write_text("image_size = 40\n")
    result = invoke("suite", "--variants", f"baseline,{bigger}", "--data", str(image_folder),
                                       "--weights", "none")
    assert result.exit_code == 2, result.output
    assert "the variants would be tested on different data (baseline (" in result.output
    assert "pass --no-promote" in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
