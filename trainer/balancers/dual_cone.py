"""Dual-cone projections: updates that conflict with no term's gradient (Jacobian descent).

The dual cone of the gradients is ``C = {x : g_i . x >= 0 for all i}``: an update in C
increases no term (to first order). The projection of ``sum_i u_i g_i`` onto C is
``sum_i v_i g_i`` with ``v = argmin_{v >= u} v'Gv`` (Quinton and Rey 2024, Proposition 1),
solved exactly by `solvers.dual_cone_projection`.
"""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers import solvers
from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers


class UPGrad(Balancer):
    """Unconflicting projection of gradients, UPGrad (Quinton and Rey, 2024).

    Quinton and Rey, 2024, "Jacobian Descent for Multi-Objective Optimization" (torchjd). Each
    gradient is projected onto the dual cone of all of them, and the projections are averaged::

        v^(i) = argmin_{v >= e_i / T} v'Gv        (the projection of g_i / T onto C)
        w     = sum_i v^(i),                        update = sum_k w_k g_k

    so the update lies in C (``(G w)_i >= 0``: no term's gradient has a negative inner product
    with it), it equals the mean gradient when no two gradients conflict, and ``w_k >= 1/T``.
    The T projections are one batched active-set solve in float64, on the unit-diagonal
    Gramian (the cone does not change when a gradient is rescaled, so a gradient 1e-6 the size
    of the others constrains the update as much as they do). Unlike torchjd, G is not
    regularised (torchjd adds 1e-4 I to its trace-normalised G), so the projection is exact.

    Scale: the mean convention, as in torchjd (its default preference vector 1/T): T equal
    gradients g give g; the weights sum to at least 1.

    Cost: T backward passes per step and T per-term gradients of the phase's variables held at once
    (T times their size); T box-constrained T x T QPs per step.

    Args:
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(self, *, layer: str | None = None, representation: str | None = None):
        super().__init__(layer=layer, representation=representation)

    @property
    def spec(self) -> str:
        return "upgrad"

    def _weights(self, values, step, gram):
        del values, step
        gram, finite = solvers.float64_gramian(gram)
        count = gram.shape[-1]
        projections = solvers.dual_cone_projection(
            gram, tf.eye(count, dtype=tf.float64) / float(count)
        )
        return Weighting(solvers.finite_or_nan(tf.reduce_sum(projections, axis=0), finite))


class DualProj(Balancer):
    """The mean gradient projected onto the dual cone of the gradients, DualProj.

    Quinton and Rey, 2024, "Jacobian Descent for Multi-Objective Optimization" (torchjd's
    ``DualProj``; the projection is Lopez-Paz and Ranzato's, 2017, "Gradient Episodic Memory
    for Continual Learning", Eq. 11)::

        w = argmin_{v >= 1/T} v'Gv,        update = sum_k w_k g_k = proj_C(mean_i g_i)

    the point of C nearest to the mean gradient: no term's gradient has a negative inner
    product with it, and it is the mean gradient when that is already in C. Solved exactly as
    one active-set QP in float64 on the unit-diagonal Gramian, without torchjd's 1e-4 I
    regularisation.

    Scale: the mean convention, as in torchjd: T equal gradients g give g.

    Cost: T backward passes per step and T per-term gradients of the phase's variables held at once
    (T times their size); one box-constrained T x T QP per step.

    Args:
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(self, *, layer: str | None = None, representation: str | None = None):
        super().__init__(layer=layer, representation=representation)

    @property
    def spec(self) -> str:
        return "dualproj"

    def _weights(self, values, step, gram):
        del values, step
        gram, finite = solvers.float64_gramian(gram)
        count = gram.shape[-1]
        mean = tf.fill([count], tf.constant(1.0 / count, tf.float64))
        return Weighting(solvers.finite_or_nan(solvers.dual_cone_projection(gram, mean), finite))


FORMS = {
    "upgrad": Form("upgrad", lambda f: UPGrad(*numbers(f, []))),
    "dualproj": Form("dualproj", lambda f: DualProj(*numbers(f, []))),
}
