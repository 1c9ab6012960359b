"""Fine-tuning depths on every supported base: 'top1', 'top2' unfreeze the base's own top blocks,
the cut sits below them (residual branches included), and BatchNorm stays in inference mode."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tlkit import models
from tlkit import spec as specs

SMALL = {"VGG16": 32, "ResNet50": 32, "MobileNetV2": 32, "EfficientNetB0": 32, "MobileNetV3Small": 32, "Xception": 71}
TOP_BLOCKS = {  # what the top one and two blocks are, by the names keras.applications gives them
    "VGG16": ["block5", "block4"], "ResNet50": ["conv5", "conv4"], "MobileNetV2": ["block_16", "block_15"],
    "EfficientNetB0": ["block7", "block6"], "MobileNetV3Small": ["expanded_conv_10", "expanded_conv_9"],
    "Xception": ["block14", "block13"],
}


def test_every_base_is_tested():
    assert set(SMALL) == set(models.BASES) == set(TOP_BLOCKS)


@pytest.mark.parametrize("base", sorted(SMALL))
def test_top_k_unfreezes_the_bases_own_top_blocks_with_batchnorm_in_inference_mode(base):
    import keras

    spec = specs.merge({"base": base, "weights": "none", "image_size": SMALL[base],
                        "preprocess": "base", "units": 8})
    base_model = models.load_base(base, "none", SMALL[base], seed=0)
    pattern = re.compile(models.BASES[base].block_pattern)
    ids = models.block_ids(base_model, base)
    assert ids[-2:] == TOP_BLOCKS[base][::-1]
    for depth in (1, 2):
        network = models.build(dict(spec, unfreeze=f"top{depth}"), 3, base_model)
        models.set_unfrozen(network, True)
        blocks_above = {pattern.match(layer.name).group(1) for layer in network.upper.layers
                        if pattern.match(layer.name)}
        assert blocks_above == set(TOP_BLOCKS[base][:depth])  # these blocks, none below
        assert models.unfrozen_block(base_model, base, f"top{depth}") == TOP_BLOCKS[base][depth - 1]
        batchnorms = [layer for layer in network.upper.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert all(not layer.trainable for layer in batchnorms)
        trained = {w.path for w in network.trainable.trainable_weights}
        assert any(TOP_BLOCKS[base][depth - 1] in path for path in trained)
        if depth == 2 or not batchnorms:
            continue
        # One training step on random features: the block's kernels move, BatchNorm's statistics do not.
        moving = [np.array(layer.moving_mean) for layer in batchnorms]
        kernels = [np.array(w) for w in network.upper.trainable_weights]
        network.trainable.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
        x = np.random.default_rng(0).standard_normal((4, *network.trainable.input.shape[1:])).astype("float32")
        network.trainable.train_on_batch(x, np.eye(3)[[0, 1, 2, 0]])
        assert all(np.array_equal(m, np.array(layer.moving_mean)) for m, layer in zip(moving, batchnorms))
        assert any(not np.array_equal(k, np.array(w)) for k, w in zip(kernels, network.upper.trainable_weights))


def test_a_depth_beyond_the_base_and_a_prefix_that_names_nothing_fail_in_one_line():
    base_model = models.load_base("VGG16", "none", 32, seed=0)
    with pytest.raises(models.ModelError, match="VGG16 has 5 blocks"):
        models.boundary_layer(base_model, "top6", "VGG16")
    with pytest.raises(models.ModelError, match="names no block"):
        models.boundary_layer(base_model, "block9", "VGG16")
    assert models.boundary_layer(base_model, "block5", "VGG16") == "block4_pool"  # a prefix, as before
    assert models.boundary_layer(base_model, "top1", "VGG16") == "block4_pool"


def test_an_automatically_named_boundary_has_a_stable_cache_name():
    first = models.load_base("Xception", "none", 71, seed=0)
    second = models.load_base("Xception", "none", 71, seed=0)  # Keras numbers its automatic names on
    cuts = [models.boundary_layer(m, "top2", "Xception") for m in (first, second)]
    assert cuts[0] != cuts[1]  # add_N: another N in the second build
    keys = [models.layer_key(m, cut) for m, cut in zip((first, second), cuts)]
    assert keys[0] == keys[1] and keys[0].startswith("layer")
    assert models.layer_named(second, keys[0]) == cuts[1]
    assert models.layer_key(first, "block14_sepconv2_act") == "block14_sepconv2_act"


def test_a_layer_prefix_inside_a_block_still_cuts_there():
    base_model = models.load_base("VGG16", "none", 32, seed=0)
    assert models.boundary_layer(base_model, "block5_conv3", "VGG16") == "block5_conv2"
    xception = models.load_base("Xception", "none", 71, seed=0)
    # block2 is matched as a block, below block12 (whose names start with block1 too).
    names = [layer.name for layer in xception.layers]
    below_2, below_12 = (names.index(models.boundary_layer(xception, b, "Xception")) for b in ("block2", "block12"))
    assert below_2 < names.index("block2_sepconv1") < below_12
