"""The recipe search: a budget that holds, candidates from the data and the base, successive halving
chosen on validation accuracy, and the choice a variant file."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import mlflow
import pytest

from tlkit import budget, candidates, models, recipe
from tlkit import spec as specs

from conftest import FAST_ARGS, assert_clear, invoke, make_image_folder

BUDGET_SECONDS = 60


@pytest.mark.e2e
def test_a_recipe_keeps_its_budget_from_the_command_start_and_lists_what_it_left_out(image_folder, tracking,
                                                                                     tmp_path):
    chosen_file = tmp_path / "chosen.toml"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "tlkit.cli", "recipe", "--data", str(image_folder), *FAST_ARGS,
                           "--budget", f"{BUDGET_SECONDS}s", "--output", str(chosen_file)],
                          capture_output=True, text=True, timeout=4 * BUDGET_SECONDS)
    wall = time.time() - started  # TensorFlow's import included, as the user's clock has it
    assert done.returncode == 0, done.stderr[-3000:]
    assert wall <= 1.1 * BUDGET_SECONDS, f"{wall:.1f} s for a {BUDGET_SECONDS} s budget"
    # The plan came first, with an estimate per candidate and the total.
    plan = done.stderr.index("recipe plan")
    assert plan < done.stderr.index("screen-1 starts") and "total about" in done.stderr

    parent = mlflow.search_runs(filter_string="tags.mlflow.runName = 'recipe'", output_format="list")[0]
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  output_format="list")
    by_rung: dict[str, list] = {}
    for run in children:
        assert run.info.status == "FINISHED"
        by_rung.setdefault(run.data.tags["recipe_rung"], []).append(run)
    # Every screen candidate either ran or is listed, with its cost, as what more time would buy.
    left_out = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/left_out.json"))
    screened = len(by_rung["screen"]) + sum(item["rung"] == "screen" for item in left_out)
    assert screened == len(candidates.screen({"VGG16": "none"}, 32))
    assert left_out and all(item["estimate_seconds"] > 0 for item in left_out)
    assert "more time would buy" in done.stderr and "(left out)" in done.stdout
    assert parent.data.metrics["left_out"] == len(left_out)

    # Successive halving: the full rung is the best third of the screen by validation accuracy.
    screen = sorted(by_rung["screen"], key=lambda r: -r.data.metrics["val_accuracy_final"])
    if "full" in by_rung:
        promoted = len(by_rung["full"])
        assert promoted <= -(-len(screen) // recipe.ETA)
        cut = screen[promoted - 1].data.metrics["val_accuracy_final"]
        levers = {(r.data.params["image_size"], r.data.params["preprocess"], r.data.params["units"],
                   r.data.params["label_smoothing"]) for r in by_rung["full"]}
        for run in screen:
            key = (run.data.params["image_size"], run.data.params["preprocess"], run.data.params["units"],
                   run.data.params["label_smoothing"])
            if key in levers:
                assert run.data.metrics["val_accuracy_final"] >= cut
        # Fidelity is in the params: the screen saw a sample and a third of the epochs.
        assert {r.data.params["epochs"] for r in by_rung["screen"]} == {"1"}
        assert {r.data.params["epochs"] for r in by_rung["full"]} == {"2"}
    # The choice is on validation accuracy at the highest fidelity reached, and a variant file.
    best = mlflow.get_run(parent.data.tags["best_run_id"])
    top = [r for rung in ("finetune", "flip", "full", "screen") if rung in by_rung for r in by_rung[rung]]
    assert best.data.tags["recipe_rung"] in by_rung
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best.data.metrics["val_accuracy_final"])
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(best.data.metrics["test_accuracy"])
    assert best.data.metrics["val_accuracy_final"] >= max(r.data.metrics["val_accuracy_final"] for r in top
                                                          if r.data.tags["recipe_rung"] == best.data.tags["recipe_rung"])
    diff, description = specs.read_variant(str(chosen_file))
    assert "recipe search" in description and not {"data", "weights"} & set(diff)
    assert mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/chosen.toml") == chosen_file.read_text()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"recipe.png", "recipe.txt", "configurations.json"} <= artifacts
    rerun = invoke("train", str(chosen_file), "--data", str(image_folder), *FAST_ARGS)
    assert rerun.exit_code == 0, rerun.output


def test_a_budget_reads_as_a_duration():
    assert budget.parse_budget("90s") == 90 and budget.parse_budget("45m") == 2700
    assert budget.parse_budget("2h") == 7200 and budget.parse_budget("1h30m") == 5400
    assert budget.parse_budget("120") == 120
    for bad in ("", "45x", "m", "-5m", "0s"):
        with pytest.raises(budget.BudgetError, match="budget"):
            budget.parse_budget(bad)


def test_the_recipe_refuses_bad_options_in_one_line(image_folder, tracking):
    assert_clear(invoke("recipe", "--data", str(image_folder), *FAST_ARGS, "--output", "x.json"), 2, "must end in .toml")
    assert_clear(invoke("recipe", "--data", str(image_folder), *FAST_ARGS, "--budget", "soon"), 2,
                 "budget 'soon' is not a duration")
    assert_clear(invoke("recipe", "--data", str(image_folder), "--base", "VGG16,Xception",
                        "--weights", "VGG16=none"), 2, "--weights gives nothing for Xception")
    assert_clear(invoke("recipe", "--data", str(image_folder), "--base", "VGG16",
                        "--weights", "ResNet50=none"), 2, "names no base of --base VGG16")
    assert_clear(invoke("recipe", "--data", str(image_folder), "--base", "VGG16,Nope", "--weights", "none"), 2,
                 "unknown base 'Nope'")


def test_bases_and_their_weights_pair_up():
    assert recipe.parse_bases("VGG16", "/w/vgg.h5") == {"VGG16": "/w/vgg.h5"}
    assert recipe.parse_bases("VGG16,Xception", "none") == {"VGG16": "none", "Xception": "none"}
    assert recipe.parse_bases("VGG16, Xception", "VGG16=/a.h5,Xception=/b.h5") == {"VGG16": "/a.h5",
                                                                                 "Xception": "/b.h5"}


def test_candidate_sizes_follow_the_data_and_the_base(tmp_path):
    # CIFAR-10's 32 px: from the base's smallest input up to 4x; photos: from half their size to the trained size.
    assert candidates.image_sizes("VGG16", 32) == [32, 64, 128]
    assert candidates.image_sizes("Xception", 32) == [71, 96, 128]
    assert candidates.image_sizes("VGG16", 224) == [112, 160, 224]
    assert candidates.image_sizes("Xception", 224)[-1] == 299
    for base in models.BASES:
        for median in (16, 32, 224, 1000):
            sizes = candidates.image_sizes(base, median)
            assert sizes == sorted(sizes) and sizes[0] >= models.BASES[base].min_image_size
            assert sizes[-1] <= max(models.BASES[base].trained_size, models.BASES[base].min_image_size)
    # The seed's [0, 1] scaling only where the base does not scale pixels itself, and every candidate legal.
    assert {c["preprocess"] for c in candidates.inputs("VGG16", 32)} == {"unit", "base"}
    assert {c["preprocess"] for c in candidates.inputs("EfficientNetB0", 32)} == {"base"}
    candidates.check(candidates.screen({base: "none" for base in models.BASES}, 32), specs.merge({"weights": "none"}))
    photos = make_image_folder(tmp_path / "photos", train_per_class=2, test_per_class=1, size=96)
    assert candidates.median_side(str(photos)) == 96
    assert candidates.image_counts(str(photos)) == (6, 3)
    assert candidates.median_side("cifar10") == 32


@pytest.mark.e2e
def test_with_two_bases_each_base_is_fine_tuned_on_the_sample_and_the_best_goes_on_first(image_folder, tracking,
                                                                                        tmp_path):
    """Search.run_finetune_screen with real runs: the screen's best input of each base, its top
    block fine-tuned at the screen's fidelity, nested under the parent; the screen re-ranked on them."""
    from tlkit import tracking as runs

    lines = []
    clock = budget.Clock(900, started=time.time())
    # precision given: the 16-bit screen (test_a_faster_precision_is_screened_and_kept_...) stays out
    searching = recipe.Search({"data": str(image_folder), "weights": "none", "epochs": 1, "batch_size": 8,
                               "precision": "float32"},
                              {"VGG16": "none", "Xception": "none"}, clock, None, say=lines.append)
    searching.check()
    inputs = [{"base": "VGG16", "image_size": 32, "preprocess": "base", "weights": "none"},
              {"base": "Xception", "image_size": 71, "preprocess": "base", "weights": "none"}]
    with runs.run("recipe") as parent:
        searching.probe(inputs)
        searching.screen_allowance = 600.0
        screened = searching.run_screen(inputs, parent.info.run_id, tmp_path)
        assert len(screened) == 2
        ranked = searching.run_finetune_screen(screened, parent.info.run_id, tmp_path)
    tuned = [t for t in searching.tried if t.rung == "screen-ft"]
    plain, extras, [deeper] = tuned[:2], tuned[2:3], tuned[3:]
    assert sorted(t.spec["base"] for t in plain) == ["VGG16", "Xception"]
    for attempt in tuned:
        assert not attempt.error and attempt.estimate > 0
        depth = "top2" if attempt is deeper else "top1"
        assert (attempt.spec["unfreeze"], attempt.spec["finetune_epochs"]) == (depth, recipe.FINETUNE_SCREEN_EPOCHS)
        assert attempt.spec["limit"] == searching.screen_fields["limit"]
        found = mlflow.get_run(attempt.run_id)
        assert found.data.tags["recipe_rung"] == "screen-ft"
        assert found.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert not any(t.spec["flip"] or t.spec["tta"] for t in plain)
    assert ranked == recipe.rank_by_bases(screened, {t.spec["base"]: t.val_accuracy for t in plain},
                                          searching.images(plain[0].spec)["val"], searching.on_every_image)
    assert sorted(searching.on_every_image) == ["VGG16", "Xception"] and min(searching.on_every_image.values()) > 0
    # The leader's base once more, with flips in training and at test time; fine-tuning takes them
    # only where they beat its plain screen on validation.
    [flipped] = extras
    assert flipped.spec["base"] == ranked[0].spec["base"] and flipped.spec["flip"] and flipped.spec["tta"]
    leader = next(t for t in plain if t.spec["base"] == flipped.spec["base"])
    assert {k: v for k, v in flipped.spec.items() if k not in ("flip", "tta")} == \
        {k: v for k, v in leader.spec.items() if k not in ("flip", "tta")}
    assert flipped.val_accuracy_without_tta == mlflow.get_run(flipped.run_id).data.metrics["val_accuracy_without_tta"]
    assert searching.finetune_extras == recipe.paying_extras(leader, flipped)
    # Then the leader's with two blocks: fine-tuning on every image starts with the depth that won.
    assert {k: v for k, v in deeper.spec.items() if k != "unfreeze"} == \
        {k: v for k, v in leader.spec.items() if k != "unfreeze"}
    assert searching.finetune_lever["unfreeze"] == ("top2" if deeper.val_accuracy > leader.val_accuracy else "top1")
    assert searching.best is screened[0]  # a sample's fine-tuning ranks bases; it is not a finalist


