"""Bargaining and fairness: weights that share the update's gains among the terms.

Both methods solve, on the Gramian, a small nonlinear system for weights ``w > 0`` of the
update ``d = sum_i w_i g_i``: with ``(G w)_i = g_i . d`` term i's first-order gain,
``w_i (G w)_i = 1`` for Nash-MTL and ``(G w)_i = w_i^(-1/alpha)`` for FairGrad (the two agree
at alpha = 1). `solvers.alpha_fair_weights` solves both by Newton's method, in float64, in the
compiled step; see there for the tolerance, zero gradients and Pareto-stationary gradients.
"""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers import solvers
from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers


class NashMTL(Balancer):
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, 2022,
    "Multi-Task Learning as a Bargaining Game").

    The update is the Nash bargaining solution: the d in the ball that maximises
    ``sum_i log(g_i . d)``, which is ``d = sum_i w_i g_i`` with::

        w_i (G w)_i = 1   for every i,  w > 0          (so |d|^2 = w'Gw = T)

    solved exactly (`solvers.alpha_fair_weights` with alpha = 1, to a relative accuracy of 1e-8
    in d; the authors iterate a sequence of convex problems, CCP, at most 20 times, to
    ``|G w - 1/w| < 1e-3`` on G divided by its Frobenius norm). The solution does not change
    when one gradient is rescaled (``w_i`` scales inversely), so a term whose gradient is 1e-6
    of the others' counts as much as they do. A zero gradient gets weight 0; gradients with a
    zero convex combination (Pareto-stationary) give no update.

    The authors' semantics of the two options: the weights are solved on the steps that are
    multiples of `update_every` (of the global step) and reused in between; then, on every
    step, the update is clipped to the norm `max_norm` over the Gramian's variables
    (PyTorch's ``clip_grad_norm_``: scaled by ``min(1, max_norm / (|d| + 1e-6))``; 0: no clip),
    by scaling the weights. The authors clip the shared parameters' gradient, over which they
    take the Gramian; the scaled weights here scale the whole update. With T >= 2 and the
    default max_norm = 1 the clipped update has norm 1 (``|d| = sqrt(T)`` before it).

    Scale convention: the sum, ``d = sum_i w_i g_i`` with w as above, as the authors' code.

    Cost: T backward passes on every step (the Trainer takes the per-term gradients every step:
    `update_every` saves only the solve, not the passes it saves in the authors' code); T floats
    of state (the last weights).

    Args:
        update_every: solve on the steps that are multiples of this; reuse the weights between.
        max_norm: clip the update's norm to this (0: no clipping).
        layer: take the Gramian (and the norm) over this layer's variables only (None: all of
            the phase's).
    """

    needs_gradients = True

    def __init__(
        self,
        update_every: int = 1,
        max_norm: float = 1.0,
        layer: str | None = None,
        representation: str | None = None,
    ):
        super().__init__(layer=layer, representation=representation)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` ({update_every!r}) must be a positive integer.")
        if not max_norm >= 0:
            raise ValueError(f"`max_norm` ({max_norm!r}) must be non-negative (0: no clipping).")
        self.update_every = update_every
        self.max_norm = float(max_norm)

    @property
    def spec(self) -> str:
        return f"nash_mtl:{self.update_every}:{self.max_norm:g}"

    def _build(self, count):
        self.last_weights = self._state("last_weights", tf.ones([count]))

    def _weights(self, values, step, gram):
        del values
        gram, finite = solvers.float64_gramian(gram)
        last = tf.cast(self.last_weights, tf.float64)
        if self.update_every == 1:
            weights = solvers.alpha_fair_weights(gram, 1.0).weights
        else:
            solve = tf.equal(tf.math.floormod(tf.cast(step, tf.int64), self.update_every), 0)
            weights = tf.cond(
                solve, lambda: solvers.alpha_fair_weights(gram, 1.0).weights, lambda: last
            )
        applied = weights
        if self.max_norm > 0.0:
            squared = tf.tensordot(weights, tf.linalg.matvec(gram, weights), 1)
            norm = tf.sqrt(tf.maximum(squared, 0.0))
            applied = weights * (self.max_norm / tf.maximum(norm + 1e-6, self.max_norm))
        updates = ((self.last_weights, solvers.finite_or_nan(weights, finite)),)
        return Weighting(solvers.finite_or_nan(applied, finite), updates)


class FairGrad(Balancer):
    """FairGrad (Ban and Ji, 2024, "Fair Resource Allocation in Multi-Task Learning").

    alpha-fair allocation of the update's gains ``g_i . d``: the update maximises
    ``sum_i u_alpha(g_i . d)`` (``u_alpha(x) = x^(1-alpha) / (1-alpha)``, log at alpha = 1) in
    the ball, which is ``d = sum_i w_i g_i`` with::

        G w = w^(-1/alpha),   w > 0

    solved exactly (`solvers.alpha_fair_weights`, to a relative accuracy of 1e-8 in d; the
    authors call SciPy's ``least_squares`` on ``G w - w^(-1/alpha)`` from ``w = 1/T``, which
    stops early when some weights are tiny). alpha = 1 is Nash-MTL's system (proportional
    fairness); larger alpha moves toward max-min fairness (every term's gain equal), smaller
    toward the plain sum's largest total gain. Unlike Nash-MTL's, the solution depends on the
    gradients' sizes: for alpha > 1 a term whose gradient is small gets a large weight. A zero
    gradient gets weight 0; Pareto-stationary gradients give no update.

    Scale convention: ``d = sum_i w_i g_i`` with w as above (the paper's and LibMTL's). The
    authors' code multiplies d by T ("to match the sum loss") and then clips its norm to 1;
    for alpha > 1, ``|d|`` grows as the gradients shrink, so a clip (the optimizer's
    `global_clipnorm`) is advisable.

    Cost: T backward passes per step; no state.

    Args:
        alpha: the fairness exponent, > 0 (1.0 as in the authors' and LibMTL's code defaults;
            the authors' scripts use 2.0 on every benchmark).
        layer: take the Gramian over this layer's variables only (None: all of the phase's).
    """

    needs_gradients = True

    def __init__(
        self, alpha: float = 1.0, layer: str | None = None, representation: str | None = None
    ):
        super().__init__(layer=layer, representation=representation)
        if not alpha > 0:
            raise ValueError(f"`alpha` ({alpha!r}) must be positive.")
        self.alpha = float(alpha)

    @property
    def spec(self) -> str:
        return f"fairgrad:{self.alpha:g}"

    def _weights(self, values, step, gram):
        del values, step
        gram, finite = solvers.float64_gramian(gram)
        weights = solvers.alpha_fair_weights(gram, self.alpha).weights
        return Weighting(solvers.finite_or_nan(weights, finite))


FORMS = {
    "nash_mtl": Form(
        "nash_mtl[:UPDATE_EVERY[:MAX_NORM]]", lambda f: NashMTL(*numbers(f, [int, float]))
    ),
    "fairgrad": Form("fairgrad[:ALPHA]", lambda f: FairGrad(*numbers(f, [float]))),
}
