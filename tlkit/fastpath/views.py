"""Training views: the same layers and weights, some convolutions computed a faster way for training.

What is trained, evaluated, saved and logged is always the plain Keras network; a view is a model of
its own over the same layers that the door (tlkit/fastpath) compiles and trains. Two rewrites,
each exact up to float rounding:

- a 'same' 3x3 conv on a 1x1 map trains as its centre tap (CentreTap): every other tap sees only
  padding zeros, gets zero gradient and never moves;
- a 'same' conv on a map of at most SMALL_MAP_POSITIONS positions (VGG16's block5 at 2x2 for 32 px
  images, 3x3 for 48 px) trains as one matrix product over its patches (Im2colConv2D), reading
  and updating the conv's own kernel and bias. TensorFlow's CPU convolution and its two gradient
  kernels are slow at such sizes; one GEMM of (batch x positions, taps x channels) by
  (taps x channels, filters) runs near the cores' peak (benchmarks/small_map_conv.py, docs/performance.md).
"""

from __future__ import annotations

# A conv's map of at most this many positions trains as one matrix product: up to 3x3, where
# benchmarks/small_map_conv.py measured the product faster than TensorFlow's conv (4x4: no gain).
SMALL_MAP_POSITIONS = 9


def _is_plain_same_conv(layer) -> bool:
    """A Conv2D that computes exactly cross-correlation with zero 'same' padding, stride 1."""
    from keras import layers

    return (type(layer) is layers.Conv2D and layer.padding == "same"  # a subclass may compute otherwise
            and layer.data_format == "channels_last"
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1) and layer.groups == 1
            and all(k % 2 == 1 for k in layer.kernel_size)
            # A penalty or constraint acts on the conv's variables through the conv's own call path.
            and layer.kernel_regularizer is None and layer.bias_regularizer is None
            and layer.kernel_constraint is None and layer.bias_constraint is None)


def _map_shape(layer) -> tuple:
    try:
        return tuple(layer.input.shape[1:3])
    except (AttributeError, ValueError):  # a layer called more than once, or never: leave it alone
        return (None, None)


def trains_as_centre_tap(layer) -> bool:
    """A 'same' conv on a 1x1 map, whose other taps nothing moves."""
    return _is_plain_same_conv(layer) and _map_shape(layer) == (1, 1)


def trains_as_im2col(layer) -> bool:
    """A 'same' conv with a kernel wider than 1 on a map small enough for one matrix product to win."""
    if not _is_plain_same_conv(layer) or max(layer.kernel_size) == 1:
        return False
    rows, cols = _map_shape(layer)
    return rows is not None and cols is not None and 1 < rows * cols <= SMALL_MAP_POSITIONS


def centre_tap(conv):
    """A layer that trains `conv`'s centre tap as a matrix product; write_back() puts it into `conv`."""
    import keras
    from keras import ops

    class CentreTap(keras.layers.Layer):
        def __init__(self):
            # The conv's dtype policy: under mixed precision the view computes in 16 bits as the conv did.
            super().__init__(name=f"{conv.name}_centre_tap", trainable=conv.trainable, dtype=conv.dtype_policy)
            # `conv` is reached through the closure, not an attribute: Keras would track it,
            # and its 2.4M-parameter kernel would be back among the trained weights.
            rows, cols = conv.kernel_size
            self.centre = (rows // 2, cols // 2)
            # Variables of its own, started from the conv's: only these the optimizer updates.
            self.kernel = self.add_weight(shape=(conv.kernel.shape[2], conv.filters), name="kernel",
                                          initializer=keras.initializers.Constant(
                                              ops.convert_to_numpy(conv.kernel[self.centre])))
            self.bias = self.add_weight(shape=(conv.filters,), name="bias", initializer=keras.initializers.Constant(
                ops.convert_to_numpy(conv.bias))) if conv.use_bias else None

        def call(self, x):
            y = ops.einsum("bhwc,cf->bhwf", x, self.kernel)
            return conv.activation(y + self.bias if self.bias is not None else y)

        def compute_output_shape(self, shape):
            return (*shape[:3], conv.filters)

        def write_back(self) -> None:
            kernel = ops.convert_to_numpy(conv.kernel).copy()
            kernel[self.centre] = ops.convert_to_numpy(self.kernel)
            conv.kernel.assign(kernel)
            if self.bias is not None:
                conv.bias.assign(ops.convert_to_numpy(self.bias))

    return CentreTap()


def im2col_conv(conv):
    """A layer that computes `conv` as one matrix product over its zero-padded patches, on the
    conv's own kernel and bias (so training it trains the conv: nothing to write back)."""
    import keras
    from keras import ops

    class Im2colConv2D(keras.layers.Layer):
        def __init__(self):
            super().__init__(name=f"{conv.name}_im2col", trainable=conv.trainable, dtype=conv.dtype_policy)
            self.conv = conv  # tracked: the conv's kernel and bias are this layer's weights

        def call(self, x):
            rows, cols = conv.kernel_size
            height, width = x.shape[1], x.shape[2]
            padded = ops.pad(x, [[0, 0], [rows // 2, rows // 2], [cols // 2, cols // 2], [0, 0]])
            # Patches laid out tap by tap (row, column), then channel: the order of the kernel's
            # (rows, cols, channels, filters) reshaped to (rows * cols * channels, filters).
            patches = ops.concatenate([padded[:, a:a + height, b:b + width, :]
                                       for a in range(rows) for b in range(cols)], axis=-1)
            # A 2-D product: a 4-D by 2-D matmul becomes TensorFlow's batched matmul, several times slower.
            flat = ops.reshape(patches, (-1, patches.shape[-1]))
            y = ops.matmul(flat, ops.reshape(self.conv.kernel, (-1, conv.filters)))
            if conv.use_bias:
                y = y + self.conv.bias
            return conv.activation(ops.reshape(y, (-1, height, width, conv.filters)))

        def compute_output_shape(self, shape):
            return (*shape[:3], conv.filters)

    return Im2colConv2D()


def training_view(model, rewrite: bool = True):
    """`model` for training: a model of its own over the same layers (so the same weights), with
    each conv that has a faster exact form (see the module docstring) replaced by it, in nested
    models too; with rewrite=False, the same layers unchanged.

    A model of its own even where nothing is replaced: it is compiled for training, and `model`
    (inside the logged network, as its trainable part) keeps no training compile, which Keras
    would save into model.keras with the optimizer (tlkit's own, which plain Keras cannot load).
    After training, write_back(view) puts trained centre taps into their convs.
    """
    import keras

    def view_of(layer):
        if rewrite and trains_as_centre_tap(layer):
            return centre_tap(layer)
        if rewrite and trains_as_im2col(layer):
            return im2col_conv(layer)
        return layer

    return keras.models.clone_model(model, clone_function=view_of, recursive=True)


def write_back(view) -> None:
    """Copy what views of their own trained into the layers they stand for (centre taps)."""
    for layer in view.layers:
        if hasattr(layer, "write_back"):
            layer.write_back()
        elif hasattr(layer, "layers"):  # a nested model, viewed too
            write_back(layer)