@pytest.mark.e2e
def test_a_faster_precision_is_screened_and_kept_only_where_validation_held(image_folder, tracking, tmp_path,
                                                                           monkeypatch):
    """Search.run_finetune_screen with FASTER_PRECISION: the leader's fine-tuning screen again in
    mixed_bfloat16 (PRECISION_SPEEDUP 0 here: tiny inputs gain nothing from it), then every run
    after in the precision keeps_precision chose, the extras measured against the same precision."""
    from tlkit import tracking as runs

    monkeypatch.setattr(recipe, "PRECISION_SPEEDUP", 0.0)
    clock = budget.Clock(900, started=time.time())
    searching = recipe.Search({"data": str(image_folder), "weights": "none", "epochs": 1, "batch_size": 8},
                              {"VGG16": "none"}, clock, None, say=lambda line: None)
    searching.check()
    assert searching.precisions == ["float32", recipe.FASTER_PRECISION]
    inputs = [{"base": "VGG16", "image_size": 32, "preprocess": "base", "weights": "none"}]
    with runs.run("recipe") as parent:
        searching.probe(inputs)
        assert {key[2] for key in searching.costs.rates} == {"float32", recipe.FASTER_PRECISION}
        searching.screen_allowance = 600.0
        screened = searching.run_screen(inputs, parent.info.run_id, tmp_path)
        searching.run_finetune_screen(screened, parent.info.run_id, tmp_path)
        searching.run_full(screened, tmp_path, parent.info.run_id)
    plain, fast, extras, deeper = [t for t in searching.tried if t.rung == "screen-ft"]
    assert deeper.spec["unfreeze"] == "top2" and deeper.spec["precision"] == extras.spec["precision"]
    assert (plain.spec["precision"], fast.spec["precision"]) == ("float32", recipe.FASTER_PRECISION)
    assert {k: v for k, v in fast.spec.items() if k != "precision"} == \
        {k: v for k, v in plain.spec.items() if k != "precision"}
    assert mlflow.get_run(fast.run_id).data.params["precision"] == recipe.FASTER_PRECISION
    kept = recipe.keeps_precision(plain, fast, searching.images(fast.spec)["val"])
    decided = recipe.FASTER_PRECISION if kept else "float32"
    assert extras.spec["flip"] and extras.spec["precision"] == decided
    assert searching.finetune_extras == recipe.paying_extras(fast if kept else plain, extras)
    [full] = [t for t in searching.tried if t.rung == "full"]
    assert full.spec["precision"] == decided and (full.diff.get("precision") == recipe.FASTER_PRECISION) == kept


