"""Gradient surgery: methods that change the per-term gradients, returned as a mixing matrix.

Their modified gradients are linear combinations of the originals, ``g_i' = sum_k C_ik g_k``,
so each method is a function of the Gramian returning C; the update is ``sum_i g_i'``.
"""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers


class PCGrad(Balancer):
    """Gradient surgery, PCGrad (Yu, Kumar, Gupta, Levine, Hausman and Finn, 2020).

    Each term's gradient is projected off every other term's gradient it conflicts with, in a
    random order of the others (one order per step)::

        g_i' <- g_i' - (g_i' . g_j) / |g_j|^2 g_j     if g_i' . g_j < 0
        update = sum_i g_i'

    Every ``g_i'`` stays a combination ``sum_k C_ik g_k`` of the original gradients, so the
    projections run on the Gramian (``g_i' . g_j = (C G)_ij``) and C is returned as the
    mixing (the weights stay 1). For two conflicting terms the update has a non-negative dot
    product with both. The order is a stateless function of (`seed`, step): the same on every
    replica.

    Args:
        seed: seed of the per-step random order.
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(self, seed: int = 0, layer: str | None = None):
        super().__init__(layer=layer)
        self.seed = int(seed)

    @property
    def spec(self) -> str:
        return f"pcgrad:{self.seed}"

    def _weights(self, values, step, gram):
        del values
        count = len(self.term_names)
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        order = tf.argsort(tf.random.stateless_uniform([count], seed=seed))
        eye = tf.eye(count)
        rows = []
        for i in range(count):
            row = eye[i]
            for position in range(count):
                j = order[position]
                column = tf.gather(gram, j, axis=1)  # g_k . g_j for every k
                dot = tf.tensordot(row, column, 1)  # g_i' . g_j
                squared = tf.gather(column, j)  # |g_j|^2
                project = tf.logical_and(dot < 0.0, tf.not_equal(j, i))
                scale = tf.where(project, tf.math.divide_no_nan(dot, squared), 0.0)
                row = row - scale * tf.one_hot(j, count)
            rows.append(row)
        return Weighting(tf.ones([count]), mixing=tf.stack(rows))


class AlignedMTL(Balancer):
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov and Konushin, 2023).

    Aligns the per-term gradients so that they are orthogonal and of equal norm (a condition
    number of 1), from the eigendecomposition of the Gramian ``G = V diag(lambda) V'``, keeping
    the eigenvalues above ``max(lambda) T eps`` (rank R, smallest kept ``lambda_R``)::

        B = sqrt(lambda_R) V_R diag(lambda_R..1)^(-1/2) V_R'     (so (B M)(B M)' = lambda_R I_R)
        update = sum_i (B M)_i = sum_k (1'B)_k g_k

    with ``M`` the matrix whose rows are the gradients; B is returned as the mixing (the
    weights stay 1), as in the authors' code with uniform task weights.

    Args:
        layer: take the Gramian over this layer's variables only (None: the phase's).
    """

    needs_gradients = True

    def __init__(self, layer: str | None = None):
        super().__init__(layer=layer)

    @property
    def spec(self) -> str:
        return "aligned_mtl"

    def _weights(self, values, step, gram):
        del values, step
        count = len(self.term_names)
        gram = 0.5 * (gram + tf.transpose(gram))
        eigenvalues, vectors = tf.linalg.eigh(gram)
        tolerance = tf.reduce_max(eigenvalues) * float(count) * 1.1920929e-07
        kept = eigenvalues > tolerance
        smallest = tf.reduce_min(tf.where(kept, eigenvalues, tf.reduce_max(eigenvalues)))
        inverse_sqrt = tf.where(kept, tf.math.rsqrt(tf.where(kept, eigenvalues, 1.0)), 0.0)
        b = tf.sqrt(tf.maximum(smallest, 0.0)) * tf.matmul(
            vectors * inverse_sqrt[None, :], vectors, transpose_b=True
        )
        return Weighting(tf.ones([count]), mixing=b)


FORMS = {
    "pcgrad": Form("pcgrad[:SEED]", lambda f: PCGrad(*numbers(f, [int]))),
    "aligned_mtl": Form("aligned_mtl", lambda f: AlignedMTL(*numbers(f, []))),
}
