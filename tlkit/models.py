"""The network: a keras.applications base, a head from a small table, freezing and unfreezing.

The network is built in three parts so that training can skip the frozen part:

    raw pixels (0-255) -> preprocessing -> [augmentation] -> lower base  ==  `extractor`
    features at the boundary -> upper base (unfrozen block, maybe none) -> head  ==  `trainable`
    raw pixels -> extractor -> trainable  ==  `full`, the end-to-end model that is logged

`full` shares its layers (and so its weights) with the two parts: training `trainable` on cached
features trains `full`. The scaling that training used lives inside the model, so the logged model
takes raw pixels and a user never has to reproduce it.

Every import of a library is inside the functions: `tlkit --help` loads this module (spec.validate
reads BASES and HEADS), and numpy alone took 66 ms of its 76 ms (`python -X importtime -c "import
tlkit.cli"`, AMD EPYC Zen 4, 2 cores), half of what the whole help took.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class BaseInfo:
    module: str  # keras.applications submodule: its constructor and preprocess_input
    constructor: str
    last_block: str  # layer-name prefix of the block that fine-tuning unfreezes by default
    # A layer's block id is group 1 of this pattern on its name (VGG16's block5_conv1 -> block5):
    # the blocks, in order, are what `unfreeze = "topK"` counts from the top.
    block_pattern: str = r"^(block\d+)_"
    min_image_size: int = 32  # keras.applications refuses smaller inputs
    trained_size: int = 224  # the input size its ImageNet weights were trained at
    # keras.applications builds the pixel scaling into these bases (they take 0-255): preprocess
    # 'unit' would hand them [0, 1] images, nearly constant after their own scaling.
    scales_pixels_itself: bool = False


BASES = {
    "VGG16": BaseInfo("vgg16", "VGG16", "block5"),  # block1 ... block5
    "ResNet50": BaseInfo("resnet50", "ResNet50", "conv5", r"^(conv\d+)_"),  # stages conv2 ... conv5
    "MobileNetV2": BaseInfo("mobilenet_v2", "MobileNetV2", "block_16", r"^(block_\d+)_"),
    # block7a; block6 is 6a ... 6d: a block here is a stage of sub-blocks.
    "EfficientNetB0": BaseInfo("efficientnet", "EfficientNetB0", "block7", r"^(block\d+)[a-z]_",
                               scales_pixels_itself=True),
    # 0.9M parameters, 846 training images/s at 32x32 on 2 CPU cores (VGG16: 70): small enough to
    # pre-train here (benchmarks/transfer.py). Its last block is expanded_conv_10 (then conv_1).
    "MobileNetV3Small": BaseInfo("mobilenet_v3", "MobileNetV3Small", "expanded_conv_10",
                                 r"^(expanded_conv(?:_\d+)?)_", scales_pixels_itself=True),
    # Entry flow block1-4, middle flow block5-12, exit flow block13-14; the residual branches'
    # layers have Keras's automatic names (conv2d_3, add_10), so cuts are found by shape, not name.
    "Xception": BaseInfo("xception", "Xception", "block14", min_image_size=71, trained_size=299),
}

# unfreeze = "top1", "top2", ...: the top one, two, ... blocks of whichever base (block_ids).
DEPTH = re.compile(r"^top([1-9][0-9]*)$")


class ModelError(ValueError):
    """A base, weights file or unfreeze choice that does not fit: one line naming it."""


def _dense_head(x, spec, num_classes):
    from keras import layers, regularizers

    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    regularizer = regularizers.l2(spec["l2"]) if spec["l2"] > 0 else None
    x = layers.Dense(spec["units"], activation="relu", kernel_regularizer=regularizer, name="head_dense")(x)
    if spec["dropout"] > 0:
        x = layers.Dropout(spec["dropout"], name="head_dropout")(x)
    # float32 under any precision policy: a softmax in 16 bits rounds small probabilities to 0 (and
    # the loss of a confident mistake to inf). Under float32 this is the default anyway.
    return layers.Dense(num_classes, activation="softmax", name="predictions", dtype="float32")(x)


def _conv_head(x, spec, num_classes):
    from keras import layers

    # The seed's "additional feature extraction": one more trainable conv block on the frozen maps.
    x = layers.Conv2D(spec["conv_filters"], 3, padding="same", name="head_conv")(x)
    x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.ReLU(name="head_relu")(x)
    return _dense_head(x, spec, num_classes)


# Head kinds: a variant picks one by name and sets its knobs (units, l2, dropout, conv_filters).
HEADS = {"dense": _dense_head, "conv": _conv_head}


def head_model(spec: dict, feature_shape: tuple, num_classes: int):
    """The spec's head as a model of its own: features (the frozen base's output) -> class
    probabilities. Every head is built here: a variant's network (build) and a search's trial."""
    import keras

    features = keras.Input(shape=tuple(feature_shape), name="features")
    return keras.Model(features, HEADS[spec["head"]](features, spec, num_classes), name="head")


@contextlib.contextmanager
def precision(spec: dict):
    """Layers built inside compute in the spec's precision (Keras's global dtype policy: float32,
    mixed_float16 or mixed_bfloat16); the policy before is restored after, so a suite's next child
    or a caller is not changed. Layers keep the policy they were built with."""
    import keras

    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(spec.get("precision", "float32"))
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(before)


def load_base(name: str, weights: str, image_size: int, seed: int | None = None):
    """The base without its top, from keras.applications; weights 'imagenet', 'none' or a file."""
    import keras

    info = BASES[name]
    # Every constructor is at the top of keras.applications (MobileNetV3Small is not in its submodule).
    constructor = getattr(keras.applications, info.constructor)
    keras_weights = None if weights == "none" else weights
    if weights == "none" and seed is not None:
        # Random weights are a function of the seed, so the feature cache's key (which holds the
        # seed) names them, however much randomness was drawn before this call.
        keras.utils.set_random_seed(seed)
    try:
        # A file path goes to Keras' model.load_weights, which reads arrays only (h5py for .weights.h5
        # and legacy .h5, the weights member of a .keras zip): no config is deserialised, nothing unpickled.
        return constructor(include_top=False, weights=keras_weights, input_shape=(image_size, image_size, 3))
    except (ValueError, OSError) as err:
        if weights in ("imagenet", "none"):
            raise
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # Keras' mismatch message opens "A total of 13 objects could not be loaded. Example ...:" and
        # says what did not fit on the next line.
        first_line = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
        raise ModelError(f"weights file {weights} does not fit {name} at {image_size}x{image_size}: {first_line}") from None


def preprocessing_layer(base: str, preprocess: str):
    """Raw pixels -> what the base is trained on, as one serialisable layer.

    'unit' is the seed's x / 255. 'base' is the base's own keras.applications preprocess_input,
    which for every supported base is an affine map per pixel (scale, channel swap, mean
    subtraction): it is read off by applying preprocess_input to the unit vectors, and becomes a
    frozen 3x3 Dense on the channel axis (or a Rescaling where it is a plain scale).
    """
    import keras
    import numpy as np
    from keras import layers

    if preprocess == "unit":
        return layers.Rescaling(1.0 / 255, name="rescale")
    module = getattr(keras.applications, BASES[base].module)
    basis = np.vstack([np.zeros(3), np.eye(3)]).astype("float32").reshape(4, 1, 1, 3)
    mapped = np.asarray(module.preprocess_input(basis.copy()), dtype="float32").reshape(4, 3)
    offset, matrix = mapped[0], mapped[1:] - mapped[0]
    scale = matrix[0, 0]
    if np.allclose(matrix, scale * np.eye(3)) and np.allclose(offset, offset[0]):
        return layers.Rescaling(float(scale), offset=float(offset[0]), name="rescale")
    affine = layers.Dense(3, name="preprocess_affine", trainable=False)
    affine.build((None, None, None, 3))
    affine.set_weights([matrix, offset])
    return affine


def augmentation_layers():
    from keras import layers

    # Active in training only: Keras' random preprocessing layers are the identity at inference.
    return [layers.RandomFlip("horizontal", name="augment_flip"),
            layers.RandomTranslation(0.1, 0.1, name="augment_translate")]


def block_ids(base_model, base: str) -> list[str]:
    """The base's blocks, bottom to top, by the ids its layer names carry (BaseInfo.block_pattern)."""
    pattern, ids = re.compile(BASES[base].block_pattern), []
    for layer in base_model.layers:
        found = pattern.match(layer.name)
        if found and found.group(1) not in ids:
            ids.append(found.group(1))
    return ids