def test_the_faster_precision_is_kept_within_a_standard_error_and_tried_only_where_it_saves():
    def tried(val):
        return recipe.Tried("screen-ft", "screen-ft-1", {}, {}, val_accuracy=val)

    assert recipe.keeps_precision(tried(0.70), tried(0.70), 500)
    assert recipe.keeps_precision(tried(0.70), tried(0.69), 500)  # one standard error is 2.05 points
    assert not recipe.keeps_precision(tried(0.70), tried(0.67), 500)
    assert not recipe.keeps_precision(tried(0.70), tried(0.69), 50000)
    # Screened where the probe's rates make fine-tuning the leader on every image PRECISION_SPEEDUP
    # times faster; never where the user named a precision.
    def search_with(fast_rate: float, overrides: dict = {}) -> recipe.Search:
        clock = budget.Clock(3600, started=time.time())
        searching = recipe.Search({"weights": "none", **overrides}, {"VGG16": "none"}, clock, None,
                                  say=lambda line: None)
        searching.costs = budget.Costs(rates={
            ("VGG16", 32, precision): budget.Rates(pass_image=rate, head_sample=0.0, finetune_sample={"top1": rate})
            for precision, rate in (("float32", 0.01), (recipe.FASTER_PRECISION, fast_rate))}, overhead=0.0)
        return searching

    leader = recipe.Tried("screen", "screen-1", {"units": 1024}, {})
    assert search_with(0.01 / (recipe.PRECISION_SPEEDUP + 0.1)).precision_pays_off(leader)
    assert not search_with(0.01 / (recipe.PRECISION_SPEEDUP - 0.1)).precision_pays_off(leader)
    named = search_with(0.001, {"precision": "float32"})
    assert named.precisions == ["float32"] and not named.precision_pays_off(leader)
    short = recipe.Search({"weights": "none"}, {"VGG16": "none"},
                          budget.Clock(recipe.PRECISION_MIN_BUDGET_SECONDS - 1), None, say=lambda line: None)
    assert short.precisions == ["float32"]  # a short search does not pay for the second probe
    # MLproject's recipe entry point passes precision=auto: the search decides, as when unset.
    assert search_with(0.001, {"precision": "auto"}).precisions == ["float32", recipe.FASTER_PRECISION]
    from tlkit import mlproject
    assert mlproject.TOOL_ENTRY_POINTS["recipe"][1]["precision"] == "auto"


