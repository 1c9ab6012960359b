"""tlkit.spec on its own: defaults, merging, variant files, class lists and every SpecError; no training."""

from __future__ import annotations

import tomllib

import pytest

from tlkit import models, spec as specs
from tlkit.spec import SpecError


def valid(**changes) -> dict:
    """The defaults with `changes`, set directly (not through merge, so wrong types can be tried too)."""
    return {**specs.DEFAULTS, **changes}


# --- defaults and merge -------------------------------------------------------------------------

def test_the_defaults_are_the_seeds_baseline_and_valid():
    assert set(specs.DEFAULTS) == set(specs.FIELDS)
    assert all(isinstance(help_text, str) and help_text for _, help_text in specs.FIELDS.values())
    seed = {"base": "VGG16", "weights": "imagenet", "head": "dense", "units": 256, "optimizer": "adam",
            "learning_rate": 0.001, "epochs": 10, "batch_size": 32, "patience": 3, "restore_best_weights": True,
            "image_size": 32, "seed": 1995, "unfreeze": "", "flip": False, "augment": False}
    assert {k: specs.DEFAULTS[k] for k in seed} == seed
    specs.validate(dict(specs.DEFAULTS))  # raises nothing


def test_merge_overrides_onto_the_defaults_or_a_base_without_changing_either():
    defaults = dict(specs.DEFAULTS)
    merged = specs.merge({"epochs": 3, "head": "conv"})
    assert merged == {**defaults, "epochs": 3, "head": "conv"}
    on_top = specs.merge({"units": 64}, merged)
    assert on_top == {**merged, "units": 64}
    assert merged["units"] == 256 and specs.DEFAULTS == defaults  # neither input was modified
    assert specs.merge({}) == defaults and specs.merge({}) is not specs.DEFAULTS


def test_merge_widens_an_int_to_a_float_field_and_nothing_else():
    merged = specs.merge({"learning_rate": 1, "dropout": 0})
    assert merged["learning_rate"] == 1.0 and type(merged["learning_rate"]) is float
    assert type(merged["dropout"]) is float
    with pytest.raises(SpecError, match=r"^epochs must be int, got 3\.0$"):
        specs.merge({"epochs": 3.0})
    # bool is an int to Python: it must not pass for a number, nor a number for a bool
    with pytest.raises(SpecError, match=r"^learning_rate must be float, got True$"):
        specs.merge({"learning_rate": True})
    with pytest.raises(SpecError, match=r"^epochs must be int, got False$"):
        specs.merge({"epochs": False})
    with pytest.raises(SpecError, match=r"^flip must be bool, got 1$"):
        specs.merge({"flip": 1})
    with pytest.raises(SpecError, match=r"^units must be int, got '256'$"):
        specs.merge({"units": "256"})
    with pytest.raises(SpecError, match=r"^unfreeze must be str, got None$"):
        specs.merge({"unfreeze": None})


def test_merge_rejects_an_unknown_key_by_name():
    with pytest.raises(SpecError, match=r"^unknown spec key 'epoch'$"):
        specs.merge({"epochs": 2, "epoch": 3})
    with pytest.raises(SpecError, match="unknown spec key 'description'"):
        specs.merge({"description": "only a variant file's own key"})


# --- variant files -------------------------------------------------------------------------------

def test_every_variant_file_is_a_diff_of_known_keys_that_loads_and_validates():
    names = specs.variant_names()
    assert names == sorted(p.stem for p in specs.EXPERIMENTS_DIR.glob("*.toml"))
    assert {"baseline", "conv_head", "finetune", "augment", "scratch"} <= set(names)
    for name in names:
        diff, description = specs.read_variant(name)
        assert description, name
        assert set(diff) <= set(specs.DEFAULTS), name
        assert "description" in tomllib.loads((specs.EXPERIMENTS_DIR / f"{name}.toml").read_text())
        loaded = specs.load(name)
        assert loaded == {**specs.DEFAULTS, **{k: float(v) if type(specs.DEFAULTS[k]) is float else v
                                               for k, v in diff.items()}}, name
    assert specs.read_variant("baseline")[0] == {}  # the defaults are the baseline
    assert specs.load("finetune")["unfreeze"] == "block5"
    assert specs.load("scratch")["weights"] == "none" and specs.load("scratch")["trainable_base"] is True


def test_load_puts_overrides_over_the_variant_and_skips_none():
    spec = specs.load("sgd", {"momentum": 0.5, "epochs": None, "data": "/somewhere"})
    assert spec["optimizer"] == "sgd"  # from the variant
    assert spec["momentum"] == 0.5  # the override beats the variant's 0.9
    assert spec["epochs"] == 10  # None: not given, the default stays
    assert spec["data"] == "/somewhere"
    assert specs.load("sgd") == specs.load("sgd", None) == specs.load("sgd", {})


def test_load_validates_the_result():
    with pytest.raises(SpecError, match="trainable_base trains the whole base already"):
        specs.load("scratch", {"unfreeze": "block5"})
    with pytest.raises(SpecError, match="dropout must be in"):
        specs.load("dropout", {"dropout": 1.0})


def test_a_variant_file_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "my own"\nhead = "conv"\nconv_filters = 16\nlearning_rate = 1\n')
    assert specs.variant_path(str(path)) == path
    diff, description = specs.read_variant(str(path))
    assert description == "my own" and diff == {"head": "conv", "conv_filters": 16, "learning_rate": 1}
    spec = specs.load(str(path), {"units": 8})
    assert (spec["head"], spec["conv_filters"], spec["learning_rate"], spec["units"]) == ("conv", 16, 1.0, 8)
    no_description = tmp_path / "bare.toml"
    no_description.write_text("epochs = 4\n")
    assert specs.read_variant(str(no_description)) == ({"epochs": 4}, "")


