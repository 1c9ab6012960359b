"""tlkit's fused Adam and SGD against Keras's own: the same updates, by one TensorFlow kernel."""

from __future__ import annotations

import numpy as np
import pytest

from tlkit import models, optimizers

SHAPES = [(64, 32), (32,), (32, 10), (10,)]


def apply_fifty_steps(optimizer):
    """Variables after 50 updates from fixed gradients, and the op types of one traced update."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=shape).astype("float32")) for shape in SHAPES]
    gradients = [[tf.constant(rng.normal(size=shape).astype("float32")) for shape in SHAPES] for _ in range(50)]
    optimizer.build(variables)

    @tf.function
    def update(grads):
        optimizer.apply_gradients(zip(grads, variables))

    for grads in gradients:
        update(grads)
    op_types = {op.type for op in update.get_concrete_function(gradients[0]).graph.get_operations()}
    return [v.numpy() for v in variables], op_types


@pytest.mark.parametrize("name, kwargs, kernel, exact", [
    ("Adam", {}, "ResourceApplyAdam", False),
    ("SGD", {"momentum": 0.9}, "ResourceApplyKerasMomentum", True),
    ("SGD", {}, "ResourceApplyGradientDescent", True),
])
def test_fused_updates_are_keras_updates(name, kwargs, kernel, exact):
    import keras

    want, keras_ops = apply_fifty_steps(getattr(keras.optimizers, name)(learning_rate=1e-2, **kwargs))
    got, fused_ops = apply_fifty_steps(getattr(optimizers, name)(learning_rate=1e-2, **kwargs))
    assert kernel in fused_ops and kernel not in keras_ops
    for g, w in zip(got, want):
        if exact:  # the kernel's formula is Keras's, operation for operation
            np.testing.assert_array_equal(g, w)
        else:  # Adam's vectorised kernel rounds differently: 50 steps of lr 1e-2 on values ~1
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, kwargs", [("Adam", {"amsgrad": True}), ("SGD", {"momentum": 0.9, "nesterov": True})])
def test_what_the_kernels_do_not_cover_is_keras_own_update(name, kwargs):
    import keras

    want, _ = apply_fifty_steps(getattr(keras.optimizers, name)(learning_rate=1e-2, **kwargs))
    got, fused_ops = apply_fifty_steps(getattr(optimizers, name)(learning_rate=1e-2, **kwargs))
    assert not {op for op in fused_ops if op.startswith("ResourceApply")}
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_the_config_autologging_records_is_keras_own():
    import keras

    for name, momentum in (("adam", 0.0), ("sgd", 0.9)):
        ours = models.optimizer(name, 1e-3, momentum)
        keras_own = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[name](1e-3, **(
            {"momentum": momentum} if name == "sgd" else {}))
        ours_config, keras_config = ours.get_config(), keras_own.get_config()
        # Keras numbers the names of later instances (adam_1): the default name is Keras's own.
        assert ours_config.pop("name").startswith(name) and keras_config.pop("name").startswith(name)
        assert ours_config == keras_config
        assert type(keras.optimizers.deserialize(keras.optimizers.serialize(ours))) is type(ours)