def unfrozen_block(base_model, base: str, unfreeze: str) -> str:
    """What `unfreeze` names as a layer-name prefix: 'topK' is the K-th block from the top."""
    depth = DEPTH.match(unfreeze)
    if not depth:
        return unfreeze
    ids = block_ids(base_model, base)
    if int(depth.group(1)) > len(ids):
        raise ModelError(f"unfreeze {unfreeze!r}: {base} has {len(ids)} blocks ({ids[0]} ... {ids[-1]})")
    return ids[-int(depth.group(1))]


def _can_cut_at(base_model, index: int) -> bool:
    """Whether everything above layer `index` depends on the base's input only through its output."""
    import keras

    try:
        keras.Model(base_model.layers[index].output, base_model.output)
        return True
    except ValueError:  # "Graph disconnected": a layer above reads a tensor from below the cut
        return False


def boundary_layer(base_model, unfreeze: str, base: str | None = None) -> str:
    """The last frozen layer: the base's output, or the layer just below the unfrozen block
    (`unfreeze`: a layer-name prefix, or 'topK' with `base`, the base's name).

    Just below means the highest layer whose output alone feeds everything above it: in a base
    with residual branches (ResNet50's stages, Xception's blocks) the branch's first layer may be
    listed before the block's own, and the cut goes below both."""
    if not unfreeze:
        return base_model.layers[-1].name
    if DEPTH.match(unfreeze) and base is None:
        raise ModelError(f"unfreeze {unfreeze!r} counts blocks: the base's name is needed")
    prefix = unfrozen_block(base_model, base, unfreeze) if base else unfreeze
    names = [layer.name for layer in base_model.layers]
    # A block id is matched whole (block1 is not block13's start); anything else as a name prefix
    # (block5_conv3: that layer and those after it).
    pattern = re.compile(BASES[base].block_pattern) if base and prefix in block_ids(base_model, base) else None

    def in_block(name: str) -> bool:
        if pattern is None:
            return name.startswith(prefix)
        found = pattern.match(name)
        return bool(found) and found.group(1) == prefix

    first = next((i for i, name in enumerate(names) if in_block(name)), None)
    if first is None or first == 0:
        known = block_ids(base_model, base) if base else sorted({n.split("_")[0] for n in names if "_" in n})
        raise ModelError(f"unfreeze {unfreeze!r} names no block of {base_model.name}; its blocks: "
                         f"{', '.join(known)} (or top1, top2, ...)")
    cut = next((i for i in range(first - 1, 0, -1) if _can_cut_at(base_model, i)), None)
    if cut is None:
        raise ModelError(f"{base_model.name} cannot be cut below {unfreeze!r}")
    return names[cut]


