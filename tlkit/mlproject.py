"""Writes MLproject from the specs, so its parameters and defaults cannot drift from them.

Every variant entry point takes the common parameters plus the ones its experiments/ file sets
(and `units`, the head's width, everywhere but where a search sets it), and `repeats` (the seeds
to train at, tlkit/repeats.py; 1 = one run); a search variant (tune) takes its search settings
too and runs `tlkit tune`. Run `python -m tlkit.mlproject > MLproject` after
changing a spec; a test checks that the committed file is current.
"""

from __future__ import annotations

from tlkit import spec as specs
from tlkit.spec import PRETRAIN


COMMON = ["data", "classes", "base", "weights", "image_size", "preprocess", "epochs", "batch_size",
          "learning_rate", "patience", "limit", "test_limit", "seed", "units", "precision", "strategy"]


def _parameter(name: str, value) -> str:
    if isinstance(value, str):
        return f"      {name}: {{type: string, default: \"{value}\"}}"
    return f"      {name}: {{type: float, default: {value}}}"


def variant_parameters(variant: str) -> dict:
    """The entry point's parameters: the common ones and the variant's own (less the fields a
    search variant searches), then a search variant's settings."""
    diff, _ = specs.read_variant(variant)
    spec = specs.merge(diff)
    search = specs.variant_search(variant)
    searched = (search or {}).get("space", {})
    names = COMMON + [k for k in diff if k not in COMMON and not isinstance(spec[k], bool)
                      and k not in ("head", "optimizer")]
    params = {name: spec[name] for name in names if name not in searched}
    if search is not None:
        params.update({name: search[name] for name in ("max_trials", "executions_per_trial", "tuner") if name in search})
        params["workers"] = 0
    params["repeats"] = 1
    return params


def command(variant: str, params: dict) -> str:
    """`tlkit train VARIANT` (`tlkit tune VARIANT` for a search) with every parameter substituted."""
    tool = "tune" if specs.variant_search(variant) is not None else "train"
    options = " ".join(f"{specs.flag(name)} {{{name}}}" for name in params)
    return f"python -m tlkit.cli {tool} {variant} {options}"


# Entry points that are not a single variant: name -> (description, {parameter: default}, command).
# The command's {placeholders} are MLflow's parameter substitution.
TOOL_ENTRY_POINTS: dict[str, tuple[str, dict, str]] = {}


def _pretrain_entry_point() -> tuple[str, dict, str]:
    spec = specs.merge(PRETRAIN)
    params = {name: spec[name] for name in COMMON}
    params["output"] = ""  # '' = ./pretrained/<base>-<sha256[:12]>.weights.h5 in the project folder
    options = " ".join(f"{specs.flag(name)} {{{name}}}" for name in params)
    return "the seed's step 1: pre-train a base on a source data set, write its weights", params, \
        f"python -m tlkit.cli pretrain {options}"


TOOL_ENTRY_POINTS["pretrain"] = _pretrain_entry_point()


def _recipe_entry_point() -> tuple[str, dict, str]:
    params = {name: specs.DEFAULTS[name] for name in COMMON if name not in ("image_size", "preprocess", "units")}
    params["budget"] = "30m"  # recipe.DEFAULT_BUDGET (tests/test_recipe.py checks they agree)
    params["precision"] = "auto"  # the search screens mixed_bfloat16 where its probe finds it faster; a name fixes it
    params["output"] = "chosen.toml"
    options = " ".join(f"{specs.flag(name)} {{{name}}}" for name in params)
    return ("search bases (base: VGG16,Xception; weights: VGG16=PATH,Xception=PATH), image sizes, preprocessing, "
            "heads, flips and fine-tuning within a time budget (30m, 2h), one nested run per configuration",
            params, f"python -m tlkit.cli recipe {options}")


TOOL_ENTRY_POINTS["recipe"] = _recipe_entry_point()


def _suite_entry_point() -> tuple[str, dict, str]:
    params = {"variants": "all", **{name: specs.DEFAULTS[name] for name in COMMON}, "repeats": 1, "model_name": "",
              "min_gain": 0.0, "significance": 0.05}  # the promotion gate (registry.promote)
    options = " ".join(f"{specs.flag(name)} {{{name}}}" for name in params)
    return ("the main job: every variant (or a comma-separated subset) as a child run, compared, "
            "the best promoted to @champion", params, f"python -m tlkit.cli suite {options}")


TOOL_ENTRY_POINTS["suite"] = _suite_entry_point()


def _features_entry_point() -> tuple[str, dict, str]:
    # The fields that decide the features (the cache's key), not training's: a parameter is passed only where it acts.
    fields = [name for name in COMMON if name not in ("epochs", "batch_size", "learning_rate", "patience", "units")]
    params = {"variant": "baseline", **{name: specs.DEFAULTS[name] for name in fields},
              "address": "local", "workers": 2, "gpus_per_worker": 0.0}
    options = " ".join(f"{specs.flag(name)} {{{name}}}" for name in params if name != "variant")
    return ("the base's pass on Ray (here, or a cluster's address): a variant's feature-cache entries, which its "
            "runs then find", params, f"python -m tlkit.cli features {{variant}} --engine ray {options}")


TOOL_ENTRY_POINTS["features"] = _features_entry_point()


def render() -> str:
    lines = ["# Generated by `python -m tlkit.mlproject > MLproject` from experiments/*.toml: edit those.",
             "name: tlkit", "", "conda_env: conda.yaml", "", "entry_points:"]
    for variant in specs.variant_names():
        _, description = specs.read_variant(variant)
        params = variant_parameters(variant)
        lines += [f"  # {description}", f"  {variant}:", "    parameters:"]
        lines += [_parameter(name, value) for name, value in params.items()]
        lines += [f"    command: \"{command(variant, params)}\"", ""]
    for name, (description, params, tool_command) in TOOL_ENTRY_POINTS.items():
        lines += [f"  # {description}", f"  {name}:", "    parameters:"]
        lines += [_parameter(key, value) for key, value in params.items()]
        lines += [f"    command: \"{tool_command}\"", ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