def test_estimates_count_each_pass_once_and_learn_from_the_runs():
    costs = budget.Costs(rates={("VGG16", 32, "float32"): budget.Rates(pass_image=0.01, head_sample=0.001,
                                                              finetune_sample={"top1": 0.004})}, overhead=0.0)
    spec = specs.merge({"weights": "none", "epochs": 2})
    images = {"train": 900, "val": 100, "test": 1000}
    first = costs.estimate(spec, images)
    assert first == pytest.approx(2000 * 0.01 + 2 * (900 + 100 / 3) * 0.001)
    costs.made(spec, images)
    assert costs.estimate(spec, images) == pytest.approx(2 * (900 + 100 / 3) * 0.001)  # the pass is cached now
    assert costs.estimate(dict(spec, flip=True), images) > costs.estimate(spec, images)  # the mirrored pass
    tuned = dict(spec, unfreeze="top1", finetune_epochs=3)
    assert costs.estimate(tuned, images) > costs.estimate(spec, images)
    costs.observe(10.0, 20.0)
    assert costs.correction == pytest.approx(2.0)


def test_fine_tuning_estimates_learn_from_fine_tuning_runs_alone():
    """The probe's fine-tuning step and a frozen head's are different work: once a fine-tuning run
    has finished, fine-tuning estimates are corrected by the fine-tuning runs' ratio, frozen ones by
    the frozen runs'."""
    costs = budget.Costs(rates={("VGG16", 32, "float32"): budget.Rates(pass_image=0.01, head_sample=0.001,
                                                              finetune_sample={"top1": 0.004})}, overhead=0.0)
    frozen = specs.merge({"weights": "none", "epochs": 2})
    tuned = dict(frozen, unfreeze="top1", finetune_epochs=3)
    images = {"train": 900, "val": 100, "test": 1000}
    raw_frozen, raw_tuned = costs.estimate(frozen, images), costs.estimate(tuned, images)
    costs.observe(raw_frozen, raw_frozen * 0.8)
    assert costs.estimate(tuned, images) == pytest.approx(0.8 * raw_tuned)  # no fine-tuning seen yet: the only ratio
    costs.observe(costs.estimate(tuned, images), raw_tuned * 2.0, fine_tuned=True)
    assert costs.finetune_correction == pytest.approx(2.0)  # of the uncorrected estimate
    assert costs.estimate(tuned, images) == pytest.approx(2.0 * raw_tuned)
    assert costs.estimate(frozen, images) == pytest.approx(0.8 * raw_frozen)


