"""Gradient surgery: methods that change the per-term gradients, returned as a mixing matrix.

Their modified gradients are linear combinations of the originals, ``g_i' = sum_k C_ik g_k``,
so each method is a function of the Gramian returning C; the update is ``sum_i g_i'``.
"""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers import solvers
from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers

FLOAT32_EPSILON = 1.1920929e-07  # the rank tolerance of the reference implementations


class PCGrad(Balancer):
    """Gradient surgery, PCGrad (Yu, Kumar, Gupta, Levine, Hausman and Finn, 2020).

    Yu, Kumar, Gupta, Levine, Hausman and Finn, 2020, "Gradient Surgery for Multi-Task
    Learning" (Algorithm 1). Each term's gradient is projected off every other term's
    original gradient it conflicts with, visiting the others in a random order drawn for that
    term (the paper's, the authors', LibMTL's and torchjd's convention: one independent
    permutation per term, per step)::

        for j in order_i (j != i):  g_i' <- g_i' - (g_i' . g_j) / |g_j|^2 g_j   if g_i' . g_j < 0
        update = sum_i g_i'

    Every ``g_i'`` stays a combination ``sum_k C_ik g_k`` of the original gradients, so the
    projections run on the Gramian in float64 (``g_i' . g_j = (C G)_ij``) and C is returned
    as the mixing (the weights stay 1). For two conflicting terms the update has a
    non-negative dot product with both (for more terms PCGrad does not promise that). The
    orders are a stateless function of (`seed`, step): the same on every replica, and the same
    when a run resumes.

    Scale: the sum convention (the authors' ``reduction="sum"``, LibMTL): terms that do not
    conflict give the plain sum of their gradients.

    Cost: T backward passes per step and T per-term gradients of the phase's variables held at once
    (T times their size); T^2 projections on the T x T Gramian.

    Args:
        seed: seed of the per-step random orders.
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(self, seed: int = 0, layer: str | None = None, representation: str | None = None):
        super().__init__(layer=layer, representation=representation)
        self.seed = int(seed)

    @property
    def spec(self) -> str:
        return f"pcgrad:{self.seed}"

    def orders(self, step: tf.Tensor) -> tf.Tensor:
        """The [T, T] int32 orders of this step: row i is the order term i visits the others in."""
        count = len(self.term_names)
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        return tf.argsort(tf.random.stateless_uniform([count, count], seed=seed), axis=-1)

    def _weights(self, values, step, gram):
        del values
        count = len(self.term_names)
        gram = tf.cast(gram, tf.float64)
        orders = self.orders(step)
        eye = tf.eye(count, dtype=tf.float64)
        rows = []
        for i in range(count):
            row = eye[i]
            for position in range(count):
                j = orders[i, position]
                column = tf.gather(gram, j, axis=1)  # g_k . g_j for every k
                dot = tf.tensordot(row, column, 1)  # g_i' . g_j
                squared = tf.gather(column, j)  # |g_j|^2
                project = tf.logical_and(dot < 0.0, tf.not_equal(j, i))
                scale = tf.where(project, tf.math.divide_no_nan(dot, squared), 0.0)
                row = row - scale * tf.one_hot(j, count, dtype=tf.float64)
            rows.append(row)
        return Weighting(tf.ones([count]), mixing=tf.cast(tf.stack(rows), tf.float32))


class AlignedMTL(Balancer):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov and Konushin, 2023).

    Senushkin, Patakin, Kuznetsov and Konushin, 2023, "Independent Component Alignment for
    Multi-Task Learning" (Algorithm 1). Aligns the per-term gradients so that they are
    orthogonal and of equal norm (a condition number of 1), from the eigendecomposition of the
    Gramian ``G = V diag(lambda) V'`` in float64, keeping the eigenvalues above
    ``max(lambda) T eps_float32`` (as the authors, LibMTL and torchjd do; rank R, smallest kept
    ``lambda_R``)::

        B = sqrt(lambda_R) V_R diag(lambda_R..1)^(-1/2) V_R'     (so (B M)(B M)' = lambda_R I_R)
        update = sum_i (B M)_i = sum_k (1'B)_k g_k

    with ``M`` the matrix whose rows are the gradients; B is returned as the mixing (the
    weights stay 1). A non-finite Gramian never reaches the eigendecomposition (which would
    raise inside the step): the mixing is then NaN, and the Trainer's finiteness check stops
    or skips the step as `on_nonfinite` says.

    Scale: the sum convention, as the authors' code and LibMTL (``alpha = B.sum(0)``):
    torchjd's default (preference vector 1/T) is this divided by T.

    Cost: T backward passes per step and T per-term gradients of the phase's variables held at once
    (T times their size); one T x T eigendecomposition.

    Args:
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(self, layer: str | None = None, representation: str | None = None):
        super().__init__(layer=layer, representation=representation)

    @property
    def spec(self) -> str:
        return "aligned_mtl"

    def _weights(self, values, step, gram):
        del values, step
        count = len(self.term_names)
        gram, finite = solvers.float64_gramian(gram)
        eigenvalues, vectors = tf.linalg.eigh(gram)
        largest = tf.reduce_max(eigenvalues)
        kept = eigenvalues > largest * float(count) * FLOAT32_EPSILON
        smallest = tf.reduce_min(tf.where(kept, eigenvalues, largest))
        inverse_sqrt = tf.where(kept, tf.math.rsqrt(tf.where(kept, eigenvalues, 1.0)), 0.0)
        b = tf.sqrt(tf.maximum(smallest, 0.0)) * tf.matmul(
            vectors * inverse_sqrt[None, :], vectors, transpose_b=True
        )
        return Weighting(tf.ones([count]), mixing=solvers.finite_or_nan(b, finite))


FORMS = {
    "pcgrad": Form("pcgrad[:SEED]", lambda f: PCGrad(*numbers(f, [int]))),
    "aligned_mtl": Form("aligned_mtl", lambda f: AlignedMTL(*numbers(f, []))),
}
