"""The GPU switches, checked on a CPU: `precision` (16-bit compute, float32 variables and softmax;
bfloat16 runs on CPUs) and `jit` (XLA)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from tlkit import features, models, spec as specs

from conftest import FAST_ARGS, cli, image_rows, invoke


def test_precision_is_checked_and_the_policy_restored():
    with pytest.raises(specs.SpecError, match="precision must be one of float32, mixed_float16, mixed_bfloat16"):
        specs.load("baseline", {"precision": "float16"})
    import keras

    before = keras.mixed_precision.dtype_policy().name
    spec = specs.load("conv_head", {"weights": "none", "precision": "mixed_bfloat16", "conv_filters": 8, "units": 8})
    with models.precision(spec):
        network = models.build(spec, 3)
        assert keras.mixed_precision.dtype_policy().name == "mixed_bfloat16"
    assert keras.mixed_precision.dtype_policy().name == before  # a suite's next child is not changed
    conv = network.base.get_layer("block1_conv1")
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
    assert network.head.get_layer("head_conv").compute_dtype == "bfloat16"
    predictions = network.head.get_layer("predictions")
    assert predictions.compute_dtype == "float32"  # the softmax stays float32
    out = network.full(np.zeros((2, 32, 32, 3), np.uint8), training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(np.asarray(out).sum(axis=1), 1.0, rtol=1e-6)


def test_the_cache_key_names_16_bit_features_and_keeps_float32_keys():
    spec = specs.load("baseline", {"weights": "none"})
    float32 = features.key_fields(spec, "d" * 64, "block5_pool")
    assert "precision" not in float32  # entries made before the switch keep their keys
    bf16 = features.key_fields(dict(spec, precision="mixed_bfloat16"), "d" * 64, "block5_pool")
    assert bf16["precision"] == "mixed_bfloat16" and features.key_of(bf16) != features.key_of(float32)


@pytest.mark.e2e
def test_fine_tuning_in_bfloat16_with_xla_trains_and_logs_a_float32_model(image_folder, tracking, tmp_path):
    """Both switches through the whole finetune path (cached block4_pool features in bfloat16 stored
    as float32, the head stage, block5 as matrix products, fused Adam, XLA); the logged model answers
    float32 probabilities that agree with the logged test accuracy; the features are the float32
    pass's to bfloat16 rounding."""
    result = cli("train", "finetune", "--data", str(image_folder), *FAST_ARGS, "--finetune-epochs", "1",
                 "--precision", "mixed_bfloat16", "--jit")
    assert result.exit_code == 0, result.output
    run = mlflow.search_runs(filter_string="tags.variant = 'finetune'", output_format="list")[0]
    assert run.data.params["precision"] == "mixed_bfloat16" and run.data.params["jit"] == "True"
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    from tlkit import data

    dataset = data.load(str(image_folder), seed=1995)
    answers = model.predict(image_rows(dataset.x_test))
    probabilities = np.array(answers["probabilities"].tolist())
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    truth = [dataset.class_names[i] for i in dataset.y_test.argmax(axis=1)]
    assert np.mean(answers["label"] == truth) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)

    # The same images' features in float32: bfloat16 keeps 8 bits of mantissa (relative error ~0.4%).
    result = cli("train", "baseline", "--data", str(image_folder), *FAST_ARGS, "--unfreeze", "block5",
                 "--finetune-epochs", "0")
    assert result.exit_code == 0, result.output
    metas = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/meta.json")}
    at = {(m["fields"].get("precision", "float32"), m["fields"]["boundary"]): key for key, m in metas.items()}
    low = np.load(tmp_path / "cache" / at[("mixed_bfloat16", "block4_pool")] / "test.npy")
    full = np.load(tmp_path / "cache" / at[("float32", "block4_pool")] / "test.npy")
    assert low.dtype == np.float32 and low.shape == full.shape
    scale = np.abs(full).max()
    assert np.abs(low - full).max() < 0.05 * scale and np.abs(low - full).max() > 0  # close, not the same


@pytest.mark.e2e
def test_xla_trains_the_numbers_of_plain_compilation(image_folder, tracking):
    """jit changes how the steps run, not what they compute: the same history to float rounding."""
    histories = {}
    for extra in ([], ["--jit"]):
        result = invoke("train", "baseline", "--data", str(image_folder), *FAST_ARGS, "--patience", "0", *extra,
                        "--experiment", "jit" if extra else "plain")
        assert result.exit_code == 0, result.output
        run = mlflow.search_runs(experiment_names=["jit" if extra else "plain"], output_format="list")[0]
        histories[bool(extra)] = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert len(histories[True]) == len(histories[False]) == 2
    np.testing.assert_allclose(histories[True], histories[False], rtol=1e-4)
