"""The recipe search: stages of nested runs, chosen on validation accuracy, the choice a variant file."""

from __future__ import annotations

import mlflow
import pytest

from tlkit import spec as specs

from conftest import FAST_ARGS, cli, invoke


@pytest.mark.e2e
def test_recipe_runs_every_stage_and_chooses_on_validation_accuracy(image_folder, tracking, tmp_path):
    chosen_file = tmp_path / "chosen.toml"
    result = cli("recipe", "--data", str(image_folder), *FAST_ARGS, "--limit", "30", "--output", str(chosen_file))
    assert result.exit_code == 0, result.output
    parent = mlflow.search_runs(filter_string="tags.mlflow.runName = 'recipe'", output_format="list")[0]
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  output_format="list")
    by_stage: dict[str, list] = {}
    for run in children:
        assert run.info.status == "FINISHED"
        by_stage.setdefault(run.data.tags["recipe_stage"], []).append(run)
    # input: 4 candidates on the sample; head: 2 on every image; flip: 1; finetune: 1.
    assert {stage: len(runs) for stage, runs in by_stage.items()} == {"input": 4, "head": 2, "flip": 1, "finetune": 1}
    assert all(r.data.params["limit"] == "30" for r in by_stage["input"])
    assert all(r.data.params["limit"] == "30" for r in by_stage["head"])  # the caller's limit stays
    # Every stage keeps its best by validation accuracy; the best input's size and preprocessing carry on.
    best_input = max(by_stage["input"], key=lambda r: r.data.metrics["val_accuracy_final"])
    for run in by_stage["head"]:
        assert run.data.params["image_size"] == best_input.data.params["image_size"]
        assert run.data.params["preprocess"] == best_input.data.params["preprocess"]
    assert by_stage["flip"][0].data.params["flip"] == "True"
    assert by_stage["finetune"][0].data.params["unfreeze"] == "block5"
    # The frozen stages cached below block5, so fine-tuning made no pass of its own.
    assert by_stage["finetune"][0].data.tags["feature_cache"] == "hit"
    contenders = by_stage["head"] + by_stage["flip"] + by_stage["finetune"]
    assert parent.data.tags["best_run_id"] in {r.info.run_id for r in contenders}
    best = mlflow.get_run(parent.data.tags["best_run_id"])
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.data.metrics["val_accuracy_final"])
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best.data.metrics["test_accuracy"])
    assert parent.data.metrics["search_seconds"] > 0
    # The choice is a variant file: no data, weights or sample in it; `tlkit train` reruns it.
    diff, description = specs.read_variant(str(chosen_file))
    assert "recipe search" in description and not {"data", "weights"} & set(diff)
    assert mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/chosen.toml") == chosen_file.read_text()
    assert f"variant file {chosen_file}" in result.output
    rerun = invoke("train", str(chosen_file), "--data", str(image_folder), *FAST_ARGS, "--limit", "30")
    assert rerun.exit_code == 0, rerun.output


def test_recipe_refuses_an_output_that_is_not_a_variant_file(image_folder, tracking):
    result = invoke("recipe", "--data", str(image_folder), *FAST_ARGS, "--output", "x.json")
    assert result.exit_code == 2 and "must end in .toml" in result.output
