"""Min-norm methods: the update comes from the min-norm point of the convex hull of the gradients.

MGDA takes that point itself; CAGrad takes the min-norm point of the hull shifted along the
mean gradient, at the shift where its optimality condition holds. Both are solved exactly by
`solvers.min_norm_solution`, in float64, inside the compiled step.
"""

from __future__ import annotations

import math
from numbers import Real

import tensorflow as tf

from termwise.trainer.balancers import solvers
from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers


class MGDA(Balancer):
    """Multiple-gradient descent, MGDA (Sener and Koltun, 2018), solved exactly.

    Sener and Koltun, 2018, "Multi-Task Learning as Multi-Objective Optimization" (after
    Desideri, 2012). The weights are the min-norm point of the convex hull of the gradients::

        w = argmin_{w in simplex} w' G w,        update = sum_i w_i g_i

    solved exactly (`solvers.min_norm_point`: one active-set NNLS in float64, stopped at its
    KKT conditions, not a fixed number of Frank-Wolfe steps). At the solution
    ``(G w)_i >= w'Gw`` for every i, so the update has a non-negative inner product
    ``|update|^2 >= 0`` with every term's gradient, and it is zero exactly when some convex
    combination of the gradients vanishes (a Pareto-stationary point; for example when one
    term's gradient is zero: then MGDA does not move, as in torchjd and LibMTL).

    Scale: the weights sum to 1 (a convex combination, like the mean: T equal gradients give
    that gradient), as in torchjd and LibMTL (``mgda_gn="none"``). The update is at most the
    smallest gradient's size; raise the learning rate to compare with unbalanced runs.

    Cost: T backward passes per step (one per term) and T per-term gradients of the phase's
    variables held at once (T times their size); the solve is T x T.

    Args:
        layer: take the Gramian over this layer's variables only (Sener and Koltun's MGDA-UB
            takes it over the shared representation; None: the phase's variables).
    """

    needs_gradients = True

    def __init__(self, *, layer: str | None = None, representation: str | None = None):
        super().__init__(layer=layer, representation=representation)

    @property
    def spec(self) -> str:
        return "mgda"

    def _weights(self, values, step, gram):
        del values, step
        gram, finite = solvers.float64_gramian(gram)
        return Weighting(solvers.finite_or_nan(solvers.min_norm_point(gram), finite))


