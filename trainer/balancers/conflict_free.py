"""Equal-angle methods: the update makes the same angle with every term's gradient.

Both methods solve ``u_i . x = 1`` for the unit gradients ``u_i = g_i / |g_i|`` (in the span of
the gradients, least norm): ``x = sum_i (y_i / |g_i|) g_i`` with ``y = Ghat^+ 1`` and
``Ghat = D^-1 G D^-1`` the Gramian of the unit gradients (`solvers.unit_gramian`). They differ in
the update's length and sign. The pseudo-inverse keeps the eigenvalues of ``Ghat`` above
``T eps_float32`` of the largest, the precision of a float32 Gramian (as
``torch.linalg.pinv`` does by default); zero gradients are left out.
"""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers import solvers
from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers

FLOAT32_EPSILON = 1.1920929e-07


def _equal_angle(gram: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(y = Ghat^+ 1 over the nonzero gradients, Ghat, the norms, y / norms), all float64."""
    count = gram.shape[-1]
    unit, norms = solvers.unit_gramian(gram)
    ones = tf.cast(norms > 0.0, tf.float64)
    y = solvers.pseudo_solve(unit, ones, rtol=count * FLOAT32_EPSILON)
    return y, unit, norms, tf.math.divide_no_nan(y, norms)


class IMTLG(Balancer):
    """Impartial multi-task learning, gradient part, IMTL-G (Liu et al., 2021).

    Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, 2021, "Towards Impartial Multi-task
    Learning". The update ``sum_i a_i g_i`` with ``sum_i a_i = 1`` has equal projections
    onto every unit gradient, ``u_i . update = u_j . update``. Closed form, in the Gramian
    form of torchjd's generalisation (which accepts linearly dependent gradients)::

        a = v / sum_i v_i,    v = G^+ diag(G)^(1/2) = D^-1 Ghat^+ 1

    computed as the right-hand side, on the unit Gramian in float64 (the direction does not
    depend on the gradients' norms, so a gradient 1e-6 the size of the others gets weight
    ~1e6). The projections are all positive when ``sum_i v_i > 0``; when it is negative they are
    all negative, as the paper's formula gives; when it is 0 (to 1e-12 of ``sum_i |v_i|``), the
    weights are 0, as in torchjd.

    Scale: the weights sum to 1 (LibMTL, torchjd): T equal gradients g give g.

    Cost: T backward passes per step and T per-term gradients of the phase's variables held at once
    (T times their size); one T x T eigendecomposition.

    Args:
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(self, *, layer: str | None = None, representation: str | None = None):
        super().__init__(layer=layer, representation=representation)

    @property
    def spec(self) -> str:
        return "imtl_g"

    def _weights(self, values, step, gram):
        del values, step
        gram, finite = solvers.float64_gramian(gram)
        _, _, _, v = _equal_angle(gram)
        total = tf.reduce_sum(v)
        degenerate = tf.logical_not(tf.abs(total) > 1e-12 * tf.reduce_sum(tf.abs(v)))
        safe = tf.where(degenerate, tf.ones_like(total), total)
        weights = tf.where(degenerate, tf.zeros_like(v), v / safe)
        return Weighting(solvers.finite_or_nan(weights, finite))


class ConFIG(Balancer):
    """Conflict-free inverse gradients, ConFIG (Liu, Chu and Thuerey, 2025).

    Liu, Chu and Thuerey, 2025, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks" (Eq. 2; equal weights, the official `ProjectionLength`). The direction
    ``x = U^+ 1`` (U: the unit gradients as rows) has the same positive inner product with
    every unit gradient; the update is x's unit vector times the sum of the gradients'
    projections on it::

        update = (sum_i g_i . x_hat) x_hat,    x_hat = x / |x|,    x = sum_i (y_i / |g_i|) g_i,
        y = Ghat^+ 1:   weights = (d' Ghat y / y' Ghat y) D^-1 y,    d = diag(G)^(1/2)

    (``g_i . x = |g_i| (Ghat y)_i`` and ``|x|^2 = y' Ghat y``). For two gradients this is the
    official ``ConFIG_update_double``'s direction.

    Scale: the sum convention, as in the official code and torchjd: T equal gradients g give
    ``T g``.

    Cost: T backward passes per step and T per-term gradients of the phase's variables held at once
    (T times their size); one T x T eigendecomposition.

    Args:
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(self, *, layer: str | None = None, representation: str | None = None):
        super().__init__(layer=layer, representation=representation)

    @property
    def spec(self) -> str:
        return "config"

    def _weights(self, values, step, gram):
        del values, step
        gram, finite = solvers.float64_gramian(gram)
        y, unit, norms, v = _equal_angle(gram)
        projected = tf.linalg.matvec(unit, y)
        length = tf.math.divide_no_nan(
            tf.tensordot(norms, projected, 1), tf.tensordot(y, projected, 1)
        )
        return Weighting(solvers.finite_or_nan(length * v, finite))


FORMS = {
    "imtl_g": Form("imtl_g", lambda f: IMTLG(*numbers(f, []))),
    "config": Form("config", lambda f: ConFIG(*numbers(f, []))),
}
