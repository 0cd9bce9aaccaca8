"""Balancers that weigh terms by their gradients' magnitudes: GradNorm and DB-MTL."""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers

POSITIVE = "every term > 0"


class GradNorm(Balancer):
    """GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, 2018, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks").

    With ``n_i = |g_i|`` over the target layer (``G_ii``), ``L_i(0)`` the first applied step's
    values, the relative inverse training rate ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``
    and the learned weights ``w_i``::

        L_grad = sum_i | w_i n_i - Gbar r_i^alpha |,   Gbar = mean_j(w_j n_j)  (held constant)
        w_i   <- w_i - learning_rate * sign(w_i n_i - Gbar r_i^alpha) n_i / Gbar,
                 then renormalised so that sum_i w_i = T (and w_i >= 1e-4)

    A term that trains slower than the others (large ``r_i``) gains weight. The update uses this
    step's ``w``; the new ``w`` serves the next step.

    Conventions: the weights sum to T (the paper's renormalisation; equal weights are all 1,
    the plain sum). The paper updates ``w`` with the network's optimizer; here each applied
    step takes a plain gradient step of `learning_rate` on ``L_grad / Gbar``, which makes the
    step independent of the gradients' scale. LibMTL parametrises ``w = T softmax(xi)``, trains
    ``xi`` with the network's optimizer, starts after the first epoch and takes ``L_i(0)`` as
    that epoch's mean; here ``L_i(0)`` is the first applied step's value.

    Precondition: every term > 0 (``r_i`` divides by ``L_i(0)`` and raises the ratio to the
    power alpha: a term that starts at 0 would keep a rate of 0, one that crosses 0 would give
    NaN). A step that breaks it is reported through `Weighting.valid` and leaves the weights and
    ``L_i(0)`` as they were.

    Cost: T backward passes per step (the Trainer's per-term gradients); 2 T + 1 floats of state.

    Args:
        alpha: strength of the pull toward equal training rates (the paper uses 0.12 to 3).
        learning_rate: step size of the weights' update.
        layer: the last shared layer's name (None: all of the phase's variables).
    """

    needs_gradients = True
    precondition = POSITIVE

    def __init__(
        self,
        alpha: float = 1.5,
        learning_rate: float = 0.025,
        layer: str | None = None,
        representation: str | None = None,
    ):
        super().__init__(layer=layer, representation=representation)
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
        started = self.started > 0.0
        initial = tf.where(started, self.initial, values)
        valid = tf.logical_and(values > 0.0, initial > 0.0)
        ok = tf.reduce_all(valid)
        safe_values = tf.where(ok, values, tf.ones_like(values))  # no NaN, even in the graph
        safe_initial = tf.where(ok, initial, tf.ones_like(initial))
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(tf.cast(gram, tf.float32)), 0.0))
        ratios = safe_values / safe_initial
        rates = ratios / tf.reduce_mean(ratios)
        weighted_norms = weights * norms
        mean_norm = tf.reduce_mean(weighted_norms)
        target = mean_norm * tf.pow(rates, self.alpha)  # a constant
        step_size = tf.math.divide_no_nan(self.learning_rate * norms, mean_norm)
        new = weights - step_size * tf.sign(weighted_norms - target)
        new = tf.maximum(new, 1e-4)
        new = new * (float(len(self.term_names)) / tf.reduce_sum(new))
        updates = (
            (self.task_weights, tf.where(ok, new, weights)),
            (self.initial, tf.where(ok, initial, self.initial)),
            (self.started, tf.where(ok, 1.0, self.started)),
        )
        return Weighting(weights, updates, valid=valid)


class DBMTL(Balancer):
    """Dual-Balancing Multi-Task Learning, DB-MTL (Lin, Ye, Xu, Shi and Zhang, 2023,
    "Dual-Balancing Multi-Task Learning"), as LibMTL's `DB_MTL` computes it.

    Loss scale: each term enters through its logarithm, ``log(L_i + 1e-8)``, whose gradient is
    ``g_i / (L_i + 1e-8)``. Gradient magnitude: an exponential moving average of those
    gradients, per term, is rescaled to the largest one's norm, and the update is their sum::

        m_i <- beta m_i + (1 - beta) g_i / (L_i + 1e-8)          (m_i = 0 before the first step)
        update = sum_i (max_j |m_j| / (|m_i| + 1e-8)) m_i

    so every term moves the parameters by the same amount, in the direction of its averaged
    log-loss gradient. The moving average is LibMTL's, without bias correction (its
    `DB_beta_sigma` = 0: a constant beta). g_i is the gradient of the schedule-weighted term,
    so a schedule weight s_i scales ``m_i`` (it cancels in the rescaling, except that s_i = 0
    removes the term).

    Conventions: the sum convention (each term's share has the norm ``max_j |m_j|``, as in
    LibMTL). LibMTL applies this to the shared parameters only (the task-specific ones get the
    plain sum of the log-losses' gradients) and takes the norms over them; here it applies to
    every variable of the phase, norms over all of them. `weights` (logged as
    ``weight/<term>``) are the coefficients of this step's gradients in the update,
    ``(1 - beta) max_j |m_j| / ((|m_i| + 1e-8) (L_i + 1e-8))``; the update also carries the
    averaged past gradients.

    Precondition: every term > 0 (the logarithms); a step that breaks it is reported through
    `Weighting.valid` and leaves the averages as they were.

    Cost: T backward passes per step; T copies of the phase's gradient as state (T floats per
    parameter, checkpointed).

    Args:
        beta: the moving average's decay, in [0, 1) (LibMTL's default 0.9).
    """

    needs_gradients = True
    needs_stacks = True
    precondition = POSITIVE

    def __init__(self, beta: float = 0.9):
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` ({beta!r}) must be in [0, 1).")
        self.beta = float(beta)

    @property
    def spec(self) -> str:
        return f"db_mtl:{self.beta:g}"

    def _build_stacks(self, count, shapes):
        self.averages = [
            self._state(f"average_{k}", tf.zeros([count, shape.num_elements()]))
            for k, shape in enumerate(shapes)
        ]

    def _weights(self, values, step, gram, stacks):
        del step, gram
        if len(stacks) != len(self.averages):
            raise ValueError(
                f"DBMTL was built for {len(self.averages)} variables, got {len(stacks)} stacks."
            )
        valid = values > 0.0
        ok = tf.reduce_all(valid)
        shifted = values + 1e-8
        averages = [
            self.beta * average + (1.0 - self.beta) * stack / shifted[:, None]
            for average, stack in zip(self.averages, stacks, strict=True)
        ]
        norms = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(a), axis=1) for a in averages]))
        scales = tf.reduce_max(norms) / (norms + 1e-8)
        update = [tf.linalg.matvec(a, scales, transpose_a=True) for a in averages]
        weights = (1.0 - self.beta) * scales / shifted
        updates = tuple(
            (variable, tf.where(ok, average, tf.convert_to_tensor(variable)))
            for variable, average in zip(self.averages, averages, strict=True)
        )
        return Weighting(weights, updates, valid=valid, update=update)


def _gradnorm(fields: list[str]) -> GradNorm:
    if len(fields) > 3:
        raise ValueError(f"takes at most 3 fields, got {len(fields)}")
    layer = fields[2] if len(fields) == 3 and fields[2] else None
    return GradNorm(*numbers(fields[:2], [float, float]), layer=layer)


FORMS = {
    "gradnorm": Form("gradnorm[:ALPHA[:LEARNING_RATE[:LAYER]]]", _gradnorm),
    "db_mtl": Form("db_mtl[:BETA]", lambda f: DBMTL(*numbers(f, [float]))),
}
