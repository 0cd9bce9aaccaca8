"""Balancers at a shared representation (MGDA-UB, Sener and Koltun 2018): the Gramian of the
terms' gradients at the encoder's output, and one full backward pass of the weighted total."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import weights_of

from termwise.trainer import Trainer, balancers


def two_heads():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3,))
    z = keras.layers.Dense(4, activation="tanh", name="encoder")(inputs)
    a = keras.layers.Dense(1, name="head_a")(z)
    b = keras.layers.Dense(1, name="head_b")(z)
    return keras.Model(inputs, [a, b])


class TwoTasks(Trainer):
    def compute_terms(self, batch, training):
        x, ya, yb = batch
        a, b = self.model(x, training=training)
        return {"a": tf.square(a[:, 0] - ya), "b": tf.square(b[:, 0] + yb)}


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, 3)).astype("float32")
    return x, rng.normal(size=8).astype("float32"), rng.normal(size=8).astype("float32")


def by_hand(model, x, ya, yb):
    """dL/dZ for each term, and each term's parameter gradient (flat), from an eager tape."""
    encoder, head_a, head_b = (model.get_layer(n) for n in ("encoder", "head_a", "head_b"))
    with tf.GradientTape(persistent=True) as tape:
        z = encoder(x)
        tape.watch(z)
        la = tf.reduce_mean(tf.square(head_a(z)[:, 0] - ya))
        lb = tf.reduce_mean(tf.square(head_b(z)[:, 0] + yb))
    variables = model.trainable_variables
    flat = [
        np.concatenate(
            [
                np.ravel(g) if g is not None else np.zeros(v.shape).ravel()
                for g, v in zip(tape.gradient(loss, variables), variables, strict=True)
            ]
        )
        for loss in (la, lb)
    ]
    return np.ravel(tape.gradient(la, z)), np.ravel(tape.gradient(lb, z)), flat


@pytest.mark.parametrize("diagnose", [0, 1])
def test_mgda_at_the_representation_is_mgda_ub(diagnose):
    x, ya, yb = data()
    reference = two_heads()
    za, zb, (ga, gb) = by_hand(reference, x, ya, yb)
    # MGDA's min-norm point of two vectors: gamma za + (1 - gamma) zb.
    gamma = np.clip((zb - za) @ zb / ((za - zb) @ (za - zb)), 0.0, 1.0)
    update = gamma * ga + (1 - gamma) * gb
    expected = np.concatenate([np.ravel(w) for w in weights_of(reference)]) - 0.1 * update

    model = two_heads()
    t = TwoTasks(
        model,
        keras.optimizers.SGD(0.1),
        balancer="mgda@representation=encoder",
        grad_log_every=diagnose,
        log_every=1,
        progress=False,
    )
    logs = t.fit(tf.data.Dataset.from_tensors((x, ya, yb)), steps=1).last
    got = np.concatenate([np.ravel(w) for w in weights_of(model)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert logs["weight/a"] == pytest.approx(gamma, rel=1e-5)
    assert logs["weight/b"] == pytest.approx(1 - gamma, rel=1e-5)


def test_surgery_at_the_representation_applies_its_combination():
    # PCGrad's mixing C on the representation's Gramian; the update is (1'C) of the terms.
    x, ya, yb = data(seed=3)
    reference = two_heads()
    za, zb, (ga, gb) = by_hand(reference, x, ya, yb)
    assert za @ zb < 0  # the two tasks conflict at the representation
    model = two_heads()
    t = TwoTasks(
        model,
        keras.optimizers.SGD(0.1),
        balancer=balancers.PCGrad().target(representation="encoder"),
        grad_log_every=0,
        progress=False,
    )
    t.fit(tf.data.Dataset.from_tensors((x, ya, yb)), steps=1)
    start = np.concatenate([np.ravel(w) for w in weights_of(reference)])
    got = np.concatenate([np.ravel(w) for w in weights_of(model)])
    # At Z: a' = a - (a.b / |b|^2) b and b' = b - (a.b / |a|^2) a, so the update's coefficients
    # are 1 - a.b / |a|^2 on term a and 1 - a.b / |b|^2 on term b, applied to their gradients.
    update = (1 - (za @ zb) / (za @ za)) * ga + (1 - (za @ zb) / (zb @ zb)) * gb
    np.testing.assert_allclose(got, start - 0.1 * update, rtol=1e-5, atol=1e-6)


def test_a_representation_that_is_not_a_layer_is_an_error_before_training():
    x, ya, yb = data()
    t = TwoTasks(
        two_heads(), keras.optimizers.SGD(0.1), balancer="mgda@representation=enc", progress=False
    )
    with pytest.raises(ValueError, match=r"representation 'enc' is not a layer of the model"):
        t.fit(tf.data.Dataset.from_tensors((x, ya, yb)), steps=1)
    assert t.step == 0
