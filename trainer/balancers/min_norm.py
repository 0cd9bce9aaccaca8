"""Min-norm methods: the update is the smallest vector in the convex hull of the gradients."""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers


class MGDA(Balancer):
    """Multiple-gradient descent, MGDA (Sener and Koltun, 2018), by Frank-Wolfe on the Gramian.

    The weights are the min-norm point of the convex hull of the gradients::

        min_{w in simplex} |sum_i w_i g_i|^2 = w' G w

    solved by `iterations` Frank-Wolfe steps from the uniform ``w`` (Sener and Koltun's
    Algorithm 2): pick ``t = argmin_r (G w)_r``, then the exact line search
    ``gamma = clip((w'Gw - (Gw)_t) / (w'Gw + G_tt - 2 (Gw)_t), 0, 1)``,
    ``w <- (1 - gamma) w + gamma e_t``. The weights sum to 1, so the update is about 1/T of the
    plain sum's size; raise the learning rate to compare with unbalanced runs.

    Args:
        iterations: Frank-Wolfe steps (unrolled in the compiled step).
        layer: take the Gramian over this layer's variables only (Sener and Koltun's MGDA-UB
            takes it over the shared representation; None: the phase's variables).
    """

    needs_gradients = True

    def __init__(self, iterations: int = 20, layer: str | None = None):
        super().__init__(layer=layer)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
            raise ValueError(f"`iterations` ({iterations!r}) must be a positive integer.")
        self.iterations = iterations

    @property
    def spec(self) -> str:
        return f"mgda:{self.iterations}"

    def _weights(self, values, step, gram):
        del values, step
        count = len(self.term_names)
        weights = tf.fill([count], 1.0 / count)
        for _ in range(self.iterations):
            product = tf.linalg.matvec(gram, weights)
            t = tf.argmin(product)
            v1v1 = tf.tensordot(weights, product, 1)
            v1v2 = tf.gather(product, t)
            v2v2 = tf.gather(tf.linalg.diag_part(gram), t)
            gamma = tf.math.divide_no_nan(v1v1 - v1v2, v1v1 + v2v2 - 2.0 * v1v2)
            gamma = tf.clip_by_value(gamma, 0.0, 1.0)
            weights = (1.0 - gamma) * weights + gamma * tf.one_hot(t, count)
        return Weighting(weights)


FORMS = {"mgda": Form("mgda[:ITERATIONS]", lambda f: MGDA(*numbers(f, [int])))}
