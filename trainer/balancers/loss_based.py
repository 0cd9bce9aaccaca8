"""Balancers that see only the terms' values: one backward pass of the weighted total per step.

Each returns loss weights that multiply the schedule weights before the one backward pass; none
needs per-term gradients. Those that take a ratio or a logarithm of the terms state it as their
`precondition` ("every term > 0") and return `Weighting.valid`: the Trainer then stops (or
skips) a step on which a term breaks it, naming the balancer, the term and the step, and their
state is never updated from such a step.
"""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers

POSITIVE = "every term > 0"


def _keep_if(ok: tf.Tensor, updates) -> tuple:
    """The (variable, value) pairs, with each value replaced by the variable's own unless `ok`."""
    return tuple(
        (variable, tf.where(ok, value, tf.convert_to_tensor(variable)))
        for variable, value in updates
    )


class EMANormalize(Balancer):
    """Divides each term by a bias-corrected running mean of its magnitude.

    With decay ``beta`` and the k-th applied step's value ``L_i``::

        m_i <- beta m_i + (1 - beta) |L_i|        (m_i = 0 before the first step)
        w_i  = 1 / (m_i / (1 - beta^k) + eps)

    so every term contributes about 1 to the total whatever its scale. The bias correction is
    Adam's (Kingma and Ba, 2015); the first step's weight is exactly ``1 / |L_i|``.

    Args:
        decay: ``beta`` in [0, 1).
        epsilon: added to the mean.
    """

    def __init__(self, decay: float = 0.99, epsilon: float = 1e-8):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` ({decay!r}) must be in [0, 1).")
        self.decay = float(decay)
        self.epsilon = float(epsilon)

    @property
    def spec(self) -> str:
        return f"ema:{self.decay:g}"

    def _build(self, count):
        self.mean = self._state("mean", tf.zeros([count]))
        self.count = self._state("count", 0.0)

    def _weights(self, values, step, gram):
        del step, gram
        count = self.count + 1.0
        mean = self.decay * self.mean + (1.0 - self.decay) * tf.abs(values)
        corrected = mean / (1.0 - tf.pow(self.decay, count))
        return Weighting(1.0 / (corrected + self.epsilon), ((self.mean, mean), (self.count, count)))


class UncertaintyWeighting(Balancer):
    """Homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, 2018, "Multi-Task Learning
    Using Uncertainty to Weigh Losses for Scene Geometry and Semantics").

    With a learned log-variance ``s_i = log sigma_i^2`` per term the objective is::

        sum_i exp(-s_i) L_i + s_i

    and the model sees the weights ``w_i = exp(-s_i)``. The ``s_i`` are not given to the phase's
    optimizer: each applied step takes its own gradient step on them,
    ``s_i <- s_i - learning_rate * (1 - exp(-s_i) L_i)``, whose fixed point ``s_i = log L_i``
    weighs every term by ``1 / L_i`` (so each weighted term tends to 1: the sum convention).
    The ``+ s_i`` regulariser is not part of `total/<phase>`.

    Conventions, where the paper and popular implementations differ:

    * The factor 1/2. Kendall et al. write ``L_i / (2 sigma_i^2) + log sigma_i`` for regression
      and ``L_i / sigma_i^2 + log sigma_i`` for classification; the form here is twice the
      regression one for every term (as in Kendall and Gal's own Keras example). LibMTL's `UW`
      uses ``exp(-s_i) L_i / 2 + s_i / 2`` with ``s_i`` starting at -0.5: its weights are half
      of these at the same ``s_i`` (the update's direction is the same), its steps on ``s_i``
      half as long, and its fixed point the same ``s_i = log L_i``.
    * The optimizer of ``s_i``: plain gradient steps here; the paper and LibMTL train ``s_i``
      with the network's optimizer.

    Precondition: every term > 0. A term <= 0 has no fixed point (``s_i`` falls without bound:
    from 0, a term of 0 reaches a weight of 2.2e4 in 1,000 steps at the default rate), so such a
    step is reported through `Weighting.valid` and the log-variances stay as they were.

    Cost: no extra backward pass; T floats of state.

    Args:
        learning_rate: step size of the log-variances' update.
        initial: initial log-variance (0: every weight starts at 1).
    """

    precondition = POSITIVE

    def __init__(self, learning_rate: float = 0.01, initial: float = 0.0):
        super().__init__()
        if not learning_rate > 0:
            raise ValueError(f"`learning_rate` ({learning_rate!r}) must be positive.")
        self.learning_rate = float(learning_rate)
        self.initial = float(initial)

    @property
    def spec(self) -> str:
        return f"uncertainty:{self.learning_rate:g}"

    def _build(self, count):
        self.log_variance = self._state("log_variance", tf.fill([count], self.initial))

    def _weights(self, values, step, gram):
        del step, gram
        valid = values > 0.0
        weights = tf.exp(-self.log_variance)
        new = self.log_variance - self.learning_rate * (1.0 - weights * values)
        updates = _keep_if(tf.reduce_all(valid), ((self.log_variance, new),))
        return Weighting(weights, updates, valid=valid)


class DWA(Balancer):
    """Dynamic Weight Average (Liu, Johns and Davison, 2019, "End-to-End Multi-Task Learning
    with Attention"), over windows of steps.

    The paper averages each loss over an epoch; here over consecutive windows of `window`
    applied steps. With ``Lbar_i(k)`` the mean of term i over window k::

        r_i = Lbar_i(k-1) / Lbar_i(k-2),   w_i = T exp(r_i / temperature) / sum_j exp(r_j / temp)

    during window k; ``w_i = 1`` until two windows have been completed. The weights sum to T
    (the sum convention: equal rates give every term weight 1), as in the paper and LibMTL,
    which also keep ``w_i = 1`` for the first two epochs.

    Precondition: every term >= 0, with a mean > 0 over each window (``r_i`` divides window
    means). A negative term, or a window whose mean is 0 (which would give a rate of 0 or a
    division by zero), is reported through `Weighting.valid` on the step that brings it, and
    the windows stay as they were.

    Cost: no extra backward pass; 3 T + 2 floats of state.

    Args:
        window: steps per window.
        temperature: softness of the weights (the paper uses 2).
    """

    precondition = "every term >= 0, with a mean > 0 over each window"

    def __init__(self, window: int = 100, temperature: float = 2.0):
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise ValueError(f"`window` ({window!r}) must be a positive integer.")
        if not temperature > 0:
            raise ValueError(f"`temperature` ({temperature!r}) must be positive.")
        self.window = window
        self.temperature = float(temperature)

    @property
    def spec(self) -> str:
        return f"dwa:{self.window}:{self.temperature:g}"

    def _build(self, count):
        self.sums = self._state("sums", tf.zeros([count]))
        self.count = self._state("count", 0.0)
        self.last = self._state("last", tf.ones([count]))
        self.before_last = self._state("before_last", tf.ones([count]))
        self.windows = self._state("windows", 0.0)

    def _weights(self, values, step, gram):
        del step, gram
        count_terms = float(len(self.term_names))
        rates = self.last / self.before_last  # means > 0: checked when each window closed
        dynamic = count_terms * tf.nn.softmax(rates / self.temperature)
        weights = tf.where(self.windows >= 2.0, dynamic, tf.ones_like(dynamic))
        sums = self.sums + values
        count = self.count + 1.0
        full = count >= float(self.window)
        means = sums / count
        valid = tf.logical_and(values >= 0.0, tf.logical_or(tf.logical_not(full), means > 0.0))
        updates = (
            (self.before_last, tf.where(full, self.last, self.before_last)),
            (self.last, tf.where(full, means, self.last)),
            (self.sums, tf.where(full, tf.zeros_like(sums), sums)),
            (self.count, tf.where(full, 0.0, count)),
            (self.windows, self.windows + tf.cast(full, tf.float32)),
        )
        return Weighting(weights, _keep_if(tf.reduce_all(valid), updates), valid=valid)


class FAMO(Balancer):
    """Fast Adaptive Multitask Optimization, FAMO (Liu, Liu, Jin, Stone and Liu, 2023, "FAMO:
    Fast Adaptive Multitask Optimization").

    Learned logits ``xi`` give ``z = softmax(xi)``; the update descends ``sum_i z_i log L_i``
    rescaled by ``c = sum_i z_i / L_i`` (held constant), so the terms' weights are::

        w_i = (z_i / L_i) / sum_j (z_j / L_j)          (they sum to 1: the mean convention)

    and each term's log-loss falls at a rate set by ``z``. After each step, the logits move so
    that the terms whose log-loss fell least gain weight: with ``delta_i = log L_i(previous) -
    log L_i(now)``, the logits' gradient is ``(d z / d xi)' delta = z * (delta - z . delta)``
    plus ``decay * xi``, and Adam (``beta = (0.9, 0.999)``, ``eps = 1e-8``, bias-corrected)
    takes a step of `learning_rate` on it. ``L_i + 1e-8`` stands for ``L_i`` throughout, as in
    the authors' code (with their minimum losses at 0).

    Here the logits are updated at the start of each step from the previous step's and this
    step's values, then weigh this step: O(1) work and no extra forward pass. The authors'
    code instead recomputes the same batch's losses after the update (one extra forward pass
    per step); here ``delta`` compares consecutive batches. The defaults (learning rate 0.025,
    decay 0.01) are those of the authors' `famo.py` and experiment scripts; LibMTL's decay
    default is 1e-3, and the authors use 1e-3 for NYU-v2, CelebA and QM9. The authors clip the
    gradient's norm to 1 in `famo.py` (not in their experiments); use the optimizer's
    `global_clipnorm` for that.

    Precondition: every term > 0 (FAMO takes their logarithms); a step with a term <= 0 is
    reported through `Weighting.valid` and leaves the state as it was.

    Cost: no extra backward pass; 4 T + 2 floats of state (logits, Adam moments, last
    log-losses).

    Args:
        learning_rate: Adam's step size on the logits.
        decay: weight decay of the logits (Adam's L2 term, as PyTorch's `weight_decay`).
    """

    precondition = POSITIVE

    def __init__(self, learning_rate: float = 0.025, decay: float = 0.01):
        super().__init__()
        if not learning_rate > 0:
            raise ValueError(f"`learning_rate` ({learning_rate!r}) must be positive.")
        if not decay >= 0:
            raise ValueError(f"`decay` ({decay!r}) must be non-negative.")
        self.learning_rate = float(learning_rate)
        self.decay = float(decay)

    @property
    def spec(self) -> str:
        return f"famo:{self.learning_rate:g}:{self.decay:g}"

    def _build(self, count):
        self.logits = self._state("logits", tf.zeros([count]))
        self.first_moment = self._state("first_moment", tf.zeros([count]))
        self.second_moment = self._state("second_moment", tf.zeros([count]))
        self.adam_steps = self._state("adam_steps", 0.0)
        self.last_log = self._state("last_log", tf.zeros([count]))
        self.started = self._state("started", 0.0)

    def _weights(self, values, step, gram):
        del step, gram
        valid = values > 0.0
        shifted = values + 1e-8
        log_now = tf.math.log(shifted)
        logits = tf.convert_to_tensor(self.logits)
        z = tf.nn.softmax(logits)
        delta = self.last_log - log_now
        gradient = z * (delta - tf.reduce_sum(z * delta)) + self.decay * logits
        count = self.adam_steps + 1.0
        first = 0.9 * self.first_moment + 0.1 * gradient
        second = 0.999 * self.second_moment + 0.001 * tf.square(gradient)
        corrected = first / (1.0 - tf.pow(0.9, count))
        scale = tf.sqrt(second / (1.0 - tf.pow(0.999, count))) + 1e-8
        started = self.started > 0.0
        logits = tf.where(started, logits - self.learning_rate * corrected / scale, logits)
        z = tf.nn.softmax(logits)
        weights = (z / shifted) / tf.reduce_sum(z / shifted)
        updates = (
            (self.logits, logits),
            (self.first_moment, tf.where(started, first, self.first_moment)),
            (self.second_moment, tf.where(started, second, self.second_moment)),
            (self.adam_steps, tf.where(started, count, self.adam_steps)),
            (self.last_log, log_now),
            (self.started, tf.constant(1.0)),
        )
        return Weighting(weights, _keep_if(tf.reduce_all(valid), updates), valid=valid)


FORMS = {
    "ema": Form("ema[:DECAY]", lambda f: EMANormalize(*numbers(f, [float]))),
    "uncertainty": Form(
        "uncertainty[:LEARNING_RATE]", lambda f: UncertaintyWeighting(*numbers(f, [float]))
    ),
    "dwa": Form("dwa[:WINDOW[:TEMPERATURE]]", lambda f: DWA(*numbers(f, [int, float]))),
    "famo": Form("famo[:LEARNING_RATE[:DECAY]]", lambda f: FAMO(*numbers(f, [float, float]))),
}