def test_fine_tuning_pays_for_a_pass_below_its_block_unless_one_was_cut_there():
    """A frozen run's pass stops at the base's output, which fine-tuning cannot use; a pass cut
    below the deepest depth (the recipe's cache_below) serves both."""
    rates = {("VGG16", 32, "float32"): budget.Rates(pass_image=0.01, head_sample=0.0, finetune_sample={"top1": 0.0})}
    spec = specs.merge({"weights": "none", "epochs": 1})
    tuned = dict(spec, unfreeze="top1", finetune_epochs=1)
    images = {"train": 900, "val": 100, "test": 1000}
    pass_seconds = 2000 * 0.01
    frozen_first = budget.Costs(rates=rates, overhead=0.0)
    frozen_first.made(spec, images)
    assert frozen_first.estimate(tuned, images) == pytest.approx(pass_seconds)
    assert frozen_first.estimate(spec, images) == pytest.approx(0.0)
    cut_first = budget.Costs(rates=rates, overhead=0.0)
    cut_first.made(spec, images, below_a_block=True)
    assert cut_first.estimate(tuned, images) == pytest.approx(0.0)
    assert cut_first.estimate(spec, images) == pytest.approx(0.0)
    tuned_first = budget.Costs(rates=rates, overhead=0.0)
    tuned_first.made(tuned, images)
    assert tuned_first.estimate(spec, images) == pytest.approx(0.0)


def test_the_bases_go_on_in_the_order_their_fine_tuned_screens_reached_a_tie_to_the_cheaper():
    def tried(name, base, val):
        return recipe.Tried("screen", name, {"base": base}, {"base": base}, val_accuracy=val)

    screened = [tried("x128", "Xception", 0.70), tried("v64", "VGG16", 0.66), tried("x96", "Xception", 0.65),
                tried("v32", "VGG16", 0.57)]
    xception_dearer = {"Xception": 1500.0, "VGG16": 1100.0}
    ranked = recipe.rank_by_bases(screened, {"Xception": 0.72, "VGG16": 0.75}, 500, xception_dearer)
    assert [t.name for t in ranked] == ["v64", "v32", "x128", "x96"]
    # Two points ahead of 0.75 on 500 images is more than one standard error (1.9 points): it leads.
    ranked = recipe.rank_by_bases(screened, {"Xception": 0.77, "VGG16": 0.75}, 500, xception_dearer)
    assert [t.name for t in ranked] == ["x128", "x96", "v64", "v32"]
    # One point ahead is a tie on 500 images: the cheaper base on every image goes first...
    ranked = recipe.rank_by_bases(screened, {"Xception": 0.76, "VGG16": 0.75}, 500, xception_dearer)
    assert [t.name for t in ranked] == ["v64", "v32", "x128", "x96"]
    # ... where Xception is the cheaper, it; and on 50,000 images one point is no tie.
    ranked = recipe.rank_by_bases(screened, {"Xception": 0.75, "VGG16": 0.76}, 500, {"Xception": 900.0, "VGG16": 1100.0})
    assert [t.name for t in ranked] == ["x128", "x96", "v64", "v32"]
    ranked = recipe.rank_by_bases(screened, {"Xception": 0.76, "VGG16": 0.75}, 50_000, xception_dearer)
    assert [t.name for t in ranked] == ["x128", "x96", "v64", "v32"]
    assert recipe.one_standard_error(0.75, 500) == pytest.approx(0.0194, abs=1e-4)
    # A base whose fine-tuned screen did not finish: the frozen order stands.
    assert recipe.rank_by_bases(screened, {"VGG16": 0.75}, 500, xception_dearer) is screened
    assert recipe._finetune_screen_diff({"base": "VGG16", "image_size": 64}) == {
        "base": "VGG16", "image_size": 64, **candidates.finetunes()[0],
        "finetune_epochs": recipe.FINETUNE_SCREEN_EPOCHS}


