"""Small exact solvers on the T x T Gramian, run inside the compiled step.

Every gradient balancer is a function of the Gramian ``G_ij = g_i . g_j`` of the per-term
gradients; several of them need the same small problems solved exactly, for T = 1..16 terms:

* `nonnegative_least_squares`: ``min_{s >= 0} s'Ms - 2 q's`` for a PSD M, by Lawson and
  Hanson's active-set method (1974, "Solving Least Squares Problems", ch. 23) on the normal
  equations, the form Bro and de Jong (1997) use. It is exact: it stops when the KKT conditions
  hold to a relative tolerance, after at most `max_iterations` active-set changes.
* `min_norm_point`: the min-norm point of the convex hull, ``min_{w in simplex} w'Gw`` (MGDA,
  the inner problem of CAGrad), reduced to one NNLS.
* `dual_cone_projection`: ``min_v v'Gv  s.t. v >= u``, the weights of the projection of
  ``sum_i u_i g_i`` onto the dual cone ``{x : g_i . x >= 0 for all i}`` (UPGrad, DualProj),
  also one NNLS; batched over several u.
* `pseudo_solve`: the least-norm solution of a symmetric system, from its eigendecomposition.
* `alpha_fair_weights`: the w > 0 with ``G w = w^(-1/alpha)`` (Nash-MTL for alpha = 1, FairGrad),
  by damped Newton steps on a convex function, to a duality-gap bound on the update's error.

Conventions. The algebra is float64 (`float64_gramian` casts, symmetrises and replaces a
non-finite Gramian by zeros, so that `tf.linalg.eigh` never sees one: the caller turns the
result into NaN with `finite_or_nan`, and the Trainer's own finiteness check then stops or skips
the step). The solvers return float64; the balancers cast their weights to float32. Where a
problem does not change when one gradient is rescaled (the dual cone), it is solved on the
unit-diagonal Gramian (`unit_gramian`), so that a gradient 1e-6 the size of the others counts
as much as they do; where it is invariant to a common scale (the min-norm point), on G divided
by its largest diagonal entry. Zero gradients (and an all-zero G) give finite results. Every
loop is a `tf.while_loop` with a static bound, deterministic, with no host round trip.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

__all__ = [
    "EIGEN_RTOL",
    "ZERO_NORM_RTOL",
    "FairSolution",
    "alpha_fair_weights",
    "dual_cone_projection",
    "finite_or_nan",
    "float64_gramian",
    "min_norm_point",
    "min_norm_solution",
    "nonnegative_least_squares",
    "pseudo_solve",
    "unit_gramian",
]

# Relative threshold below which an eigenvalue counts as zero in `pseudo_solve`, and below which
# a squared gradient norm counts as zero against the largest (a norm ratio of 1e-12).
EIGEN_RTOL = 1e-13
ZERO_NORM_RTOL = 1e-24


def float64_gramian(gram: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Casts a Gramian to float64, symmetrised, with a non-finite one replaced by zeros.

    Args:
        gram: [T, T] Gramian, any float dtype.

    Returns:
        (the [T, T] float64 Gramian, a bool scalar: whether every entry of `gram` was finite).
    """
    gram = tf.cast(gram, tf.float64)
    finite = tf.reduce_all(tf.math.is_finite(gram))
    gram = tf.where(finite, gram, tf.zeros_like(gram))
    return 0.5 * (gram + tf.transpose(gram)), finite


