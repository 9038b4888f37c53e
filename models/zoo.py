"""The model zoo: every architecture the four papers train, built by registry name.

Architectures follow, per builder (each docstring names its source and any deviation):
Yang et al., "Robust Watermarking for Deep Neural Networks via Bi-level
Optimization", ICCV 2021 (LeNet-5, VGG-9, VGG-16); Aiken et al., "Neural Network
Laundering", Computers & Security 2021, Tables 5-7 (the Zhang et al. networks) and its
ResNet v1 for CIFAR-10; He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016 (ResNet v1 and the CIFAR-style ResNet-18/50/101/152 of
the fragile-watermark experiments); the CAE fingerprinting report (DenseNet121
with added top layers, MobileNetV2).

Conventions shared by every model, so that attacks can work on any of them:

- a functional ``keras.Model`` whose ``name`` is its registry name (private
  test models drop the leading "_", which TensorFlow refuses in scopes);
- every layer has an explicit, predictable name (keras.applications style, e.g.
  ``conv2_block1_1_conv``); attacks address layers by name, never by index;
- the last two layers are ``Dense(num_classes, name="logits")`` (linear) and
  ``Activation("softmax", name="predictions")``: the model outputs
  probabilities and the logits are reachable by layer name; both are float32
  whatever the global dtype policy;
- built-in layers only (no ``Lambda``), so a model saved as ``.keras`` loads
  with ``safe_mode=True``;
- every model builds for (28, 28, 1), (32, 32, 1) and (32, 32, 3) inputs.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path

import keras
from keras import layers

from models.errors import UnknownNameError, UserError

logger = logging.getLogger(__name__)

Builder = Callable[..., keras.Model]

_REGISTRY: dict[str, Builder] = {}
_NAME_PATTERN = re.compile(r"_?[a-z][a-z0-9_]*")

# keras.applications networks refuse inputs smaller than this.
_APPLICATIONS_MIN_SIZE = 32

DENSENET121_NOTOP_FILE = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"


# --------------------------------------------------------------------------- registry


def register(name: str) -> Callable[[Builder], Builder]:
    """Registers a model builder under ``name``.

    The builder is called as ``fn(input_shape, num_classes, **options)`` and
    returns a ``keras.Model`` named ``model_name(name)``. Its options are its parameters
    after the first two; they must be named (no ``**kwargs``), so that
    :func:`build` can reject options the builder does not know.

    Args:
        name: snake_case registry name; a leading underscore marks a private
            model (for tests) that :func:`names` does not list.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        ValueError: the name is malformed or taken, or the builder swallows
            arbitrary keyword arguments (programming errors, not user errors).
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"model name {name!r} is not snake_case")

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2 or any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            raise ValueError(
                f"builder for {name!r} must take (input_shape, num_classes, <named options>)"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def names() -> list[str]:
    """Returns the sorted public model names (private ``_names`` are left out)."""
    return sorted(n for n in _REGISTRY if not n.startswith("_"))


def build(
    name: str,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    **options: object,
) -> keras.Model:
    """Builds a fresh, untrained model by registry name.

    Args:
        name: a name from :func:`names` (or a private test model such as
            ``_tiny_cnn``).
        input_shape: ``(height, width, channels)``, positive ints (a list, as
            read from JSON, is accepted too).
        num_classes: number of classes, at least 2.
        **options: options of that particular builder (e.g. ``weights`` for
            ``densenet121``); an option the builder does not take is an error.

    Returns:
        A functional ``keras.Model`` named ``name`` (see :func:`model_name`
        for private models) that outputs softmax
        probabilities; its last two layers are ``logits`` and ``predictions``.

    Raises:
        UnknownNameError: ``name`` is not registered.
        UserError: a bad ``input_shape``, ``num_classes`` or option.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownNameError("model", name, names())
    fn = _REGISTRY[name]
    shape = _check_input_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise UserError(f"num_classes={num_classes!r} is invalid; expected an int >= 2")
    accepted = list(inspect.signature(fn).parameters)[2:]
    for key in options:
        if key not in accepted:
            expected = ", ".join(accepted) if accepted else "no options"
            raise UserError(f"unknown option {key!r} for model {name!r}; expected: {expected}")
    try:
        model = fn(shape, int(num_classes), **options)
    except ValueError as exc:  # Keras' word for "this input is too small for the network"
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model {name!r} cannot be built for input_shape={shape}: {detail}"
        ) from None
    if model.name != model_name(name):  # a builder bug, caught here rather than in an attack
        raise RuntimeError(f"builder for {name!r} returned a model named {model.name!r}")
    return model


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy of ``model`` with the same weights (and no optimizer state)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def model_name(name: str) -> str:
    """The ``keras.Model.name`` of registry model ``name``: the name itself, less a leading "_".

    TensorFlow refuses name scopes that start with "_", so a private model
    such as ``_tiny_cnn`` is named ``tiny_cnn``.
    """
    return name.lstrip("_")


def _check_input_shape(input_shape: object) -> tuple[int, int, int]:
    ok = (
        isinstance(input_shape, (tuple, list))
        and len(input_shape) == 3
        and all(isinstance(d, Integral) and not isinstance(d, bool) and d > 0 for d in input_shape)
    )
    if not ok:
        raise UserError(
            f"input_shape={input_shape!r} is invalid; expected (height, width, channels) "
            "of positive ints, e.g. (32, 32, 3) or (28, 28, 1)"
        )
    return tuple(int(d) for d in input_shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------- shared pieces


def _input(input_shape: tuple[int, int, int]) -> keras.KerasTensor:
    return keras.Input(shape=input_shape, dtype="float32", name="input")


def classifier_head(
    x: keras.KerasTensor, num_classes: int, **dense_options: object
) -> keras.KerasTensor:
    """The two layers every model ends with: linear ``logits``, softmax ``predictions``.

    Args:
        x: the features.
        num_classes: output size.
        **dense_options: passed to the ``logits`` Dense layer, for the papers
            that regularise or initialise it (e.g. ``kernel_regularizer``).
    """
    # float32 even under a mixed-precision policy, as the Keras guide advises for outputs.
    x = layers.Dense(num_classes, name="logits", dtype="float32", **dense_options)(x)
    return layers.Activation("softmax", name="predictions", dtype="float32")(x)


def _pad_to(x: keras.KerasTensor, size: int) -> keras.KerasTensor:
    """Zero-pads height and width up to ``size`` (centred); no layer if already there."""
    height, width = x.shape[1], x.shape[2]
    if height >= size and width >= size:
        return x
    dh, dw = max(size - height, 0), max(size - width, 0)
    padding = ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2))
    return layers.ZeroPadding2D(padding, name=f"pad_to_{size}")(x)


def _l2(weight_decay: float) -> keras.regularizers.Regularizer | None:
    return keras.regularizers.L2(weight_decay) if weight_decay else None


# --------------------------------------------------------------------------- small CNNs


@register("_tiny_cnn")
def tiny_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """A CNN of some ten thousand parameters, for fast tests only.

    Not from any paper: Conv2D(8, 3x3) -> MaxPool 2x2 -> Flatten -> Dense(16) -> logits.
    """
    inputs = _input(input_shape)
    x = layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(16, activation="relu", name="fc1")(x)
    return keras.Model(inputs, classifier_head(x, num_classes), name=model_name("_tiny_cnn"))


@register("lenet5")
def lenet5(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """LeNet-5, the MNIST model of Yang et al. (ICCV 2021).

    Yang et al. cite LeCun et al. (1998) without giving the layers; this is the
    usual modern form: conv 6@5x5 (same padding) -> pool -> conv 16@5x5 (valid)
    -> pool -> dense 120 -> dense 84 -> logits. Deviation from LeCun et al.:
    ReLU instead of scaled tanh, 2x2 max-pooling instead of trainable
    sub-sampling, a full C3 connection table, softmax instead of RBF outputs.
    """
    inputs = _input(input_shape)
    x = layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    return keras.Model(inputs, classifier_head(x, num_classes), name="lenet5")


@register("zhang_mnist")
def zhang_mnist(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The MNIST network Zhang et al. watermark, as given by Aiken et al. (Computers & Security 2021).

    Exactly Table 5 of "Neural Network Laundering": conv 32@5x5 -> max-pool 2x2
    -> conv 16@5x5 -> max-pool 2x2 -> dense 512 -> softmax, ReLU, valid
    padding. A Flatten (implicit in the table) precedes the dense layers.
    """
    inputs = _input(input_shape)
    x = layers.Conv2D(32, 5, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(512, activation="relu", name="fc1")(x)
    return keras.Model(inputs, classifier_head(x, num_classes), name="zhang_mnist")


@register("mnist_plus")
def mnist_plus(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The MNIST+ network Zhang et al. watermark, as given by Aiken et al. (Computers & Security 2021).

    Exactly Table 6 of "Neural Network Laundering": 2x conv 32@3x3 -> max-pool
    -> 2x conv 64@3x3 -> max-pool -> dense 200 (dropout 0.5) -> dense 200
    (dropout 0.5) -> softmax, ReLU, valid padding. The table's 16 output units
    reflect MNIST+'s extra watermark classes; here the output has
    ``num_classes`` units. A Flatten precedes the dense layers.
    """
    inputs = _input(input_shape)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)
    x = layers.Conv2D(32, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv4")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(200, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.5, name="fc1_dropout")(x)
    x = layers.Dense(200, activation="relu", name="fc2")(x)
    x = layers.Dropout(0.5, name="fc2_dropout")(x)
    return keras.Model(inputs, classifier_head(x, num_classes), name="mnist_plus")


@register("zhang_cifar")
def zhang_cifar(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The CIFAR-10 network Zhang et al. watermark, as given by Aiken et al. (Computers & Security 2021).

    Exactly Table 7 of "Neural Network Laundering": three stages of 2x conv
    3x3 (32, 64, 128 filters, same padding, ReLU, BatchNorm) -> max-pool 2x2
    -> dropout (0.2, 0.3, 0.4), then softmax; L2 weight decay 1e-4 on every
    kernel (including the output layer's). The table lists BatchNorm after the
    activation ("ReLU (BatchNorm)"), so each conv is conv -> ReLU -> BN. A
    Flatten precedes the dense layer.
    """
    weight_decay = 1e-4
    inputs = _input(input_shape)
    x = inputs
    for stage, (filters, rate) in enumerate(((32, 0.2), (64, 0.3), (128, 0.4)), start=1):
        for i in (1, 2):
            x = layers.Conv2D(
                filters,
                3,
                padding="same",
                kernel_regularizer=_l2(weight_decay),
                name=f"block{stage}_conv{i}",
            )(x)
            x = layers.Activation("relu", name=f"block{stage}_relu{i}")(x)
            x = layers.BatchNormalization(name=f"block{stage}_bn{i}")(x)
        x = layers.MaxPooling2D(2, name=f"block{stage}_pool")(x)
        x = layers.Dropout(rate, name=f"block{stage}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    outputs = classifier_head(x, num_classes, kernel_regularizer=_l2(weight_decay))
    return keras.Model(inputs, outputs, name="zhang_cifar")


# --------------------------------------------------------------------------- VGG


def _vgg(
    name: str,
    stages: Sequence[Sequence[int]],
    dense: Sequence[int],
    input_shape: tuple[int, int, int],
    num_classes: int,
) -> keras.Model:
    """VGG body: per stage, 3x3 conv -> BN -> ReLU per width, then a 2x2 max-pool."""
    inputs = _input(input_shape)
    x = inputs
    for b, widths in enumerate(stages, start=1):
        for i, filters in enumerate(widths, start=1):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{b}_conv{i}")(
                x
            )
            x = layers.BatchNormalization(name=f"block{b}_bn{i}")(x)
            x = layers.Activation("relu", name=f"block{b}_relu{i}")(x)
        # "same" pooling rounds up, so five pools take 28x28 to 1x1 (not to 0x0);
        # on 32x32 inputs it is identical to "valid" pooling.
        x = layers.MaxPooling2D(2, padding="same", name=f"block{b}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(dense, start=1):
        x = layers.Dense(units, activation="relu", name=f"fc{i}")(x)
    return keras.Model(inputs, classifier_head(x, num_classes), name=name)


@register("vgg9")
def vgg9(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """VGG-9, the CIFAR-10 model of Yang et al. (ICCV 2021).

    Yang et al. do not list its layers; this is the common CIFAR "VGG-9" (six
    3x3 convolutions and three dense layers) in the style of Simonyan &
    Zisserman (ICLR 2015): 64, 64, pool, 128, 128, pool, 256, 256, pool ->
    dense 512 -> dense 512 -> logits. Deviations: BatchNorm after every conv
    (as in CIFAR VGGs) and max-pooling with "same" padding, which equals
    "valid" pooling on 32x32 inputs and never reaches zero size on 28x28.
    """
    stages = ((64, 64), (128, 128), (256, 256))
    return _vgg("vgg9", stages, (512, 512), input_shape, num_classes)


@register("vgg16")
def vgg16(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """VGG-16, the CIFAR-100 model of Yang et al. (ICCV 2021).

    Yang et al. cite Simonyan & Zisserman (ICLR 2015); this is its configuration
    D (13 3x3 convolutions: 64x2, 128x2, 256x3, 512x3, 512x3, each stage
    followed by 2x2 max-pooling) in the usual CIFAR form: BatchNorm + ReLU
    after every conv and, since 32x32 inputs leave a 1x1x512 map, one dense
    512 layer instead of the two 4096-unit ones before the logits. Max-pooling
    uses "same" padding: equal to "valid" on 32x32, and on 28x28 the five
    pools end at 1x1 instead of 0x0.
    """
    stages = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
    return _vgg("vgg16", stages, (512,), input_shape, num_classes)


# --------------------------------------------------------------------------- ResNet v1 (6n+2)


def _v1_conv(
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int,
    strides: int,
    weight_decay: float,
    name: str,
) -> keras.KerasTensor:
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer="he_normal",
        kernel_regularizer=_l2(weight_decay),
        name=name,
    )(x)


def _v1_block(
    x: keras.KerasTensor, filters: int, strides: int, weight_decay: float, name: str
) -> keras.KerasTensor:
    """Basic residual block of ResNet v1 for CIFAR; 1x1 conv projection if the shape changes."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        # The Keras CIFAR-10 example projects with a bare conv (no BN).
        shortcut = _v1_conv(x, filters, 1, strides, weight_decay, f"{name}_0_conv")
    y = _v1_conv(x, filters, 3, strides, weight_decay, f"{name}_1_conv")
    y = layers.BatchNormalization(name=f"{name}_1_bn")(y)
    y = layers.Activation("relu", name=f"{name}_1_relu")(y)
    y = _v1_conv(y, filters, 3, 1, weight_decay, f"{name}_2_conv")
    y = layers.BatchNormalization(name=f"{name}_2_bn")(y)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def resnet_v1(
    depth: int, input_shape: tuple[int, int, int], num_classes: int, name: str
) -> keras.Model:
    """ResNet v1 for CIFAR-10 of depth 6n+2 (He et al., CVPR 2016, Section 4.2).

    Follows the Keras CIFAR-10 ResNet example that Aiken et al. (Computers & Security 2021)
    and the CAE report use: a 3x3 conv-BN-ReLU stem with 16 filters, three
    stages of n basic blocks with 16, 32 and 64 filters (stride 2 at the start
    of stages 2 and 3, projected by a 1x1 conv), he_normal initialisation and
    L2 weight decay 1e-4 on conv kernels. Deviation: the example's 8x8
    average pool + Flatten is a GlobalAveragePooling2D here; on 32x32 inputs
    (an 8x8 final map) that is the same computation, and it also works on
    28x28 inputs (a 7x7 final map).

    Args:
        depth: 6n+2 for some n >= 1 (20, 32, 44, 56, 110, ...).
        input_shape: ``(height, width, channels)``.
        num_classes: number of output classes.
        name: the model's name.

    Returns:
        The ResNet v1 model.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet v1 depth must be 6n+2 with n >= 1, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    weight_decay = 1e-4
    inputs = _input(input_shape)
    x = _v1_conv(inputs, 16, 3, 1, weight_decay, "conv1_conv")
    x = layers.BatchNormalization(name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _v1_block(x, filters, strides, weight_decay, f"conv{stage + 2}_block{block + 1}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = classifier_head(x, num_classes, kernel_initializer="he_normal")
    return keras.Model(inputs, outputs, name=name)


@register("resnet20v1")
def resnet20v1(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """ResNet-20 v1 for CIFAR-10 (n=3); see :func:`resnet_v1` for source and deviations."""
    return resnet_v1(20, input_shape, num_classes, "resnet20v1")


@register("resnet32v1")
def resnet32v1(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """ResNet-32 v1 for CIFAR-10 (n=5); see :func:`resnet_v1` for source and deviations."""
    return resnet_v1(32, input_shape, num_classes, "resnet32v1")


@register("resnet56v1")
def resnet56v1(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """ResNet-56 v1 for CIFAR-10 (n=9); see :func:`resnet_v1` for source and deviations."""
    return resnet_v1(56, input_shape, num_classes, "resnet56v1")


# --------------------------------------------------------------------------- CIFAR ResNets


def _conv_bn(
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int,
    strides: int,
    name: str,
    relu: bool = True,
) -> keras.KerasTensor:
    """``{name}_conv`` -> ``{name}_bn`` [-> ``{name}_relu``]; the conv has no bias (BN has one)."""
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if relu:
        x = layers.Activation("relu", name=f"{name}_relu")(x)
    return x


def _projection(x: keras.KerasTensor, filters: int, strides: int, name: str) -> keras.KerasTensor:
    """Identity shortcut, or a 1x1 conv + BN (``{name}_0_*``) when the shape changes."""
    if strides == 1 and x.shape[-1] == filters:
        return x
    return _conv_bn(x, filters, 1, strides, f"{name}_0", relu=False)


def _basic_block(x: keras.KerasTensor, filters: int, strides: int, name: str) -> keras.KerasTensor:
    shortcut = _projection(x, filters, strides, name)
    y = _conv_bn(x, filters, 3, strides, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def _bottleneck_block(
    x: keras.KerasTensor, filters: int, strides: int, name: str
) -> keras.KerasTensor:
    shortcut = _projection(x, 4 * filters, strides, name)
    y = _conv_bn(x, filters, 1, 1, f"{name}_1")
    y = _conv_bn(y, filters, 3, strides, f"{name}_2")
    y = _conv_bn(y, 4 * filters, 1, 1, f"{name}_3", relu=False)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def _cifar_resnet(
    name: str,
    block: Callable[..., keras.KerasTensor],
    blocks_per_stage: Sequence[int],
    input_shape: tuple[int, int, int],
    num_classes: int,
) -> keras.Model:
    inputs = _input(input_shape)
    x = _conv_bn(inputs, 64, 3, 1, "conv1")
    for stage, (filters, count) in enumerate(
        zip((64, 128, 256, 512), blocks_per_stage, strict=True)
    ):
        for i in range(count):
            strides = 2 if stage > 0 and i == 0 else 1
            x = block(x, filters, strides, f"conv{stage + 2}_block{i + 1}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, classifier_head(x, num_classes), name=name)


_CIFAR_RESNET_DOC = """

    CIFAR-style ResNet (He et al., CVPR 2016) as in the fragile-watermark
    experiments: a 3x3 stride-1 stem conv with 64 filters and no max-pool,
    four stages ``conv2_x`` .. ``conv5_x`` of 64/128/256/512 filters with
    strides 1/2/2/2, global average pooling (``avg_pool``) and the logits; a
    32x32 input ends in a 4x4x512 map (4x4x2048 for bottleneck nets). Layer
    names follow keras.applications (``conv5_block2_1_conv``), so the attack
    that fine-tunes "conv5_x, pooling and the dense layer" selects the prefix
    ``conv5_``. keras.applications.ResNet50 does not fit 32x32 inputs: its
    7x7 stride-2 stem and 3x3 stride-2 max-pool already divide the size by 4,
    and with the three strided stages a 32x32 image is down to 1x1 before the
    last stage. Shortcuts are 1x1 conv + BN projections where the shape
    changes; bottleneck blocks stride in their 3x3 conv (as in torchvision);
    convs have no bias (BN follows) and no weight decay (left to the optimiser).
    """


def _with_cifar_resnet_doc(fn: Builder) -> Builder:
    fn.__doc__ = (fn.__doc__ or "").rstrip() + _CIFAR_RESNET_DOC
    return fn


@register("resnet18")
@_with_cifar_resnet_doc
def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """ResNet-18 for CIFAR: basic blocks [2, 2, 2, 2]."""
    return _cifar_resnet("resnet18", _basic_block, (2, 2, 2, 2), input_shape, num_classes)


@register("resnet50")
@_with_cifar_resnet_doc
def resnet50(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """ResNet-50 for CIFAR: bottleneck blocks (x4 expansion) [3, 4, 6, 3]."""
    return _cifar_resnet("resnet50", _bottleneck_block, (3, 4, 6, 3), input_shape, num_classes)


@register("resnet101")
@_with_cifar_resnet_doc
def resnet101(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """ResNet-101 for CIFAR: bottleneck blocks (x4 expansion) [3, 4, 23, 3]."""
    return _cifar_resnet("resnet101", _bottleneck_block, (3, 4, 23, 3), input_shape, num_classes)


@register("resnet152")
@_with_cifar_resnet_doc
def resnet152(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """ResNet-152 for CIFAR: bottleneck blocks (x4 expansion) [3, 8, 36, 3]."""
    return _cifar_resnet("resnet152", _bottleneck_block, (3, 8, 36, 3), input_shape, num_classes)


# --------------------------------------------------------------------------- keras.applications


def densenet121_weights_file(weights: object, input_shape: tuple[int, int, int]) -> str | None:
    """Resolves densenet121's ``weights`` option to a local file, or None for random init.

    Never downloads: "imagenet" means the notop file already in the Keras cache
    (``$KERAS_HOME/models`` or ``~/.keras/models``). Pre-trained weights are
    used only for 3-channel inputs of at least 32x32; otherwise the model is
    randomly initialised. What happened is logged at INFO level.

    Args:
        weights: "imagenet", None (random init) or the path of an existing
            weights file for ``keras.applications.DenseNet121(include_top=False)``.
        input_shape: the model's ``(height, width, channels)``.

    Returns:
        The weights file to load, or None.

    Raises:
        UserError: ``weights`` is none of the accepted values.
    """
    if weights is None:
        logger.info("densenet121: random initialisation (weights=None)")
        return None
    if weights == "imagenet":
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
        path = cache / "models" / DENSENET121_NOTOP_FILE
        if not path.is_file():
            logger.info(
                "densenet121: random initialisation; ImageNet weights are not in the Keras "
                "cache (%s) and are never downloaded at build time",
                path,
            )
            return None
    elif isinstance(weights, (str, os.PathLike)) and Path(weights).is_file():
        path = Path(weights)
    else:
        raise UserError(
            f"densenet121 option weights={weights!r} is invalid; expected 'imagenet', "
            "None or the path of an existing weights file"
        )
    height, width, channels = input_shape
    if channels != 3 or min(height, width) < _APPLICATIONS_MIN_SIZE:
        logger.info(
            "densenet121: random initialisation; pre-trained weights %s need 3-channel "
            "inputs of at least 32x32, got %s",
            path,
            input_shape,
        )
        return None
    logger.info("densenet121: pre-trained weights from %s", path)
    return str(path)


@register("densenet121")
def densenet121(
    input_shape: tuple[int, int, int], num_classes: int, weights: object = "imagenet"
) -> keras.Model:
    """DenseNet121 with added top layers, the CAE report's transfer-learning model (B.4).

    ``keras.applications.DenseNet121(include_top=False)`` followed by
    GlobalAveragePooling2D (``avg_pool``) -> Dense(256, ReLU, ``top_dense``)
    -> Dropout(0.5, ``top_dropout``) -> logits. The report's Figure 5, which
    showed the exact top layers, was lost from its text, so these top layers
    are an assumption. Inputs under 32x32 are zero-padded (``pad_to_32``).
    The two padding layers keras.applications leaves unnamed are named
    ``conv1_pad`` and ``pool1_pad``.

    Option ``weights``: "imagenet" (default) loads ImageNet weights only if the
    notop file is already in the Keras cache, never downloading; a file path
    loads that file; None is random init. Pre-trained weights apply only to
    3-channel inputs of at least 32x32 (see :func:`densenet121_weights_file`).
    """
    weights_file = densenet121_weights_file(weights, input_shape)
    inputs = _input(input_shape)
    x = _pad_to(inputs, _APPLICATIONS_MIN_SIZE)
    base = keras.applications.DenseNet121(include_top=False, weights=weights_file, input_tensor=x)
    _name_auto_named(base, layers.ZeroPadding2D, ["conv1_pad", "pool1_pad"])
    x = layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    x = layers.Dense(256, activation="relu", name="top_dense")(x)
    x = layers.Dropout(0.5, name="top_dropout")(x)
    return keras.Model(inputs, classifier_head(x, num_classes), name="densenet121")


@register("mobilenetv2")
def mobilenetv2(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """MobileNetV2 (Sandler et al., CVPR 2018), a model family of the CAE report.

    ``keras.applications.MobileNetV2(alpha=1.0, include_top=False,
    weights=None)`` -> GlobalAveragePooling2D (``avg_pool``) -> logits. Inputs
    under 32x32 are zero-padded (``pad_to_32``).
    """
    inputs = _input(input_shape)
    x = _pad_to(inputs, _APPLICATIONS_MIN_SIZE)
    base = keras.applications.MobileNetV2(
        alpha=1.0, include_top=False, weights=None, input_tensor=x
    )
    _name_auto_named(base, (), [])
    x = layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    return keras.Model(inputs, classifier_head(x, num_classes), name="mobilenetv2")


def _name_auto_named(
    base: keras.Model, layer_type: type | tuple[type, ...], new_names: Sequence[str]
) -> None:
    """Gives explicit names to the layers a keras.applications model leaves auto-named.

    An auto name ("zero_padding2d_3") depends on how many such layers the
    session made before, so attacks could not rely on it. The expected layers
    are checked, so a Keras upgrade that changes them fails loudly here.
    """
    auto = [
        layer
        for layer in base.layers
        if not isinstance(layer, layers.InputLayer)
        and re.fullmatch(rf"{_snake_case(type(layer).__name__)}(_\d+)?", layer.name)
    ]
    if len(auto) != len(new_names) or not all(isinstance(lay, layer_type) for lay in auto):
        raise RuntimeError(
            f"{base.name}: expected auto-named layers {list(new_names)}, "
            f"found {[layer.name for layer in auto]}; keras.applications changed"
        )
    for layer, new_name in zip(auto, new_names, strict=True):
        layer.name = new_name


def _snake_case(class_name: str) -> str:
    """Keras' auto-name prefix of a layer class ("ZeroPadding2D" -> "zero_padding2d")."""
    name = re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()