def test_the_probe_times_a_real_fine_tuning_step_of_each_depth():
    """The block above the cut trains in the probe (BatchNorm in inference mode, as fine-tuning
    does): a step of two blocks costs more than one, and one more than the head alone."""
    spec = specs.merge({"weights": "none", "units": 1024, "dropout": 0.5})
    # The fastest of three probes per depth: each times one step, and on a loaded CI machine one
    # step of two blocks once took less than one of a single block (5.6 against 7.6 ms an image).
    probes = [budget.probe(spec, 10, ["top1", "top2"], {"units": 1024, "dropout": 0.5}) for _ in range(3)]
    top1, top2 = (min(rates.finetune_sample[depth] for rates in probes) for depth in ("top1", "top2"))
    head = min(rates.head_sample for rates in probes)
    assert top2 > top1 > head > 0


def test_fine_tuning_that_does_not_fit_runs_at_the_most_epochs_that_do():
    """Search._fitted_epochs: the lever's own epochs where they fit, fewer (down to
    MIN_FINETUNE_EPOCHS) where only those fit, and the lever as it is where none does."""
    def search_with(seconds_left: float) -> recipe.Search:
        clock = budget.Clock(seconds_left + budget.WRAP_UP_SECONDS, started=time.time())
        searching = recipe.Search({"weights": "none"}, {"VGG16": "none"}, clock, None, say=lambda line: None)
        searching.costs = budget.Costs(rates={("VGG16", 32, "float32"): budget.Rates(
            pass_image=0.0, head_sample=0.0, finetune_sample={"top1": 0.001})}, overhead=0.0)
        return searching

    lever = {"unfreeze": "top1", "finetune_epochs": 6}
    roomy = search_with(3600)
    assert roomy._fitted_epochs(lever) == lever
    per_epoch = roomy._estimate(dict(lever, finetune_epochs=2), {}) - roomy._estimate(dict(lever, finetune_epochs=1), {})
    three = roomy._estimate(dict(lever, finetune_epochs=3), {})
    tight = search_with(three + per_epoch / 2)  # three epochs fit, four do not
    assert tight._fitted_epochs(lever) == dict(lever, finetune_epochs=3)
    short = search_with(roomy._estimate(dict(lever, finetune_epochs=recipe.MIN_FINETUNE_EPOCHS), {}) / 2)
    assert short._fitted_epochs(lever) == lever


def test_fine_tuning_takes_the_screen_s_flips_only_where_they_fit_at_its_epochs():
    """Search.first_finetune: the first fine-tuning lever with the fine-tuning screen's extras
    where they paid and their estimate fits what is left; tta alone where flips do not fit; the
    lever alone where neither fits (each dropped one listed as left out, with its cost) or where
    the screen found they do not pay."""
    def search_with(seconds_left: float, extras: dict) -> recipe.Search:
        clock = budget.Clock(seconds_left + budget.WRAP_UP_SECONDS, started=time.time())
        searching = recipe.Search({"weights": "none"}, {"VGG16": "none"}, clock, None, say=lambda line: None)
        searching.costs = budget.Costs(rates={("VGG16", 32, "float32"): budget.Rates(
            pass_image=0.01, head_sample=0.0, finetune_sample={"top1": 0.001})}, overhead=0.0)
        searching.costs.made(searching.base_spec, searching.images(searching.base_spec), below_a_block=True)
        searching.best = recipe.Tried("head", "head-1", {"units": 1024}, searching._spec({"units": 1024}, {}))
        searching.finetune_extras = extras
        return searching

    lever = candidates.finetunes()[0]
    both, tta = recipe.FINETUNE_SCREEN_EXTRAS, {"tta": True}
    roomy = search_with(3600, both)
    assert roomy.first_finetune() == {**lever, **both}
    cost = {name: roomy._estimate({"units": 1024, **lever, **extras}, {})
            for name, extras in (("both", both), ("tta", tta), ("plain", {}))}
    assert cost["both"] > cost["tta"] > cost["plain"]  # the mirrored training images; the mirrored test images
    tta_fits = search_with((cost["both"] + cost["tta"]) / 2, both)
    assert tta_fits.first_finetune() == {**lever, **tta}  # flips dropped, listed with their cost
    assert [(item["rung"], item["diff"].get("flip")) for item in tta_fits.left_out] == [("finetune", True)]
    assert tta_fits.left_out[0]["estimate_seconds"] == pytest.approx(cost["both"], abs=0.1)
    # tta changes no training: where it does not fit at the lever's epochs, it runs at fewer
    fewer = search_with((cost["tta"] + cost["plain"]) / 2, both)
    chosen = fewer.first_finetune()
    assert chosen == {**lever, **tta, "finetune_epochs": chosen["finetune_epochs"]}
    assert recipe.MIN_FINETUNE_EPOCHS <= chosen["finetune_epochs"] < lever["finetune_epochs"]
    assert [item["diff"].get("flip") for item in fewer.left_out] == [True]
    short = roomy._estimate({"units": 1024, **lever, **tta, "finetune_epochs": recipe.MIN_FINETUNE_EPOCHS}, {})
    neither = search_with(short * 0.9, both)
    assert neither.first_finetune() == lever and len(neither.left_out) == 2
    assert search_with((cost["both"] + cost["tta"]) / 2, {"flip": True}).first_finetune() == lever
    assert search_with(3600, {}).first_finetune() == lever
    # The depth the fine-tuning screen chose (run_depth_screen) is the lever the extras go on.
    deeper = search_with(3600, both)
    deeper.finetune_lever = recipe.DEEPER_FINETUNE
    assert deeper.first_finetune() == {**recipe.DEEPER_FINETUNE, **both}