def finite_or_nan(values: tf.Tensor, finite: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    """`values` cast to `dtype`, or NaN everywhere where the input was not `finite`."""
    values = tf.cast(values, dtype)
    return tf.where(finite, values, tf.fill(tf.shape(values), tf.constant(float("nan"), dtype)))


def unit_gramian(gram: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The Gramian of the unit gradients, ``D^-1 G D^-1`` with ``D = diag(|g_i|)``.

    A gradient whose squared norm is below `ZERO_NORM_RTOL` times the largest counts as zero: its
    row and column are 0 (diagonal included) and its norm is returned as 0.

    Args:
        gram: [T, T] float64 Gramian.

    Returns:
        (the [T, T] unit Gramian, with 1 on the diagonal of every nonzero gradient; the [T]
        norms ``|g_i|``, 0 for zero gradients).
    """
    diagonal = tf.linalg.diag_part(gram)
    nonzero = diagonal > ZERO_NORM_RTOL * tf.reduce_max(diagonal)
    norms = tf.where(nonzero, tf.sqrt(tf.where(nonzero, diagonal, 1.0)), 0.0)
    inverse = tf.math.divide_no_nan(tf.ones_like(norms), norms)
    unit = gram * inverse[:, None] * inverse[None, :]
    unit = tf.clip_by_value(unit, -1.0, 1.0)  # |cosine| <= 1, whatever the rounding
    return tf.linalg.set_diag(unit, tf.cast(nonzero, gram.dtype)), norms


def pseudo_solve(
    matrix: tf.Tensor, rhs: tf.Tensor, rtol: float = EIGEN_RTOL, *, psd: bool = True
) -> tf.Tensor:
    """The least-norm solution of ``matrix x = rhs`` for symmetric matrices (batched).

    ``x = V diag(1 / lambda_k  if lambda_k is kept, else 0) V' rhs``, keeping the eigenvalues
    above ``rtol max|lambda|``: for a PSD matrix (`psd`) the negative ones (rounding) count as
    zero too; for an indefinite one (a KKT matrix) the test is on ``|lambda_k|``.

    Args:
        matrix: [..., T, T] symmetric, finite.
        rhs: [..., T].
        rtol: relative eigenvalue threshold.
        psd: whether `matrix` is PSD up to rounding.

    Returns:
        [..., T].
    """
    eigenvalues, vectors = tf.linalg.eigh(matrix)
    largest = tf.reduce_max(tf.abs(eigenvalues), axis=-1, keepdims=True)
    kept = (eigenvalues if psd else tf.abs(eigenvalues)) > rtol * largest
    inverse = tf.where(kept, 1.0 / tf.where(kept, eigenvalues, 1.0), 0.0)
    coordinates = tf.linalg.matvec(vectors, rhs, transpose_a=True)
    return tf.linalg.matvec(vectors, inverse * coordinates)


def _masked_solve(matrix: tf.Tensor, rhs: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Solves ``M_PP z_P = rhs_P`` on each problem's set P (`mask`), with ``z = 0`` off P."""
    count = matrix.shape[-1]
    both = tf.logical_and(mask[:, :, None], mask[:, None, :])
    # The unused block is a multiple of the identity at the matrix's scale, so that it does
    # not move the eigenvalue threshold of the block that is solved.
    scale = tf.reduce_max(tf.linalg.diag_part(matrix), axis=-1)
    scale = tf.where(scale > 0.0, scale, 1.0)[:, None, None]
    filled = tf.where(both, matrix, scale * tf.eye(count, dtype=matrix.dtype))
    solution = pseudo_solve(filled, tf.where(mask, rhs, 0.0))
    return tf.where(mask, solution, 0.0)


def nonnegative_least_squares(
    matrix: tf.Tensor,
    target: tf.Tensor,
    *,
    max_iterations: int | None = None,
    rtol: float = 1e-12,
    excluded: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Solves ``min_{s >= 0} s'Ms - 2 q's`` (NNLS in normal-equations form), batched.

    With ``M = A'A`` and ``q = A'b`` this is ``min_{s >= 0} |As - b|^2``. Lawson and Hanson's
    active-set method: grow the passive set P by the index of the largest ``w = q - Ms`` (minus
    half the gradient); solve the unconstrained problem on P; while that solution has entries
    <= 0, step back toward it until the first one reaches 0 and drop it. It stops when every
    ``w_j`` off P is at most ``rtol (max|q| + max|M| max|s|)``: then ``s >= 0``,
    ``w_P = 0`` (to rounding) and ``w <= tol`` off P, the KKT conditions. An index whose own
    solve gives it a non-positive value (rounding in a nearly singular M) is blocked until
    the solution next changes, which prevents cycling.

    Args:
        matrix: [T, T] or [B, T, T] symmetric PSD, float64, finite.
        target: [B, T] float64 (q), one row per problem.
        max_iterations: bound on the loop (one solve per iteration); default 10 T + 10 (the
            min-norm and dual-cone problems of up to 16 random gradients took at most T + 4).
        rtol: the relative KKT tolerance above.
        excluded: None, or [T] or [B, T] bool: indices held at ``s_i = 0`` (never passive).

    Returns:
        (the [B, T] solution s; the [B, T] bool passive set, where s > 0; a [B] bool: True
        where the KKT conditions were met within `max_iterations`).
    """
    target = tf.convert_to_tensor(target, tf.float64)
    count = target.shape[-1]
    batch = tf.shape(target)[0]
    matrix = tf.convert_to_tensor(matrix, tf.float64)
    if matrix.shape.rank == 2:
        matrix = tf.broadcast_to(matrix, [batch, count, count])
    if max_iterations is None:
        max_iterations = 10 * count + 10
    excluded = tf.zeros([batch, count], tf.bool) if excluded is None else excluded
    excluded = tf.broadcast_to(excluded, [batch, count])
    target_scale = tf.reduce_max(tf.abs(target), axis=-1)
    matrix_scale = tf.reduce_max(tf.abs(matrix), axis=[-2, -1])

    def body(iteration, s, passive, blocked, pending, last, done):
        # 1. Problems whose passive set changed: solve on it, accept or step back.
        z = _masked_solve(matrix, target, passive)
        infeasible = tf.logical_and(passive, z <= 0.0)
        accept = tf.logical_and(pending, tf.logical_not(tf.reduce_any(infeasible, axis=-1)))
        retreat = tf.logical_and(pending, tf.reduce_any(infeasible, axis=-1))
        ratios = tf.where(infeasible, tf.math.divide_no_nan(s, s - z), tf.float64.max)
        alpha = tf.where(retreat, tf.reduce_min(ratios, axis=-1), 0.0)
        first = tf.one_hot(tf.argmin(ratios, axis=-1), count, on_value=True, off_value=False)
        stepped = s + alpha[:, None] * (z - s)
        removed = tf.logical_and(passive, tf.logical_or(stepped <= 0.0, first))
        kept = tf.logical_and(passive, tf.logical_not(removed))
        stepped = tf.where(kept, stepped, 0.0)
        stuck = tf.logical_and(removed, (alpha <= 0.0)[:, None])
        # The solution moved past the last added index: the blocked ones may be tried again.
        unblock = tf.logical_and(
            tf.logical_and(accept, tf.reduce_any(tf.logical_and(passive, last), axis=-1))[:, None],
            tf.logical_not(excluded),
        )
        s = tf.where(accept[:, None], z, tf.where(retreat[:, None], stepped, s))
        passive = tf.where(retreat[:, None], kept, passive)
        blocked = tf.logical_and(
            tf.logical_or(blocked, tf.logical_and(retreat[:, None], stuck)),
            tf.logical_not(unblock),
        )
        pending = retreat
        # 2. Problems at the solution of their passive set: stop, or add the best index.
        ready = tf.logical_and(tf.logical_not(pending), tf.logical_not(done))
        w = target - tf.linalg.matvec(matrix, s)
        tolerance = rtol * (target_scale + matrix_scale * tf.reduce_max(tf.abs(s), axis=-1))
        candidates = tf.logical_and(
            ready[:, None],
            tf.logical_and(tf.logical_not(tf.logical_or(passive, blocked)), w > tolerance[:, None]),
        )
        add = tf.reduce_any(candidates, axis=-1)
        best = tf.argmax(tf.where(candidates, w, -tf.float64.max), axis=-1)
        chosen = tf.logical_and(
            tf.one_hot(best, count, on_value=True, off_value=False), add[:, None]
        )
        passive = tf.logical_or(passive, chosen)
        last = tf.where(add[:, None], chosen, last)
        pending = tf.logical_or(pending, add)
        done = tf.logical_or(done, tf.logical_and(ready, tf.logical_not(add)))
        return iteration + 1, s, passive, blocked, pending, last, done

    def cond(iteration, s, passive, blocked, pending, last, done):
        del s, passive, blocked, pending, last
        return tf.logical_and(iteration < max_iterations, tf.logical_not(tf.reduce_all(done)))

    falses = tf.zeros([batch, count], tf.bool)
    _, s, passive, _, _, _, done = tf.while_loop(
        cond,
        body,
        (
            tf.constant(0),
            tf.zeros([batch, count], tf.float64),
            falses,
            excluded,
            tf.zeros([batch], tf.bool),
            falses,
            tf.zeros([batch], tf.bool),
        ),
        maximum_iterations=max_iterations,
    )
    return s, passive, done


def min_norm_point(gram: tf.Tensor, *, max_iterations: int | None = None) -> tf.Tensor:
    """The weights of the min-norm point of the convex hull of the gradients.

    Solves ``min_{w in simplex} w'Gw`` exactly through one NNLS: with ``M = G + 11'`` and
    ``q = 1``, the NNLS solution s gives ``w = s / 1's``, because its KKT conditions
    ``(G s)_i + 1's - 1 >= 0`` (equality where ``s_i > 0``) are, divided by ``1's``, those of
    the min-norm problem, ``(G w)_i >= w'Gw`` (equality on the support). G is first divided by
    its largest diagonal entry (w does not change). An all-zero G gives the uniform weights.

    Args:
        gram: [T, T] float64 Gramian, finite (see `float64_gramian`).
        max_iterations: bound on the NNLS loop (default 10 T + 10).

    Returns:
        [T] float64 weights, non-negative, summing to 1.
    """
    return min_norm_solution(gram, max_iterations=max_iterations)[0]


def min_norm_solution(
    gram: tf.Tensor, *, max_iterations: int | None = None, excluded: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """`min_norm_point` over the hull of the gradients not `excluded` ([T] bool, or None).

    Returns:
        (the [T] float64 weights, 0 where excluded; the [T] bool support of the weights).
    """
    count = gram.shape[-1]
    largest = tf.reduce_max(tf.linalg.diag_part(gram))
    scaled = tf.math.divide_no_nan(gram, largest)
    s, support, _ = nonnegative_least_squares(
        scaled + 1.0,
        tf.ones([1, count], tf.float64),
        max_iterations=max_iterations,
        excluded=None if excluded is None else excluded[None, :],
    )
    weights = tf.math.divide_no_nan(s[0], tf.reduce_sum(s[0]))  # 0 if all are excluded
    zero = tf.logical_and(tf.logical_not(largest > 0.0), excluded is None)
    weights = tf.where(zero, tf.fill([count], tf.constant(1.0 / count, tf.float64)), weights)
    return weights, tf.logical_or(support[0], zero)


def dual_cone_projection(
    gram: tf.Tensor, u: tf.Tensor, *, max_iterations: int | None = None
) -> tf.Tensor:
    """Solves ``min_v v'Gv  s.t.  v >= u``, for each row of u.

    ``sum_i v_i g_i`` is then the projection of ``sum_i u_i g_i`` onto the dual cone of the
    gradients ``{x : g_i . x >= 0 for all i}`` (Quinton and Rey 2024, Proposition 1). The cone
    does not change when a gradient is rescaled, so the problem is solved on the unit Gramian
    ``D^-1 G D^-1`` in ``v_hat = D v`` (``v_hat >= D u``), as an NNLS in ``s = v_hat - D u``
    (``M = unit``, ``q = -unit D u``); ``v = D^-1 v_hat``. A zero gradient constrains nothing:
    its entry is returned as ``u_i``.

    Args:
        gram: [T, T] float64 Gramian, finite.
        u: [T] or [B, T] float64: the combination(s) to project.
        max_iterations: bound on the NNLS loop (default 10 T + 10).

    Returns:
        v, shaped like u, float64: ``v >= u``, ``G v >= 0`` and ``(G v)_i (v_i - u_i) = 0``.
    """
    u = tf.cast(u, tf.float64)
    single = u.shape.rank == 1
    rows = u[None, :] if single else u
    unit, norms = unit_gramian(gram)
    lower = rows * norms[None, :]
    s, _, _ = nonnegative_least_squares(
        unit, -tf.linalg.matvec(unit, lower), max_iterations=max_iterations
    )
    nonzero = (norms > 0.0)[None, :]
    v = tf.where(nonzero, tf.math.divide_no_nan(lower + s, norms[None, :]), rows)
    return v[0] if single else v


_EPS64 = 2.220446049250313e-16  # float64 machine epsilon


class FairSolution(NamedTuple):
    """What `alpha_fair_weights` returns.

    Attributes:
        weights: [T] float64 weights ``w > 0`` (0 for zero gradients; all 0 when `stationary`).
        converged: bool scalar: the tolerance was met within the iteration bound.
        stationary: bool scalar: no usable solution (the gradients are Pareto-stationary).
        iterations: int32 scalar: Newton steps taken.
    """

    weights: tf.Tensor
    converged: tf.Tensor
    stationary: tf.Tensor
    iterations: tf.Tensor


def alpha_fair_weights(
    gram: tf.Tensor,
    alpha: float = 1.0,
    *,
    tolerance: float = 1e-8,
    max_iterations: int = 100,
    max_cancellation: float = 1e3,
) -> FairSolution:
    """Solves ``G w = w^(-1/alpha)``, w > 0: the alpha-fair update ``d = sum_i w_i g_i``.

    ``(G w)_i = g_i . d`` is term i's first-order gain from the update; the system makes each
    gain ``w_i^(-1/alpha)``. alpha = 1 is Nash-MTL's bargaining solution ``w_i (G w)_i = 1``
    (Navon et al. 2022); general alpha is FairGrad's (Ban and Ji 2024). It is the stationarity
    condition of the strictly convex

        phi(w) = 1/2 w'Gw - sum_i h(w_i),   h(x) = log x (p = 1), x^(1-p) / (1-p),  p = 1/alpha,

    minimised here by Newton's method in the unit variables ``b_i = |g_i| w_i`` (the Gramian
    of the unit gradients C, projected onto the PSD cone; the system becomes
    ``C b = e * b^-p`` with ``e_i = |g_i|^(p-1)``). Each step solves the Jacobi-scaled Newton
    system in ``u = log b`` (by eigendecomposition, never singular) and moves each ``b_i`` by
    ``1 + t du_i`` if it grows, ``1 / (1 - t du_i)`` if it shrinks, so that b stays positive
    without a step-to-the-boundary rule; t halves until phi decreases (Armijo, with an
    allowance for rounding). It stops when the duality gap bounds the update's error:
    ``phi(b) - phi(b*) >= |d - d*|^2 / 2`` and the gap is ``sum_i a_i Gamma(z_i)`` with
    ``z_i = b_i^p (C b)_i / e_i`` (1 at the solution), ``a_i = e_i b_i^(1-p)``,
    ``Gamma(z) = z - 1 - log z`` (p = 1) or ``z - 1/(1-p) + p/(1-p) z^(1 - 1/p)``; the test
    ``2 gap <= tolerance^2 |d|^2 + 2 r`` makes the returned update's direction exact to
    `tolerance`, whatever the weights of the terms that barely count. r is what float64
    rounding of the gains ``(C b)_i`` (to ``delta_i = 4 eps T (|C| b)_i``) can change in the
    gap, ``sum_i a_i |z_i Gamma'(z_i)| min(1, delta_i / (C b)_i)``: it matters only where a
    gain is a small difference of large parts. It typically takes 3 to 10 steps (up to about
    40 for alpha >= 10 with gradients 1e6 apart in size).

    A zero gradient (squared norm at most `ZERO_NORM_RTOL` times the largest) takes no part
    and gets weight 0; all-zero gradients give all-zero weights. The system has a solution
    only if no convex combination of the (nonzero) gradients is zero. When it has none, or
    its solution cancels more than `max_cancellation` in ``sum_i b_i / |sum_i b_i g_i/|g_i||``
    (the update would be the small difference of large weighted gradients, the float32
    gradients' rounding in its direction), the gradients count as Pareto-stationary: every
    weight is 0 (no update), as MGDA's min-norm point is 0 there.

    Args:
        gram: [T, T] float64 Gramian, finite (see `float64_gramian`).
        alpha: > 0; 1 for Nash-MTL.
        tolerance: the update direction's accuracy (relative).
        max_iterations: bound on the Newton steps.
        max_cancellation: the cancellation beyond which the gradients count as stationary.

    Returns:
        A `FairSolution`.

    Raises:
        ValueError: if `alpha` is not positive.
    """
    if not alpha > 0:
        raise ValueError(f"`alpha` ({alpha!r}) must be positive.")
    p = 1.0 / float(alpha)
    count = gram.shape[-1]
    inf = tf.constant(float("inf"), tf.float64)
    unit, norms = unit_gramian(gram)
    present = norms > 0.0
    mask = tf.cast(present, tf.float64)
    both = tf.logical_and(present[:, None], present[None, :])
    eigenvalues, vectors = tf.linalg.eigh(unit)
    unit = tf.matmul(vectors * tf.maximum(eigenvalues, 0.0)[None, :], vectors, transpose_b=True)
    # Zero gradients: rows of the identity, so that their b stays 1 and apart from the rest.
    unit = tf.where(both, unit, tf.eye(count, dtype=tf.float64))
    log_e = tf.where(present, (p - 1.0) * tf.math.log(tf.where(present, norms, 1.0)), 0.0)
    e = tf.exp(log_e)

    def objective(beta):
        """phi at each row of beta ([K, T] -> [K]), and the size of its parts."""
        log_beta = tf.math.log(beta)
        h = log_beta if p == 1.0 else tf.exp((1.0 - p) * log_beta) / (1.0 - p)
        quadratic = 0.5 * tf.reduce_sum(beta * tf.linalg.matvec(unit, beta), axis=-1)
        concave = tf.reduce_sum(mask * e * h, axis=-1)
        return quadratic - concave, quadratic + tf.abs(concave)

    def status(beta):
        """(converged, cancellation, C beta) at beta."""
        log_beta = tf.math.log(beta)
        gains = tf.linalg.matvec(unit, beta)
        squared = tf.maximum(tf.reduce_sum(mask * beta * gains), 0.0)
        log_z = p * log_beta + tf.math.log(tf.maximum(gains, 0.0)) - log_e
        if p == 1.0:
            gamma = tf.math.expm1(log_z) - log_z
        else:
            gamma = tf.math.expm1(log_z) + p / (1.0 - p) * tf.math.expm1((1.0 - 1.0 / p) * log_z)
        terms = tf.where(tf.math.is_inf(gamma), inf, tf.exp(log_e + (1.0 - p) * log_beta) * gamma)
        if p <= 1.0:  # the gap is infinite unless every gain is positive
            terms = tf.where(gains > 0.0, terms, inf)
        gap = tf.reduce_sum(tf.where(present, terms, 0.0))
        # What rounding alone can change in the gap: gain i is known to about delta_i, which
        # moves its term by a_i z Gamma'(z) delta_i / gain_i (Gamma'(z) = 1 - z^(-1/p)).
        delta = 4.0 * _EPS64 * count * tf.linalg.matvec(tf.abs(unit), beta)
        ratio = tf.where(gains > delta, delta / tf.where(gains > delta, gains, 1.0), 1.0)
        slope = tf.abs(tf.math.expm1(log_z) - tf.math.expm1((1.0 - 1.0 / p) * log_z))
        slope = tf.where(tf.math.is_finite(slope), slope, 0.0)
        rounding = tf.exp(log_e + (1.0 - p) * log_beta) * slope * ratio
        rounding = tf.reduce_sum(tf.where(present, rounding, 0.0))
        converged = 2.0 * gap <= tolerance**2 * squared + 2.0 * rounding
        cancellation = tf.reduce_sum(mask * beta) / tf.sqrt(tf.maximum(squared, 1e-300))
        return converged, cancellation, gains

    steps = 0.5 ** tf.range(30, dtype=tf.float64)

    def body(iteration, beta, done):
        converged, cancellation, gains = status(beta)
        stop = tf.logical_or(converged, cancellation > 100.0 * max_cancellation)  # diverging
        need = e * tf.exp(-p * tf.math.log(beta))
        gradient = mask * beta * (gains - need)  # d phi / d log(beta)
        hessian = beta[:, None] * unit * beta[None, :] + tf.linalg.diag(p * need * beta)
        scale = tf.math.rsqrt(tf.linalg.diag_part(hessian))
        curvatures, vectors = tf.linalg.eigh(scale[:, None] * hessian * scale[None, :])
        curvatures = tf.maximum(curvatures, 1e-15 * tf.reduce_max(curvatures))
        coordinates = tf.linalg.matvec(vectors, scale * gradient, transpose_a=True)
        du = -scale * tf.linalg.matvec(vectors, coordinates / curvatures)
        decrease = -tf.reduce_sum(gradient * du)
        t = steps[:, None]
        candidates = beta * tf.where(du >= 0.0, 1.0 + t * du, 1.0 / (1.0 - t * du))
        value, size = objective(beta[None, :])
        values, _ = objective(candidates)
        accept = values <= value - 1e-4 * steps * decrease + 1e-13 * size
        first = tf.where(tf.reduce_any(accept), tf.argmax(accept), steps.shape[0] - 1)
        new = tf.clip_by_value(tf.gather(candidates, first), 1e-150, 1e150)
        return iteration + 1, tf.where(stop, beta, new), stop

    # Start on the ray b = c 1 at the minimum of phi along it.
    terms = tf.reduce_sum(mask)
    ones = tf.reduce_sum(mask * tf.linalg.matvec(unit, mask))
    log_start = tf.math.log(tf.maximum(tf.reduce_sum(mask * e), 1e-300)) - tf.math.log(
        tf.maximum(ones, 1e-8 * terms)
    )
    start = tf.where(terms > 0.0, tf.exp(log_start / (1.0 + p)), 1.0)
    iterations, beta, _ = tf.while_loop(
        lambda iteration, beta, done: tf.logical_and(
            iteration < max_iterations, tf.logical_not(done)
        ),
        body,
        (tf.constant(0), tf.fill([count], start), terms <= 0.0),
        maximum_iterations=max_iterations,
    )
    converged, cancellation, _ = status(beta)
    stationary = tf.logical_and(terms > 0.0, cancellation > max_cancellation)
    used = tf.logical_and(present, tf.logical_not(stationary))
    weights = tf.where(used, beta / tf.where(present, norms, 1.0), 0.0)
    return FairSolution(weights, tf.logical_or(converged, terms <= 0.0), stationary, iterations)
