"""Keras's Adam and SGD with each variable's update done by one fused TensorFlow kernel.

Keras 3 writes an optimizer's update in backend-neutral ops: Adam is about nine elementwise ops a
variable, each a pass over the variable with a temporary. TensorFlow's own training kernels
(ResourceApplyAdam, ResourceApplyKerasMomentum, ResourceApplyGradientDescent) do the same
arithmetic, in the same order (alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t);
m += (g - m)(1 - beta_1); v += (g^2 - v)(1 - beta_2); var -= m * alpha / (sqrt(v) + epsilon)),
in one pass. On cached features a head's step is tiny and that difference is a large part of
it (docs/performance.md).

The classes are Keras's own with `update_step` replaced: same constructor, same `get_config` (so
MLflow's autologged `opt_*` parameters read as Keras's), same slot variables. Results agree with
Keras's to float rounding (tests/test_fastpath.py). Anything the fused kernels do not cover
(another backend, sparse gradients, amsgrad, Nesterov, float16/bfloat16 variables) takes Keras's
own update.
"""

from __future__ import annotations

import keras

_FUSED_DTYPES = ("float32", "float64")


def _fusable(gradient, variable) -> bool:
    import tensorflow as tf

    return (keras.backend.backend() == "tensorflow" and not isinstance(gradient, tf.IndexedSlices)
            and keras.backend.standardize_dtype(variable.dtype) in _FUSED_DTYPES)


def _handle(variable):
    """Private (`.value.handle`): the raw ops take resource handles, and a Keras variable exposes its
    tf.Variable only as `.value`; guarded by tests/test_private_apis.py.

    The resource handle of a Keras variable (the optimizer's slots) or a tf.Variable (the model's,
    which Keras's TensorFlow optimizer unwraps before update_step)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


@keras.saving.register_keras_serializable(package="tlkit")
class Adam(keras.optimizers.Adam):
    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        # Private: the slots of `variable`. Keras keeps them in lists by the variable's index and has
        # no public lookup; the kernels must update them in place. Guarded: tests/test_private_apis.py.
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype), beta2=tf.cast(self.beta_2, dtype),
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False)


@keras.saving.register_keras_serializable(package="tlkit")
class SGD(keras.optimizers.SGD):
    def update_step(self, gradient, variable, learning_rate):
        if self.nesterov or not _fusable(gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        dtype = variable.dtype
        learning_rate, gradient = tf.cast(learning_rate, dtype), tf.cast(gradient, dtype)
        if self.momentum == 0:  # Keras: var -= g * lr
            tf.raw_ops.ResourceApplyGradientDescent(var=_handle(variable), alpha=learning_rate, delta=gradient)
        else:  # Keras: m = m * momentum - g * lr; var += m
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=_handle(variable), accum=_handle(self.momentums[self._get_variable_index(variable)]),
                lr=learning_rate, grad=gradient, momentum=tf.cast(self.momentum, dtype), use_nesterov=False)