def test_a_configuration_left_out_by_two_rungs_is_listed_once():
    """Fine-tuning with flips left out by the fine-tuning rung is the flip rung's candidate too."""
    searching = recipe.Search({"weights": "none"}, {"VGG16": "none"}, budget.Clock(60), None, say=lambda line: None)
    diff = {"units": 1024, "unfreeze": "top1", "tta": True, "flip": True}
    searching._leave_out("finetune", diff, 1750.0)
    searching._leave_out("flip", dict(reversed(diff.items())), 1750.0)
    searching._leave_out("flip", {**diff, "finetune_epochs": 3}, 900.0)
    assert [item["rung"] for item in searching.left_out] == ["finetune", "flip"]


def test_fine_tuning_takes_each_extra_that_paid_in_its_screen():
    """paying_extras: flips where the screen's run with them, scored without tta, beat the plain
    run; tta where that run scored higher with it; ties keep the cheaper."""
    def tried(val, without_tta=None):
        return recipe.Tried("screen-ft", "screen-ft-1", {}, {}, val_accuracy=val, val_accuracy_without_tta=without_tta)

    assert recipe.paying_extras(tried(0.70), tried(0.74, 0.72)) == {"flip": True, "tta": True}
    assert recipe.paying_extras(tried(0.72), tried(0.74, 0.72)) == {"tta": True}
    assert recipe.paying_extras(tried(0.70), tried(0.71, 0.72)) == {"flip": True}
    assert recipe.paying_extras(tried(0.73), tried(0.72, 0.72)) == {}
    assert recipe.paying_extras(tried(0.70), tried(0.74)) == {}  # nothing to tell flips from tta by


def test_the_budget_clock_starts_with_the_process():
    clock = budget.Clock(60)
    # This test process started before the test did: the clock counts its imports too.
    assert 0 < clock.elapsed() < 24 * 3600 and clock.left() < 60


def test_a_pass_that_would_end_past_the_deadline_gives_up_early(tmp_path):
    """deadlines.check_pass: a feature pass whose rate says it would end past the budget stops at
    once (DeadlineError, naming its projected seconds) and leaves no entry; without a deadline, or
    on time, it runs on."""
    import time

    import keras
    import numpy as np

    from tlkit import deadlines, features

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    extractor = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
    images = {"pool": np.zeros((64, 8, 8, 3), np.uint8)}
    cache = features.FeatureCache(tmp_path)
    with deadlines.deadline(time.time() - 1):  # already past: the first batch stops it
        with pytest.raises(deadlines.DeadlineError, match="would end past the budget: 16 of 64 images"):
            cache.get({"base": "tiny", "boundary": "conv"}, extractor, images, batch_size=16)
    assert list(tmp_path.iterdir()) == []  # no entry, no temporary folder
    with deadlines.deadline(time.time() + 600):
        assert cache.get({"base": "tiny", "boundary": "conv"}, extractor, images, batch_size=16).hit is False
    # The projection: 10 of 100 images in 30 s is 300 s in all.
    started = time.monotonic() - 30
    with deadlines.deadline(time.time() + 100):
        with pytest.raises(deadlines.DeadlineError) as error:
            deadlines.check_pass(started, 10, 100)
    assert error.value.projected_seconds == pytest.approx(300, rel=0.01)
    with deadlines.deadline(time.time() + 400):
        deadlines.check_pass(started, 10, 100)
    deadlines.check_pass(started, 10, 100)  # no deadline: nothing to check


@pytest.mark.parametrize("result", ["recipe-budget.json", "recipe-budget-vgg16.json", "recipe-budget-vgg16-bf16.json",
                                    "recipe-budget-vgg16-float32.json", "recipe-budget-224px.json"])
