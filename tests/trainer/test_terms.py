"""Naming and reduction rules for loss terms, against hand-computed values."""

import keras
import numpy as np
import pytest
import tensorflow as tf

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