class CAGrad(Balancer):
    """Conflict-averse gradient descent, CAGrad (Liu, Liu, Jin, Stone and Liu, 2021).

    Liu, Liu, Jin, Stone and Liu, 2021, "Conflict-Averse Gradient Descent for Multi-task
    Learning". With the mean gradient ``g0 = sum_i g_i / T`` and ``rho = c |g0|``, the update
    maximises the worst term's improvement in a ball around ``g0``::

        d = argmax_{|d - g0| <= rho} min_i g_i . d = g0 + rho g_w / |g_w|,
        w = argmin_{w in simplex} g_w . g0 + rho |g_w|,      g_w = sum_i w_i g_i

    and, as in the authors' code and LibMTL (``rescale=1``), the update is ``d / (1 + c^2)``;
    the weights are ``u = (1/T + rho w / |g_w|) / (1 + c^2)``. In Gramian terms
    ``g_w . g0 = w'G 1/T`` and ``|g_w|^2 = w'Gw``.

    The inner problem is solved to rounding in float64: for a shift ``tau``, the min-norm
    point of the hull of ``g_i + tau g0`` (`solvers.min_norm_solution`) minimises
    ``|g_w|^2 + 2 tau g_w . g0`` over the simplex, and it is CAGrad's w when
    ``rho tau = |g_w|``. That equation has one root, which a safeguarded search finds: on the
    current face of the simplex w is affine in ``tau``, so the root on that face is a quadratic's;
    when it falls outside the bracket the step bisects (at most 64 steps; at most 5 on the
    tests' cases). A zero gradient is left out of the min (it caps ``min_i g_i . d`` at 0
    for every d, so every d is then as good; this picks the best for the other terms). If
    ``g_w = 0`` at the solution (0 in the hull, Pareto-stationary), the formula is undefined
    and every maximiser lies in the dual cone of the gradients: the update is the projection
    of ``g0`` onto that cone, the nearest maximiser (torchjd returns 0, a maximiser only when
    ``c >= 1``).

    Scale: the mean convention (``g0`` is the mean), over ``1 + c^2``: T equal gradients g give
    ``(1 + c) g / (1 + c^2)``. torchjd's ``CAGrad`` does not divide by ``1 + c^2``.

    Cost: T backward passes per step and T per-term gradients of the phase's variables held
    at once (T times their size); a few T x T min-norm solves.

    Args:
        c: the ball's radius relative to ``|g0|``, >= 0; 0 gives the mean gradient. The
            default 0.4 is the paper's choice for NYU-v2 and CityScapes (the authors' code and
            LibMTL default to 0.5).
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(
        self, c: float = 0.4, *, layer: str | None = None, representation: str | None = None
    ):
        super().__init__(layer=layer, representation=representation)
        if isinstance(c, bool) or not isinstance(c, Real) or not 0 <= c < math.inf:
            raise ValueError(f"`c` ({c!r}) must be a non-negative number.")
        self.c = float(c)

    @property
    def spec(self) -> str:
        return f"cagrad:{self.c:g}"

    def _weights(self, values, step, gram):
        del values, step
        gram, finite = solvers.float64_gramian(gram)
        weights = conflict_averse_weights(gram, self.c) / (1.0 + self.c**2)
        return Weighting(solvers.finite_or_nan(weights, finite))


def conflict_averse_weights(gram: tf.Tensor, c: float, max_steps: int = 64) -> tf.Tensor:
    """CAGrad's ``u = 1/T + rho w / |g_w|`` (before the ``1 + c^2``), float64, see `CAGrad`.

    Args:
        gram: [T, T] float64 Gramian, finite.
        c: the radius relative to ``|g0|``.
        max_steps: bound on the root search.

    Returns:
        [T] float64 weights.
    """
    count = gram.shape[-1]
    mean = tf.fill([count], tf.constant(1.0 / count, tf.float64))
    largest = tf.reduce_max(tf.linalg.diag_part(gram))
    gram = tf.math.divide_no_nan(gram, largest)  # the weights do not depend on G's scale
    along = tf.linalg.matvec(gram, mean)  # g_i . g0
    mean_squared = tf.tensordot(mean, along, 1)  # |g0|^2
    rho = c * tf.sqrt(tf.maximum(mean_squared, 0.0))
    ones = tf.ones([count, count], tf.float64)
    # A zero gradient caps min_i g_i . d at 0 for every d; leaving it out of the min picks,
    # among the maximisers, the one that is best for the other terms.
    diagonal = tf.linalg.diag_part(gram)
    zeros = tf.logical_not(diagonal > solvers.ZERO_NORM_RTOL * tf.reduce_max(diagonal))

    def evaluate(tau):
        shifted = gram + tau * (along[:, None] + along[None, :]) + tau**2 * mean_squared * ones
        weights, support = solvers.min_norm_solution(shifted, excluded=zeros)
        norm = tf.sqrt(tf.maximum(tf.tensordot(weights, tf.linalg.matvec(gram, weights), 1), 0.0))
        return weights, support, norm

    def face_root(support, low, high):
        """The root of ``rho tau = |g_w(tau)|`` if w stays on this face (else the midpoint)."""
        # On the face: G_SS w + tau a_S = nu 1, 1'w = 1, so w = w0 + tau w1 (bordered system).
        both = tf.logical_and(support[:, None], support[None, :])
        block = tf.where(both, gram, tf.eye(count, dtype=tf.float64))
        border = tf.cast(support, tf.float64)
        bordered = tf.concat(
            [
                tf.concat([block, border[:, None]], axis=1),
                tf.concat([border, tf.zeros([1], tf.float64)], axis=0)[None, :],
            ],
            axis=0,
        )
        rhs = tf.stack(
            [
                tf.concat([tf.zeros([count], tf.float64), tf.ones([1], tf.float64)], 0),
                tf.concat([-tf.where(support, along, 0.0), tf.zeros([1], tf.float64)], 0),
            ]
        )
        solutions = solvers.pseudo_solve(
            tf.broadcast_to(bordered, [2, count + 1, count + 1]), rhs, psd=False
        )
        w0 = tf.where(support, solutions[0, :count], 0.0)
        w1 = tf.where(support, solutions[1, :count], 0.0)
        a = tf.tensordot(w0, tf.linalg.matvec(gram, w0), 1)
        b = tf.tensordot(w0, tf.linalg.matvec(gram, w1), 1)
        quadratic = rho**2 - tf.tensordot(w1, tf.linalg.matvec(gram, w1), 1)
        # (rho^2 - C) tau^2 - 2 B tau - A = 0, the root where rho tau - |g_w| turns positive.
        root_disc = tf.sqrt(tf.maximum(b**2 + a * quadratic, 0.0))
        root = tf.where(
            b >= 0.0,
            tf.math.divide_no_nan(b + root_disc, quadratic),
            tf.math.divide_no_nan(-a, b - root_disc),
        )
        usable = tf.logical_and(
            tf.logical_and(b**2 + a * quadratic >= 0.0, tf.math.is_finite(root)),
            tf.logical_and(root > low, root < high),
        )
        # Bisect; while no point with |g_w| > rho tau is known (low = 0), shrink geometrically,
        # which reaches a root at 0 (a Pareto-stationary point) in a few steps.
        return tf.where(usable, root, tf.where(low > 0.0, 0.5 * (low + high), 1e-3 * high))

    def body(i, tau, low, high, weights, norm, done):
        weights, support, norm = evaluate(tau)
        gap = rho * tau - norm
        low = tf.where(gap <= 0.0, tau, low)
        high = tf.where(gap > 0.0, tau, high)
        done = tf.logical_or(
            tf.logical_and(tau > 0.0, tf.abs(gap) <= 1e-11 * (rho * tau + norm)),
            tf.logical_or(high - low <= 1e-14 * high, rho * high <= 1e-13),  # |g_w| ~ 0
        )
        return i + 1, face_root(support, low, high), low, high, weights, norm, done

    def cond(i, tau, low, high, weights, norm, done):
        del i, tau, low, high, weights, norm
        return tf.logical_not(done)

    degenerate = tf.logical_not(rho > 1e-150)  # c = 0, or g0 = 0 (or all of G zero)
    high = 1.0 / tf.where(degenerate, tf.ones_like(rho), rho)  # |g_w| <= 1 after the scaling
    zero = tf.constant(0.0, tf.float64)
    _, _, _, _, weights, norm, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), zero, zero, high, mean, zero, degenerate),
        maximum_iterations=max_steps,
    )
    moved = mean + tf.math.divide_no_nan(rho, norm) * weights
    # g_w = 0 (some combination of the gradients vanishes and F* = 0): the formula is undefined,
    # and the maximisers are the points of the ball in the dual cone of the gradients; the
    # projection of g0 onto that cone is the nearest one (torchjd returns 0 instead, which is a
    # maximiser only when c >= 1).
    stationary = tf.logical_and(tf.logical_not(degenerate), tf.logical_not(norm > 1e-12))
    return tf.cond(
        stationary,
        lambda: solvers.dual_cone_projection(gram, mean),
        lambda: tf.where(degenerate, mean, moved),
    )


def _mgda(fields: list[str]) -> MGDA:
    if fields:
        raise ValueError(
            f"takes no fields, got {len(fields)}: MGDA is now solved exactly, so the old "
            "ITERATIONS field (the number of Frank-Wolfe steps) is gone; write 'mgda'"
        )
    return MGDA()


FORMS = {
    "mgda": Form("mgda", _mgda),
    "cagrad": Form("cagrad[:C]", lambda f: CAGrad(*numbers(f, [float]))),
}