def test_the_docs_recipe_tables_are_the_benchmark_s_json(result):
    """docs/recipe.md's budget tables and benchmarks/recipe.py's JSON agree, row by row."""
    from conftest import REPO

    found = json.loads((REPO / "benchmarks" / "results" / result).read_text())
    docs = (REPO / "docs" / "recipe.md").read_text()
    section = docs[docs.index(f"benchmarks/results/{result}`"):]
    section = section[: section.index("\n### ")]
    rows = {line.split("|")[1].strip().strip("*").replace(" (chosen)", ""): line
            for line in section.splitlines() if line.startswith("| ") and "---" not in line}
    for configuration in found["configurations"]:
        cells = [cell.strip().strip("*") for cell in rows[configuration["name"]].split("|")]
        assert cells[-3:-1] == [f"{100 * configuration['val_accuracy']:.2f}%",
                                f"{100 * configuration['test_accuracy']:.2f}%"], configuration["name"]
        assert cells[-4] == f"{configuration['seconds']:,.0f}"
    assert f"{100 * found['best_test_accuracy']:.2f}% test" in section
    assert "(chosen)" in rows[found["chosen"]]


def test_the_docs_lever_table_is_the_benchmark_s_json():
    """docs/recipe.md's fine-tuning levers table and benchmarks/finetune_levers.py's JSON agree."""
    from conftest import REPO

    found = json.loads((REPO / "benchmarks" / "results" / "finetune-levers.json").read_text())
    docs = (REPO / "docs" / "recipe.md").read_text()
    section = docs[docs.index("benchmarks/results/finetune-levers.json`"):]
    section = section[: section.index("\n### ")]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    for row in found["rows"]:
        cells = [cell.strip() for cell in rows[row["arm"]].split("|")]
        assert cells[2:5] == [f"{row['seconds']:,.0f}", f"{100 * row['val_accuracy']:.2f}%",
                              f"{100 * row['test_accuracy']:.2f}%"], row["arm"]


def test_the_fine_tuning_screen_s_re_runs_are_bought_only_where_the_full_rung_and_fine_tuning_fit_after(
        image_folder):
    """The plan keeps back from the screen's share only each base's fine-tuning screen and the
    precision re-run; the extras and depth re-runs run only where the leader's full run and its
    fine-tuning on every image still fit after them (Search.leaves_room), else are listed as left out."""
    lines = []
    searching = recipe.Search({"data": str(image_folder), "weights": "none", "epochs": 1, "batch_size": 8,
                               "precision": "float32"}, {"VGG16": "none"}, budget.Clock(900, started=time.time()),
                              None, say=lines.append)
    searching.check()
    inputs = [{"base": "VGG16", "image_size": 32, "preprocess": "base", "weights": "none"}]
    searching.probe(inputs)
    left = searching.clock.left()
    searching.plan(inputs)
    reruns = searching._finetune_screen_estimates(inputs)
    kept_back = sum(seconds for kind, seconds in reruns.items() if kind not in recipe.AFTER_THE_SCREEN)
    assert searching.screen_allowance == pytest.approx(
        recipe.SCREEN_SHARE * (left - budget.WRAP_UP_SECONDS) - kept_back, abs=2)
    assert {"extras", "deeper"} <= set(reruns) and reruns["extras"] > 0 and reruns["deeper"] > 0

    leader = recipe.Tried("screen", "screen-1", {**inputs[0], "limit": 5000, "epochs": 4}, {})
    plain = recipe.Tried("screen-ft", "screen-ft-1", recipe._finetune_screen_diff(recipe._lever_diff(leader)), {})
    needed = sum(searching._total([
        ({**recipe._lever_diff(plain), **recipe.DEEPER_FINETUNE_SCREEN}, searching.screen_fields),
        (recipe._lever_diff(leader), {}),
        ({**recipe._lever_diff(leader), **recipe.DEEPER_FINETUNE, "finetune_epochs": recipe.MIN_FINETUNE_EPOCHS}, {})]))
    for margin, fits in ((30, True), (-30, False)):
        searching.clock = budget.Clock(needed + budget.WRAP_UP_SECONDS + margin, started=time.time())
        assert searching.leaves_room(plain, recipe.DEEPER_FINETUNE_SCREEN, leader, recipe.DEEPER_FINETUNE) is fits
    assert [item["rung"] for item in searching.left_out] == ["screen-ft"]
    assert searching.left_out[0]["diff"]["unfreeze"] == recipe.DEEPER_FINETUNE["unfreeze"]
    assert "is not run" in lines[-2]