def test_a_missing_or_unknown_variant_is_named():
    with pytest.raises(SpecError, match=r"^spec file /no/such\.toml does not exist$"):
        specs.variant_path("/no/such.toml")
    with pytest.raises(SpecError) as error:
        specs.load("nope")
    assert str(error.value) == (f"unknown variant 'nope'; choose one of {', '.join(specs.variant_names())} "
                                "or a .toml path")


@pytest.mark.parametrize("text, message", [
    ("epochs = \n", "spec file {path}: "),  # not TOML
    ("[table\n", "spec file {path}: "),
    ("epoch = 3\n", "unknown spec key 'epoch'"),
    ('epochs = "3"\n', "epochs must be int, got '3'"),
    ("flip = 1\n", "flip must be bool, got 1"),
    ("epochs = 0\n", "epochs must be a positive integer, got 0"),  # well-formed, but cannot run
])
def test_a_bad_variant_file_is_one_error_naming_what(text, message, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as error:
        specs.load(str(path))
    assert message.format(path=path) in str(error.value)


# --- class_list ----------------------------------------------------------------------------------

@pytest.mark.parametrize("classes, expected", [
    ("all", ()),
    ("", ()),
    ("  all ", ()),
    ("cat", ("cat",)),
    ("cat,dog", ("cat", "dog")),
    (" truck , cat ,, ", ("truck", "cat")),  # order kept, blanks dropped
])
def test_class_list(classes, expected):
    assert specs.class_list(valid(classes=classes)) == expected


# --- validate: every message ----------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    *[({key: 0}, f"{key} must be a positive integer, got 0")
      for key in ("epochs", "batch_size", "image_size", "units", "conv_filters")],
    ({"batch_size": -8}, "batch_size must be a positive integer, got -8"),
    *[({key: -1}, f"{key} must be 0 or more, got -1") for key in ("limit", "test_limit", "patience")],
    ({"finetune_epochs": -1}, "finetune_epochs must be 0 or more, got -1"),
    ({"learning_rate": 0.0}, "learning_rate must be greater than 0, got 0.0"),
    ({"finetune_learning_rate": -1e-4}, "finetune_learning_rate must be greater than 0, got -0.0001"),
    ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
    ({"dropout": -0.1}, "dropout must be in [0, 1), got -0.1"),
    ({"l2": -0.01}, "l2 must be 0 or more, got -0.01"),
    ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
    ({"momentum": -0.5}, "momentum must be in [0, 1), got -0.5"),
    ({"optimizer": "rmsprop"}, "optimizer must be 'adam' or 'sgd', got 'rmsprop'"),
    ({"preprocess": "imagenet"}, "preprocess must be 'unit' or 'base', got 'imagenet'"),
    ({"head": "mlp"}, f"head must be one of {', '.join(models.HEADS)}, got 'mlp'"),
    ({"base": "VGG19"}, f"unknown base 'VGG19'; choose one of {', '.join(models.BASES)}"),
    ({"image_size": 31}, "image_size 31 is too small for VGG16: it needs at least 32"),
    ({"base": "ResNet50", "image_size": 16}, "image_size 16 is too small for ResNet50: it needs at least 32"),
    ({"weights": "/no/such.weights.h5"},
     "weights file /no/such.weights.h5 does not exist (use 'imagenet', 'none' or a path)"),
    ({"flip": True, "augment": True}, "flip comes from the feature cache, and augment / trainable_base run the "
                                      "whole network (augment flips already): use --no-flip with them"),
    ({"flip": True, "trainable_base": True}, "use --no-flip with them"),
    ({"augment": True, "unfreeze": "block5"}, "augment and unfreeze cannot be combined yet: pick one variant"),
    ({"trainable_base": True, "unfreeze": "block5"},
     "trainable_base trains the whole base already: unfreeze must be ''"),
    ({"base": "EfficientNetB0"}, "EfficientNetB0 scales raw pixels itself (keras.applications builds it in): "
                                 "use preprocess 'base'"),
    ({"base": "MobileNetV3Small", "preprocess": "unit"}, "MobileNetV3Small scales raw pixels itself"),
    ({"data": ""}, "data must name 'cifar10', an image folder or an .npz file"),
], ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_validate_rejects_with_a_message_naming_the_key(changes, message):
    with pytest.raises(SpecError) as error:
        specs.validate(valid(**changes))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("changes", [
    {"limit": 0, "test_limit": 0, "patience": 0, "finetune_epochs": 0, "l2": 0.0, "dropout": 0.0, "momentum": 0.0},
    {"dropout": 0.999, "momentum": 0.99, "epochs": 1, "batch_size": 1, "units": 1, "conv_filters": 1},
    {"image_size": 32, "base": "ResNet50"},
    {"base": "EfficientNetB0", "preprocess": "base"},
    {"weights": "none", "trainable_base": True},
    {"flip": True, "unfreeze": "block5"},  # flips come from the cache below the unfrozen block too
    {"augment": True},
    {"classes": "cat,dog", "data": "cifar10"},
])
def test_validate_accepts_the_edges_of_what_can_run(changes):
    specs.validate(valid(**changes))


def test_a_weights_file_that_exists_is_accepted(tmp_path):
    path = tmp_path / "base.weights.h5"
    path.write_bytes(b"checked when loaded, not here")
    specs.validate(valid(weights=str(path)))
    with pytest.raises(SpecError, match="does not exist"):
        specs.validate(valid(weights=str(tmp_path / "other.weights.h5")))