def layer_key(base_model, name: str) -> str:
    """A boundary's name for the feature cache's key: the layer's own name, or its position where
    Keras named it automatically (Xception's add_10 is add_22 in a process that built one before)."""
    if re.search(r"_\d+$", name) and not any(re.match(info.block_pattern, name) for info in BASES.values()):
        index = [layer.name for layer in base_model.layers].index(name)
        return f"layer{index}:{name.rsplit('_', 1)[0]}"
    return name


def layer_named(base_model, key: str) -> str:
    """The layer a boundary's cache-key name (layer_key) stands for in this build of the base."""
    found = re.match(r"^layer(\d+):", key)
    return base_model.layers[int(found.group(1))].name if found else key


@dataclass
class Network:
    full: object  # keras.Model: raw pixels -> class probabilities, what is logged
    extractor: object  # keras.Model: raw pixels -> features at the boundary, always frozen
    trainable: object  # keras.Model: features at the boundary -> class probabilities (the upper block, the head)
    upper: object | None  # keras.Model: the base's block above the boundary, or None
    boundary: str  # name of the base layer whose output the extractor returns
    base: object = None  # the keras.applications model (include_top=False): what pre-training saves
    # keras.Model: the base's output -> class probabilities (head_model). It is `trainable` itself when
    # nothing of the base trains above the boundary; fine-tuning's first stage trains it alone.
    head: object = None


