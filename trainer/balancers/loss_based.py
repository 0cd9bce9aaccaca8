"""Balancers that see only the terms' values: one backward pass of the weighted total per step."""

from __future__ import annotations

import tensorflow as tf

from termwise.trainer.balancers.base import Balancer, Form, Weighting, numbers


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
    """Homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, 2018).

    With a learned log-variance ``s_i`` per term the objective is::

        sum_i exp(-s_i) L_i + s_i

    (twice Kendall et al.'s regression form ``L_i / (2 sigma_i^2) + log sigma_i``, the same
    minimiser). The model sees the weights ``w_i = exp(-s_i)``. The ``s_i`` are not given to the
    phase's optimizer: each applied step takes its own gradient step on them,
    ``s_i <- s_i - learning_rate * (1 - exp(-s_i) L_i)``, whose fixed point ``s_i = log L_i``
    weighs every term by ``1 / L_i``. The ``+ s_i`` regulariser is not part of `total/<phase>`.

    Args:
        learning_rate: step size of the log-variances' update.
        initial: initial log-variance (0: every weight starts at 1).
    """

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
        weights = tf.exp(-self.log_variance)
        new = self.log_variance - self.learning_rate * (1.0 - weights * values)
        return Weighting(weights, ((self.log_variance, new),))


class DWA(Balancer):
    """Dynamic Weight Average (Liu, Johns and Davison, 2019), over windows of steps.

    The paper averages each loss over an epoch; here over consecutive windows of `window`
    applied steps. With ``Lbar_i(k)`` the mean of term i over window k::

        r_i = Lbar_i(k-1) / Lbar_i(k-2),   w_i = T exp(r_i / temperature) / sum_j exp(r_j / temp)

    during window k; ``w_i = 1`` until two windows have been completed.

    Args:
        window: steps per window.
        temperature: softness of the weights (the paper uses 2).
    """

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
        rates = tf.math.divide_no_nan(self.last, self.before_last)
        dynamic = count_terms * tf.nn.softmax(rates / self.temperature)
        weights = tf.where(self.windows >= 2.0, dynamic, tf.ones_like(dynamic))
        sums = self.sums + values
        count = self.count + 1.0
        full = count >= float(self.window)
        updates = (
            (self.before_last, tf.where(full, self.last, self.before_last)),
            (self.last, tf.where(full, sums / count, self.last)),
            (self.sums, tf.where(full, tf.zeros_like(sums), sums)),
            (self.count, tf.where(full, 0.0, count)),
            (self.windows, self.windows + tf.cast(full, tf.float32)),
        )
        return Weighting(weights, updates)


FORMS = {
    "ema": Form("ema[:DECAY]", lambda f: EMANormalize(*numbers(f, [float]))),
    "uncertainty": Form(
        "uncertainty[:LEARNING_RATE]", lambda f: UncertaintyWeighting(*numbers(f, [float]))
    ),
    "dwa": Form("dwa[:WINDOW[:TEMPERATURE]]", lambda f: DWA(*numbers(f, [int, float]))),
}
