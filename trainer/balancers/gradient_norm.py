"""Balancers that weigh terms by their gradients' magnitudes (GradNorm)."""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers


class GradNorm(Balancer):
    """GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, 2018).

    With ``n_i = |g_i|`` over the target layer (``G_ii``), ``L_i(0)`` the first applied step's
    values, the relative inverse training rate ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``
    and the learned weights ``w_i``::

        L_grad = sum_i | w_i n_i - Gbar r_i^alpha |,   Gbar = mean_j(w_j n_j)  (held constant)
        w_i   <- w_i - learning_rate * sign(w_i n_i - Gbar r_i^alpha) n_i / Gbar,
                 then renormalised so that sum_i w_i = T (and w_i >= 1e-4)

    A term that trains slower than the others (large ``r_i``) gains weight. The update uses this
    step's ``w``; the new ``w`` serves the next step. The paper updates ``w`` with the network's
    optimizer; here each applied step takes a plain gradient step of `learning_rate` on
    ``L_grad / Gbar``, which makes the step independent of the gradients' scale.

    Args:
        alpha: strength of the pull toward equal training rates (the paper uses 0.12 to 3).
        learning_rate: step size of the weights' update.
        layer: the last shared layer's name (None: all of the phase's variables).
    """

    needs_gradients = True

    def __init__(self, alpha: float = 1.5, learning_rate: float = 0.025, layer: str | None = None):
        super().__init__(layer=layer)
        if not alpha >= 0:
            raise ValueError(f"`alpha` ({alpha!r}) must be non-negative.")
        if not learning_rate > 0:
            raise ValueError(f"`learning_rate` ({learning_rate!r}) must be positive.")
        self.alpha = float(alpha)
        self.learning_rate = float(learning_rate)

    @property
    def spec(self) -> str:
        layer = f":{self.layer}" if self.layer else ""
        return f"gradnorm:{self.alpha:g}:{self.learning_rate:g}{layer}"

    def _build(self, count):
        self.task_weights = self._state("task_weights", tf.ones([count]))
        self.initial = self._state("initial", tf.zeros([count]))
        self.started = self._state("started", 0.0)

    def _weights(self, values, step, gram):
        del step
        weights = tf.convert_to_tensor(self.task_weights)
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
        initial = tf.where(self.started > 0.0, self.initial, values)
        ratios = tf.math.divide_no_nan(values, initial)
        rates = tf.math.divide_no_nan(ratios, tf.reduce_mean(ratios))
        weighted_norms = weights * norms
        target = tf.reduce_mean(weighted_norms) * tf.pow(rates, self.alpha)  # a constant
        mean_norm = tf.reduce_mean(weighted_norms)
        step_size = tf.math.divide_no_nan(self.learning_rate * norms, mean_norm)
        new = weights - step_size * tf.sign(weighted_norms - target)
        new = tf.maximum(new, 1e-4)
        new = new * (float(len(self.term_names)) / tf.reduce_sum(new))
        updates = ((self.task_weights, new), (self.initial, initial), (self.started, 1.0))
        return Weighting(weights, updates)


def _gradnorm(fields: list[str]) -> GradNorm:
    if len(fields) > 3:
        raise ValueError(f"takes at most 3 fields, got {len(fields)}")
    layer = fields[2] if len(fields) == 3 and fields[2] else None
    return GradNorm(*numbers(fields[:2], [float, float]), layer=layer)


FORMS = {"gradnorm": Form("gradnorm[:ALPHA[:LEARNING_RATE[:LAYER]]]", _gradnorm)}