def build(spec: dict, num_classes: int, base_model=None) -> Network:
    """The network of a spec; base_model, if given, is load_base's result for the same spec."""
    import keras

    size = spec["image_size"]
    base_model = base_model or load_base(spec["base"], spec["weights"], size, spec["seed"])
    boundary = boundary_layer(base_model, spec["unfreeze"], spec["base"])
    cut = base_model.get_layer(boundary).output
    lower = keras.Model(base_model.input, cut, name=f"{base_model.name}_frozen")
    # trainable_base: the whole base trains from the first epoch (from scratch, or pre-training).
    lower.trainable = spec["trainable_base"]
    if spec["trainable_base"]:
        from keras import layers

        # keras.applications' BatchNorm momentum (0.999 in MobileNetV2/V3) moves the moving statistics
        # 0.1% a step: after a 352-step epoch they were still 70% their initial 0 and 1, and evaluation,
        # which uses them, scored chance (MobileNetV3Small: 19% validation against 48% training accuracy).
        # 0.9 (PyTorch's default) follows the batches within tens of steps.
        for layer in base_model.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = min(layer.momentum, 0.9)
    upper = None
    if boundary != base_model.layers[-1].name:
        try:
            upper = keras.Model(cut, base_model.output, name=f"{base_model.name}_{spec['unfreeze']}")
        except ValueError:
            raise ModelError(f"{spec['base']} cannot be cut below {spec['unfreeze']!r}: "
                             "the block depends on layers under the cut") from None
        upper.trainable = False  # the head trains first; fine-tuning unfreezes it

    head = head_model(spec, (upper.output if upper is not None else cut).shape[1:], num_classes)
    if upper is None:
        trainable = head
    else:
        features = keras.Input(shape=tuple(cut.shape[1:]), name="features")
        # training=False keeps BatchNorm layers of the base in inference mode, also once unfrozen.
        trainable = keras.Model(features, head(upper(features, training=False)), name="trainable")

    pixels = keras.Input(shape=(size, size, 3), name="pixels")
    x = preprocessing_layer(spec["base"], spec["preprocess"])(pixels)
    extractor = keras.Model(pixels, lower(x, training=False), name="extractor")
    if spec.get("jit"):
        extractor.jit_compile = True  # the feature pass (its predict) under XLA
    if spec["augment"]:
        for layer in augmentation_layers():
            x = layer(x)
    # A base that trains from the start needs BatchNorm's batch statistics in training (its moving
    # averages start at 0 and 1); training=None lets fit() and predict() choose the mode.
    base_mode = None if spec["trainable_base"] else False
    one_view = keras.Model(pixels, trainable(lower(x, training=base_mode)), name="one_view" if spec.get("tta") else "full")
    full = with_test_time_flips(one_view, size) if spec.get("tta") else one_view
    return Network(full=full, extractor=extractor, trainable=trainable, upper=upper, boundary=boundary,
                   base=base_model, head=head)


def with_test_time_flips(one_view, size: int):
    """The spec's `tta`: raw pixels -> the mean of one_view's probabilities for the image and for its
    mirror image. In the logged graph itself, so the served, predicted and exported model answers
    what the run's metrics (from the cached mirrored features: evaluate.score) say."""
    import keras

    pixels = keras.Input(shape=(size, size, 3), name="pixels")
    mirrored = mirror_layers(size)(pixels)
    return keras.Model(pixels, keras.layers.Average(name="tta_mean")([one_view(pixels), one_view(mirrored)]),
                       name="full")


def mirror_layers(size: int):
    """Images (n, size, size, 3) mirrored left to right, in built-in layers only (saved, loaded in
    safe mode and exported like any other): the width axis moved last, multiplied by a frozen
    anti-diagonal 0/1 matrix (exact: each output is one input times 1 plus zeros), moved back."""
    import keras
    import numpy as np
    from keras import layers

    flip = layers.Dense(size, use_bias=False, trainable=False, name="mirror_width")
    flip.build((None, size, 3, size))
    flip.set_weights([np.eye(size, dtype="float32")[::-1]])
    return keras.Sequential([layers.Permute((1, 3, 2)), flip, layers.Permute((1, 3, 2))], name="mirror")


def extractor_to(network: Network, spec: dict, layer: str):
    """Raw pixels -> the output of the base's `layer`, frozen: the extractor a boundary there has."""
    import keras

    pixels = keras.Input(shape=network.extractor.input.shape[1:], name="pixels")
    x = preprocessing_layer(spec["base"], spec["preprocess"])(pixels)
    lower = keras.Model(network.base.input, network.base.get_layer(layer).output, name=f"{network.base.name}_to_{layer}")
    lower.trainable = False
    return keras.Model(pixels, lower(x, training=False), name="extractor")


def set_unfrozen(network: Network, unfrozen: bool) -> None:
    """Unfreeze (or freeze) the block above the boundary; BatchNorm layers stay frozen."""
    from keras import layers

    if network.upper is None:
        return
    network.upper.trainable = unfrozen
    for layer in network.upper.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, frozen) parameter counts: printed after every freeze or unfreeze."""
    import numpy as np

    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    frozen = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return trainable, frozen


def compile_for_evaluation(model) -> None:
    """The seed's loss and metric, for a model that is evaluated, not trained (the logged network:
    a user's keras.saving.load_model(...).evaluate(x, y) gives the seed's numbers).

    Keras needs an optimizer in a compile; this one is plain SGD, which keeps no state: Keras
    builds the optimizer of a model it loads, and its default (RMSprop) would then have a slot per
    weight that the saved file does not, so every load warned that the optimizer did not match."""
    model.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy"])
