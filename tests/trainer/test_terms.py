"""Naming and reduction rules for loss terms, against hand-computed values."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from termwise import losses
from termwise.trainer import terms as terms_lib


class AddsSum(keras.layers.Layer):
    """Adds sum(x) (a scalar) with add_loss, `count` times per call."""

    def __init__(self, count=1, **kwargs):
        super().__init__(**kwargs)
        self.count = count

    def call(self, x):
        for i in range(self.count):
            self.add_loss((i + 1.0) * tf.reduce_sum(x))
        return x


def _model(layer):
    inputs = keras.Input((2,))
    return keras.Model(inputs, layer(inputs))


def test_terms_named_by_layer():
    model = _model(AddsSum(name="penalty"))
    x = np.ones((3, 2), "float32")
    with terms_lib.LossRecorder() as recorder:
        model(x)
    assert {k: float(v) for k, v in recorder.terms().items()} == {"penalty": 6.0}


def test_layer_adding_several_values_gets_indexed_names():
    model = _model(AddsSum(count=2, name="penalty"))
    with terms_lib.LossRecorder() as recorder:
        model(np.ones((1, 2), "float32"))
    assert {k: float(v) for k, v in recorder.terms().items()} == {
        "penalty/0": 2.0,
        "penalty/1": 4.0,
    }


def test_model_called_twice_keeps_both_calls_summed():
    model = _model(AddsSum(name="penalty"))
    with terms_lib.LossRecorder() as recorder:
        model(np.ones((1, 2), "float32"))  # adds 2
        model(np.full((1, 2), 3.0, "float32"))  # adds 6; Keras clears the first value here
    assert len(model.losses) == 1  # what Keras alone keeps
    assert float(recorder.terms()["penalty"]) == 8.0


def test_double_call_inside_tf_function():
    model = _model(AddsSum(name="penalty"))

    @tf.function
    def f(a, b):
        with terms_lib.LossRecorder() as recorder:
            model(a)
            model(b)
        return recorder.terms()

    out = f(tf.ones((1, 2)), tf.fill((1, 2), 3.0))
    assert float(out["penalty"]) == 8.0


def test_recorder_inactive_outside_context():
    model = _model(AddsSum(name="penalty"))
    recorder = terms_lib.LossRecorder()
    with recorder:
        pass
    model(np.ones((1, 2), "float32"))
    assert recorder.terms() == {}
    assert len(model.losses) == 1  # Keras's own behaviour is untouched


def test_symbolic_calls_are_not_recorded():
    # Building a functional model calls its layers on KerasTensors in a scratch graph.
    with terms_lib.LossRecorder() as recorder:
        model = _model(AddsSum(name="penalty"))
    assert recorder.terms() == {}
    with terms_lib.LossRecorder() as recorder:
        model(np.ones((1, 2), "float32"))
    assert float(recorder.terms()["penalty"]) == 2.0


def test_two_layers_with_one_name_is_an_error():
    a, b = AddsSum(name="same"), AddsSum(name="other")
    b.name = "same"  # two models may hold different layers with one name
    with terms_lib.LossRecorder() as recorder:
        _model(a)(np.ones((1, 2), "float32"))
        _model(b)(np.ones((1, 2), "float32"))
    with pytest.raises(ValueError, match="'same'"):
        recorder.terms()


def test_merge_rejects_duplicates_and_non_float_terms():
    with pytest.raises(ValueError, match=r"named 'kl'.*known term names: \['kl', 'rec'\]"):
        terms_lib.merge_terms({"kl": tf.ones([2]), "rec": tf.ones([2])}, {"kl": tf.ones([])})
    with pytest.raises(ValueError, match="'count' must be a floating-point tensor"):
        terms_lib.merge_terms({"count": tf.constant([1, 2])})


def test_regularization_is_sum_of_weight_regularizers():
    layer = keras.layers.Dense(
        2,
        kernel_regularizer=keras.regularizers.L2(0.5),
        bias_regularizer=keras.regularizers.L1(2.0),
    )
    layer.build((None, 3))
    layer.kernel.assign(np.arange(6, dtype="float32").reshape(3, 2))
    layer.bias.assign(np.array([-1.0, 2.0], "float32"))
    expected = 0.5 * np.sum(np.arange(6.0) ** 2) + 2.0 * 3.0
    assert float(terms_lib.regularization_loss(layer.trainable_variables)) == pytest.approx(
        expected
    )
    assert terms_lib.regularization_loss(keras.layers.Dense(1).trainable_variables) is None


def test_reduce_per_example_and_scalar_terms():
    per_example = tf.constant([1.0, 2.0, 3.0, 4.0])
    per_pixel = tf.constant([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [3.0, 1.0]])  # sums 2,2,0,4
    weights = tf.constant([1.0, 0.0, 2.0, 1.0])
    out = terms_lib.reduce_terms(
        {"a": per_example, "b": per_pixel, "c": tf.constant(5.0)}, sample_weight=weights
    )
    assert float(out["a"]) == pytest.approx((1 + 0 + 6 + 4) / 4)
    assert float(out["b"]) == pytest.approx((2 + 0 + 0 + 4) / 4)
    assert float(out["c"]) == 5.0
    assert list(out) == ["a", "b", "c"]


def test_reduce_rejects_mismatched_sample_weights():
    with pytest.raises(ValueError, match="'a' has batch size 3"):
        terms_lib.reduce_terms({"a": tf.ones([3])}, sample_weight=tf.ones([4]))


class Named(keras.layers.Layer):
    """Adds sum(x) as `a` (add_term), 2 sum(x) and 3 sum(x) as `b` and `c` (a dict), and
    4 sum(x) unnamed."""

    def call(self, x):
        total = tf.reduce_sum(x)
        losses.add_term(self, "a", total)
        self.add_loss({"b": 2.0 * total, "c": 3.0 * total})
        self.add_loss(4.0 * total)
        return x


def test_named_values_are_named_below_the_layer():
    model = _model(Named(name="pen"))
    with terms_lib.LossRecorder() as recorder:
        model(np.ones((1, 2), "float32"))  # sum 2
        model(np.full((1, 2), 2.0, "float32"))  # sum 4: each name sums both calls
    assert {k: float(v) for k, v in recorder.terms().items()} == {
        "pen/a": 6.0,
        "pen/b": 12.0,
        "pen/c": 18.0,
        "pen": 24.0,
    }
    assert recorder.positional_counts() == {"pen": 1}
    assert len(model.losses) == 4  # Keras sees ordinary add_loss values


class BadNames(keras.layers.Layer):
    """Adds `make_loss(sum(x))` with add_loss."""

    def __init__(self, make_loss, **kwargs):
        super().__init__(**kwargs)
        self.make_loss = make_loss

    def call(self, x):
        self.add_loss(self.make_loss(tf.reduce_sum(x)))
        return x


@pytest.mark.parametrize(
    "make_loss, message",
    [
        (lambda v: {"": v}, r"Layer 'bad' names a loss term ''; .* non-empty string"),
        (lambda v: {"a": [v, v]}, r"Layer 'bad' adds the loss term 'a' as a list"),
    ],
)
def test_bad_term_names_name_the_layer(make_loss, message):
    model = _model(BadNames(make_loss, name="bad"))
    with terms_lib.LossRecorder(), pytest.raises(ValueError, match=message):
        model(np.ones((1, 2), "float32"))


def test_add_term_checks_its_arguments():
    with pytest.raises(ValueError, match=r"add_term `layer` \('pen'\) must be a keras"):
        losses.add_term("pen", "a", tf.ones([]))
    with pytest.raises(ValueError, match=r"names a loss term 3; .* non-empty string"):
        losses.add_term(AddsSum(name="pen"), 3, tf.ones([]))


class Colliding(keras.layers.Layer):
    """Names a value `0` and adds two unnamed ones, which are `<layer>/0` and `<layer>/1`."""

    def call(self, x):
        self.add_loss({"0": tf.reduce_sum(x)})
        self.add_loss([tf.reduce_sum(x), tf.reduce_sum(x)])
        return x


def test_a_name_and_a_position_that_collide_are_an_error():
    with terms_lib.LossRecorder() as recorder:
        _model(Colliding(name="pen"))(np.ones((1, 2), "float32"))
    with pytest.raises(ValueError, match=r"Layer 'pen' adds two loss terms named 'pen/0'"):
        recorder.terms()


def test_a_layer_called_twice_in_one_model_call_is_one_term():
    shared = AddsSum(name="penalty")
    inputs = keras.Input((2,))
    model = keras.Model(inputs, shared(keras.layers.Rescaling(2.0)(shared(inputs))))
    with terms_lib.LossRecorder() as recorder:
        model(np.ones((1, 2), "float32"))  # adds 2, then 4
    assert {k: float(v) for k, v in recorder.terms().items()} == {"penalty": 6.0}
    assert recorder.positional_counts() == {"penalty": 1}


def _encoder(name, inner=None):
    inputs = keras.Input((2,))
    h = inner(inputs) if inner is not None else inputs
    return keras.Model(inputs, AddsSum(name="penalty")(h), name=name)


def test_repeated_layer_names_are_named_by_their_path():
    deep = _encoder("enc_c")
    inputs = keras.Input((2,))
    outer = keras.Model(
        inputs, _encoder("enc_a")(inputs) + _encoder("enc_b", _encoder("block", deep))(inputs)
    )
    with terms_lib.LossRecorder() as recorder:
        outer(np.ones((1, 2), "float32"))
    assert list(recorder.terms()) == [
        "enc_a/penalty",
        "enc_b/block/enc_c/penalty",
        "enc_b/block/penalty",
        "enc_b/penalty",
    ]
    # Calling a sub-model alone: the roots passed (the Trainer's models) still decide the paths.
    with terms_lib.LossRecorder() as recorder:
        deep(np.ones((1, 2), "float32"))
    assert list(recorder.terms()) == ["penalty"]
    assert list(recorder.terms(roots=[outer])) == ["enc_b/block/enc_c/penalty"]


def test_naming_checks_positional_counts_across_modes():
    naming = terms_lib.Naming(["train"])
    naming.record("train", True, ["loss", "twopen/0", "twopen/1"], {"twopen": 2})
    naming.record("train", True, ["loss", "twopen/0", "twopen/1"], {"twopen": 2})  # no change
    with pytest.raises(
        ValueError,
        match=r"Layer 'twopen' adds 2 unnamed add_loss value\(s\) per call in training but 1 in "
        r"evaluation \(phase 'train'\), so its terms would be \['twopen/0', 'twopen/1'\] in fit "
        r"and \['twopen'\] in evaluate\. .*termwise\.losses\.add_term",
    ):
        naming.record("train", False, ["loss", "twopen"], {"twopen": 1})
    naming.record("train", False, ["loss"], {})  # a layer silent in evaluation is fine


def test_naming_qualifies_names_shared_by_phases():
    naming = terms_lib.Naming(["d", "g"])
    assert naming.missing() == [("d", True), ("d", False), ("g", True), ("g", False)]
    naming.record("d", True, ["adv", "regularization", "drift"], {"drift": 1})
    naming.record("d", False, ["adv", "regularization"], {})
    naming.record("g", True, ["adv", "regularization"], {})
    naming.record("g", False, ["regularization", "drift"], {})  # drift: only in evaluation here
    assert naming.missing() == []
    assert naming.final("d", ["adv", "regularization", "drift"]) == {
        "adv": "d/adv",
        "regularization": "d/regularization",
        "drift": "d/drift",
    }
    assert naming.final("g", ["adv"]) == {"adv": "g/adv"}
    weights = {"regularization": 2.0, "d/adv": 3.0, "adv": 5.0}
    assert naming.weight(weights, "d/regularization") == 2.0
    assert naming.weight(weights, "d/adv") == 3.0 and naming.weight(weights, "g/adv") == 5.0
    assert naming.weight(weights, "d/drift") is None
    naming.check_weights(weights)
    with pytest.raises(ValueError, match=r"\['d/kl', 'g'\]; known term names: \['d/adv', "):
        naming.check_weights({"d/kl": 1.0, "g": 1.0})
    assert terms_lib.Naming(["train"]).missing() == []  # one phase: nothing to qualify


def test_naming_rejects_a_qualified_name_that_collides():
    naming = terms_lib.Naming(["a", "b"])
    for training in (True, False):
        naming.record("a", training, ["x", "b/x"], {})
        naming.record("b", training, ["x"], {})
    with pytest.raises(ValueError, match=r"Term 'b/x' of phase 'a' and term 'x' of phase 'b'"):
        naming.final("a", ["x", "b/x"])


def test_reduce_rejects_a_term_not_led_by_the_batch():
    per_feature = tf.ones([5])
    with pytest.raises(
        ValueError,
        match=r"^Loss term 'mean' of shape \[5\] does not lead with the batch axis.*leading "
        r"dimension is 5; the batch has 3 examples\.$",
    ):
        terms_lib.reduce_terms({"mean": per_feature}, batch_size=3)
    with pytest.raises(ValueError, match=r"^Metric 'm' of shape \[2, 3\]"):
        terms_lib.reduce_terms({"m": tf.ones([2, 3])}, batch_size=tf.constant(3), kind="Metric")
    # Without a batch size nothing is checked (the old behaviour); with the right one, the mean.
    assert float(terms_lib.reduce_terms({"mean": per_feature})["mean"]) == 1.0
    out = terms_lib.reduce_terms({"a": tf.constant([1.0, 2.0, 6.0])}, batch_size=3)
    assert float(out["a"]) == 3.0


def test_reduce_checks_unknown_shapes_in_the_graph():
    @tf.function(input_signature=[tf.TensorSpec([None, None]), tf.TensorSpec([], tf.int32)])
    def reduce(x, batch_size):
        per_feature = tf.reduce_mean(x, axis=0)  # [features], unknown at trace time
        per_example = tf.reduce_sum(x, axis=1)
        out = terms_lib.reduce_terms({"a": per_example, "b": per_feature}, batch_size=batch_size)
        return out["a"]

    x = np.arange(12, dtype="float32").reshape(3, 4)
    assert float(reduce(x[:, :3], 3)) == pytest.approx(np.mean(x[:, :3].sum(1)))  # 3 x 3: fine
    with pytest.raises(tf.errors.InvalidArgumentError, match="termwise:") as caught:
        reduce(x, 3)
    error = terms_lib.lead_error(caught.value)
    assert isinstance(error, ValueError)
    assert str(error) == (
        "Loss term 'b' of shape [None] does not lead with the batch axis: a term of rank >= 1 "
        "is per example, [batch, ...], and is averaged over the batch. Return a batch "
        "statistic as a scalar. Its leading dimension is 4; the batch has 3 examples."
    )
    other = tf.errors.InvalidArgumentError(None, None, "assertion failed: [x] [y]")
    assert terms_lib.lead_error(other) is None
