"""Layers that add a penalty on the tensor they see with `add_loss`, and `penalize` for models.

Each layer returns its input unchanged and adds `scale * penalty(input)`; the Trainer names
the term after the layer (`L1ActivitySparsity(name="sparsity_conv1")` gives the term
`sparsity_conv1`) and schedules its weight like any other term.

Keras 3 no longer accepts `model.add_loss(f(model.layers[0].output))` on a functional model
(a symbolic tensor is not a loss). `penalize(model, layer_name, penalty)` does the same job
without editing the model: it returns a new functional model that shares every layer (and so
every weight) of `model`, with a penalty layer inserted after the named one.

Reduction. A layer that adds one value per example ([batch]) means "this much per example":
`termwise.Trainer` averages it over the global batch (the sum over replicas of each replica's
sum, divided by the global batch size), like the other per-example terms. `keras.Model.fit`
instead sums every `add_loss` value (`ops.sum`), so under plain `fit` a per-example penalty
weighs `batch_size` times more than under the Trainer, and its weight changes with the batch
size. Termwise keeps its rule; `add_penalty` (which every penalty layer here calls) warns once
per layer class, with a `SummedPenaltyWarning`, when a layer adds a per-example value in
training while no Termwise `LossRecorder` is active: that is, under `keras.Model.fit` or a
hand-written loop. A scalar (a batch statistic) is the same under both rules.

Saving. Every layer here is registered with Keras under the package `termwise`
(`termwise>L1ActivitySparsity`), and so are the penalty functions an `ActivityPenalty` may
hold (`termwise.losses.penalties`), so that a model that holds them reloads with a plain
`keras.models.load_model(path)` after `import termwise` (which also imports the reference
models' modules, whose layers register themselves).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import keras
import tensorflow as tf

from termwise.losses import penalties
from termwise.trainer import terms

PACKAGE = "termwise"  # the Keras registration package of every Termwise class and function

_serializable = keras.saving.register_keras_serializable(package=PACKAGE)


class SummedPenaltyWarning(UserWarning):
    """A per-example penalty is trained outside `termwise.Trainer`, which sums it over the batch.

    Raised by `add_penalty` once per layer class (Python's default warning filter shows a
    warning once per place and message). Silence it with
    `warnings.filterwarnings("ignore", category=losses.SummedPenaltyWarning)`.
    """


def add_penalty(layer: keras.layers.Layer, value: tf.Tensor, training: bool | None = None) -> None:
    """Adds `value` with `layer.add_loss`; warns when Keras, not Termwise, will reduce it.

    Call it from a penalty layer's `call` instead of `self.add_loss(value)`. Termwise averages a
    per-example ([batch]) value over the batch; `keras.Model.fit` sums it. When `training` is
    true, `value` is not a scalar and no Termwise `LossRecorder` is active on this thread
    (the layer runs under `keras.Model.fit` or a hand-written loop), this issues a
    `SummedPenaltyWarning` naming the layer's class, once per class.

    Args:
        layer: the layer whose `call` is running.
        value: the penalty, [batch] or a scalar.
        training: the layer's `training` argument.
    """
    layer.add_loss(value)
    rank = getattr(getattr(value, "shape", None), "rank", None)
    if training and rank != 0 and not terms.is_recording():
        warnings.warn(
            f"{type(layer).__name__} adds a per-example penalty with add_loss, and no "
            "termwise.Trainer is recording it: keras.Model.fit sums add_loss values over the "
            "batch, while termwise.Trainer averages them, so here the penalty weighs batch_size "
            "times more than under the Trainer. Train with termwise.Trainer, or divide the "
            "penalty's scale by the batch size.",
            SummedPenaltyWarning,
            stacklevel=2,
        )


@_serializable
class ActivityPenalty(keras.layers.Layer):
    """Adds `scale * penalty_fn(inputs)` with `add_loss` and returns `inputs` unchanged.

    A per-example penalty ([batch]) is averaged over the batch by `termwise.Trainer` and summed
    by `keras.Model.fit` (see the module docstring; a `SummedPenaltyWarning` says so once); a
    scalar is the same under both.

    Example:
        ```python
        h = keras.layers.Dense(64, activation="relu")(x)
        h = losses.ActivityPenalty(losses.l1_activity, name="sparsity_dense")(h)
        ```

    Args:
        penalty_fn: maps the input to a per-example [batch] penalty or a scalar. To save the
            layer in a `.keras` file it must be serialisable by Keras: a function registered
            with `keras.saving.register_keras_serializable` (every function of
            `termwise.losses.penalties` is), not a lambda or a `functools.partial`.
        scale: multiplies the penalty (a constant; the Trainer's `weights` schedule it).
    """

    def __init__(self, penalty_fn: Callable | None = None, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if penalty_fn is not None and not callable(penalty_fn):
            raise ValueError(f"`penalty_fn` ({penalty_fn!r}) must be callable.")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f"`scale` ({scale!r}) must be a non-negative number.")
        self.penalty_fn = penalty_fn
        self.scale = float(scale)
        self.supports_masking = True

    def penalty(self, inputs) -> tf.Tensor:
        """The unscaled penalty of `inputs`; subclasses override this."""
        if self.penalty_fn is None:
            raise NotImplementedError(
                f"{type(self).__name__} needs a `penalty_fn` or a `penalty` method."
            )
        return self.penalty_fn(inputs)

    def call(self, inputs, training=None):
        value = tf.cast(self.penalty(tf.cast(inputs, tf.float32)), tf.float32)
        add_penalty(self, value * self.scale if self.scale != 1.0 else value, training)
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {**super().get_config(), "scale": self.scale}
        if type(self) is ActivityPenalty:
            config["penalty_fn"] = keras.saving.serialize_keras_object(self.penalty_fn)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "penalty_fn" in config:
            config["penalty_fn"] = keras.saving.deserialize_keras_object(config["penalty_fn"])
        return cls(**config)


@_serializable
class L1ActivitySparsity(ActivityPenalty):
    """Adds the L1 activity penalty `scale * l1_activity(inputs, mean=mean)`, per example.

    See `losses.l1_activity` (Glorot et al. 2011). With `mean=True` the penalty is the mean
    |activation|, independent of the layer's size.

    The value is per example ([batch]): `termwise.Trainer` averages it over the batch, while
    `keras.Model.fit` sums it (a `SummedPenaltyWarning` says so once; see the module docstring).
    """

    def __init__(self, scale: float = 1.0, mean: bool = False, **kwargs):
        super().__init__(None, scale, **kwargs)
        self.mean = bool(mean)

    def penalty(self, inputs):
        return penalties.l1_activity(inputs, mean=self.mean)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean}


@_serializable
class FeatureDiversity(ActivityPenalty):
    """Adds `scale * feature_diversity(inputs, between=between)`, a scalar batch statistic.

    See `losses.feature_diversity` (mean pairwise cosine similarity; cf. Cogswell et al. 2016).
    The value is a scalar, so `termwise.Trainer` and `keras.Model.fit` weigh it the same.
    """

    def __init__(self, scale: float = 1.0, between: str = "examples", **kwargs):
        super().__init__(None, scale, **kwargs)
        if between not in ("examples", "units"):
            raise ValueError(f"`between` ({between!r}) must be 'examples' or 'units'.")
        self.between = between

    def penalty(self, inputs):
        return penalties.feature_diversity(inputs, between=self.between)

    def get_config(self):
        return {**super().get_config(), "between": self.between}


@_serializable
class BernoulliSparsityKL(ActivityPenalty):
    """Adds `scale * bernoulli_sparsity_kl(inputs, target, squash=squash)` (Ng 2011), a scalar.

    The value is a batch statistic (a scalar), so `termwise.Trainer` and `keras.Model.fit`
    weigh it the same.
    """

    def __init__(self, target: float = 0.05, scale: float = 1.0, squash: str = "sigmoid", **kwargs):
        super().__init__(None, scale, **kwargs)
        if not 0.0 < target < 1.0:
            raise ValueError(f"`target` ({target!r}) must be in (0, 1).")
        if squash not in penalties.SQUASHES:
            raise ValueError(
                f"`squash` ({squash!r}) must be one of {', '.join(penalties.SQUASHES)}."
            )
        self.target = float(target)
        self.squash = squash

    def penalty(self, inputs):
        return penalties.bernoulli_sparsity_kl(inputs, self.target, squash=self.squash)

    def get_config(self):
        return {**super().get_config(), "target": self.target, "squash": self.squash}


@_serializable
class GaussianActivityKL(ActivityPenalty):
    """Adds `scale * gaussian_moments_kl(inputs, sigma)`: batch moments vs N(0, sigma^2).

    The value is a batch statistic (a scalar), so `termwise.Trainer` and `keras.Model.fit`
    weigh it the same.
    """

    def __init__(self, sigma: float = 1.0, scale: float = 1.0, **kwargs):
        super().__init__(None, scale, **kwargs)
        if not sigma > 0:
            raise ValueError(f"`sigma` ({sigma!r}) must be positive.")
        self.sigma = float(sigma)

    def penalty(self, inputs):
        return penalties.gaussian_moments_kl(inputs, self.sigma)

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma}


def penalize(
    model: keras.Model,
    layer_name: str | Mapping[str, keras.layers.Layer | Callable],
    penalty: keras.layers.Layer | Callable | None = None,
    *,
    name: str | None = None,
    scale: float = 1.0,
) -> keras.Model:
    """Returns `model` with a penalty on a named layer's output, sharing all of its weights.

    The Keras 2 idiom `model.add_loss(f(model.get_layer(name).output))` raises in Keras 3.
    This rebuilds the model's graph from its own layer objects (so the new model's variables
    ARE the original's: training either trains both) and passes the named layer's output
    through the penalty layer before the layers that consume it. The original is unchanged.

    ```python
    model = keras.applications.MobileNetV2(weights=None)              # or any functional model
    model = losses.penalize(model, "block_1_expand_relu",
                            losses.L1ActivitySparsity(mean=True, name="sparsity_block_1"))
    model = losses.penalize(model, {"conv1": losses.L1ActivitySparsity(name="sparsity_conv1"),
                                    "dense": losses.l1_activity})    # several at once
    ```

    Works for Sequential models and functional models (built from `keras.Input`); the layer is
    one of `model.layers` (a layer inside a nested model is not reachable). Penalise several
    layers with one call and a dict (then each penalty layer is called once in the new graph,
    and its `.output` is the penalised tensor), or by calling it again on the result.

    Args:
        model: a built Sequential or functional model.
        layer_name: the name of the layer whose output is penalised, or a dict of layer name
            to penalty (then leave `penalty` and `name` out).
        penalty: a penalty layer (an `ActivityPenalty`, or any layer that returns its input),
            or a function of the output, wrapped in `ActivityPenalty(penalty, scale, name=...)`.
        name: the term's name when `penalty` is a function (default: `<layer_name>_penalty`).
        scale: the penalty's constant factor when `penalty` is a function.

    Returns:
        A new functional model named `model.name`, with the same inputs and outputs.

    Raises:
        ValueError: for an unknown layer (listing the model's layer names), a model that is not
            Sequential or functional, or a penalty name that is already a layer's.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` ({model!r}) must be a Keras Sequential or functional model.")
    if isinstance(layer_name, Mapping):
        if penalty is not None or name is not None:
            raise ValueError("With a dict of penalties, give no `penalty` nor `name`.")
        requested = dict(layer_name)
    else:
        requested = {layer_name: penalty}
    names = [layer.name for layer in model.layers]
    penalty_layers: dict[str, keras.layers.Layer] = {}
    for target, value in requested.items():
        if target not in names:
            raise ValueError(
                f"`layer_name` ({target!r}) is not a layer of model {model.name!r}; its layers "
                f"are: {', '.join(names)}."
            )
        if isinstance(value, keras.layers.Layer):
            if name is not None and name != value.name:
                raise ValueError(f"`name` ({name!r}) is for a penalty function; name the layer.")
            layer = value
        elif callable(value):
            layer = ActivityPenalty(value, scale, name=name or f"{target}_penalty")
        else:
            raise ValueError(f"`penalty` ({value!r}) must be a Keras layer or a function.")
        taken = names + [p.name for p in penalty_layers.values()]
        if layer.name in taken:
            raise ValueError(
                f"The penalty's name {layer.name!r} is already a layer of model "
                f"{model.name!r}; term names must be unique."
            )
        penalty_layers[target] = layer

    def call_function(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if layer.name in penalty_layers:
            outputs = penalty_layers[layer.name](outputs)
        return outputs

    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise ValueError(
                f"Sequential model {model.name!r} is not built: give it a `keras.Input` first."
            )
        source = model.inputs[0]
        inputs = keras.Input(shape=source.shape[1:], batch_size=source.shape[0], dtype=source.dtype)
        outputs = inputs
        for layer in model.layers:
            outputs = call_function(layer, outputs)
        return keras.Model(inputs, outputs, name=model.name)

    if not any(cls.__name__ == "Functional" for cls in type(model).__mro__):
        raise ValueError(
            f"`model` ({model.name!r}, a {type(model).__name__}) must be Sequential or functional; "
            "a subclassed model has no graph to rewire: add the penalty layer in its `call`."
        )
    # The same layer objects (so the same variables), called on new inputs; `clone_model` keeps
    # the model's name and its input and output structure.
    return keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call_function
    )
