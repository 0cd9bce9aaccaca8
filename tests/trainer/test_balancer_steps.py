"""Balancers through the Trainer's step: preconditions stop (or skip) a step, and a balancer's
own update (DB-MTL's averaged gradients) is what the optimizer applies."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, weights_of
from test_gradient_norm import db_mtl_reference

from termwise.trainer import NonFiniteLossError, Trainer

X = np.array([[1.0, 2.0], [0.5, -1.0]], "float32")


class UpDown(Trainer):
    """Two terms on two examples of a linear model: their gradients are known by hand."""

    def compute_terms(self, batch, training):
        pred = self.model(batch, training=training)[:, 0]
        return {"up": tf.square(pred[0] - 2.0), "down": tf.square(pred[1] + 1.0)}


class WithZero(Trainer):
    """A term that is exactly 0: it breaks every log- or ratio-based balancer's precondition."""

    def compute_terms(self, batch, training):
        pred = self.model(batch, training=training)[:, 0]
        return {"fit": tf.square(pred - 1.0), "zero": 0.0 * pred}


@pytest.mark.parametrize("spec", ["uncertainty", "dwa:1", "famo", "gradnorm", "db_mtl"])
def test_a_broken_precondition_names_the_balancer_the_term_and_the_step(spec):
    model = linear_model()
    before = weights_of(model)
    t = WithZero(model, keras.optimizers.SGD(0.1), balancer=spec, progress=False)
    with pytest.raises(NonFiniteLossError) as caught:
        t.fit(tf.data.Dataset.from_tensors(X), steps=3)
    message = str(caught.value)
    assert message.startswith(f"Balancer '{spec.split(':')[0]}")
    assert t.balancers["train"].precondition in message
    assert "term 'zero'" in message and "at step" in message
    assert t.step < 3
    if t.step == 0:  # nothing was applied: the weights are untouched
        for a, b in zip(before, weights_of(model), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_broken_precondition_is_skipped_with_skip_and_leaves_the_state():
    t = WithZero(
        linear_model(),
        keras.optimizers.SGD(0.1),
        balancer="uncertainty",
        on_nonfinite="skip",
        progress=False,
    )
    t.fit(tf.data.Dataset.from_tensors(X), steps=3)
    assert t.step == 3 and t.skipped_steps == 3
    np.testing.assert_array_equal(t.balancers["train"].log_variance.numpy(), [0.0, 0.0])


def test_db_mtl_applies_libmtl_s_update():
    # LibMTL's DB_MTL on the flat gradients [dw1, dw2, db] of each term, computed by hand.
    lr, beta, steps = 0.05, 0.9, 3
    w, b = np.ones(2), 0.0
    history, expected = [], []
    for _ in range(steps):
        pred = X @ w + b
        features = np.concatenate([X, np.ones((2, 1))], axis=1)
        values = np.array([(pred[0] - 2.0) ** 2, (pred[1] + 1.0) ** 2])
        grads = np.stack([2 * (pred[0] - 2.0) * features[0], 2 * (pred[1] + 1.0) * features[1]])
        history.append((grads, values))
        update = db_mtl_reference(history, beta)[-1]
        w, b = w - lr * update[:2], b - lr * update[2]
        expected.append(np.concatenate([w, [b]]))
    model = linear_model()
    t = UpDown(model, keras.optimizers.SGD(lr), balancer=f"db_mtl:{beta}", progress=False)
    t.fit(tf.data.Dataset.from_tensors(X), steps=steps)
    kernel, bias = weights_of(model)
    np.testing.assert_allclose(np.concatenate([kernel[:, 0], bias]), expected[-1], rtol=1e-5)
