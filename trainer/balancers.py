"""Loss balancers: objects that turn term values (and per-term gradients) into term weights.

One small protocol. A balancer is built once with its phase's term names (creating its state as
variables, which the Trainer checkpoints), then called once per step inside the compiled step:

    weighting = balancer.weights(values, step, gram)   # values: [T] global term values
    weighting.weights   # [T] multipliers; weight/<term> = schedule weight x this
    weighting.mixing    # None, or [T, T]: gradient surgery (PCGrad, Aligned-MTL)
    weighting.updates   # (variable, new value) pairs, assigned only if the step is applied

* Loss-based balancers (`needs_gradients = False`: `EMANormalize`, `UncertaintyWeighting`,
  `DWA`) see only the values, and the step takes one backward pass of the weighted total.
* Gradient-based balancers (`needs_gradients = True`: `GradNorm`, `PCGrad`, `MGDA`,
  `AlignedMTL`) also get the Gramian ``G_ij = g_i . g_j`` of the per-term gradients
  ``g_i = d(schedule_i L_i)/d theta`` over their target (the phase's variables, or those of the
  layer named by `layer`). Each of these methods is a function of the Gramian. GradNorm and
  MGDA return loss weights: the update is ``sum_i w_i g_i``. PCGrad and Aligned-MTL leave the
  weights at 1 and change the gradients instead, but their modified gradients are linear
  combinations of the g_i, ``g_i' = sum_k C_ik g_k``: they return the mixing matrix C, and the
  update is ``sum_i g_i' = sum_k (1'C)_k g_k``. No gradient is ever concatenated or copied.

Values and Gramians are global (all-reduced across replicas) and every computation here is
deterministic (PCGrad's random order is a stateless function of the step), so all replicas
compute the same weights and state.

`parse("gradnorm:1.5")` builds a balancer from a flag value (see `FORMS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import tensorflow as tf

FORMS = (
    "ema[:DECAY]",
    "uncertainty[:LEARNING_RATE]",
    "dwa[:WINDOW[:TEMPERATURE]]",
    "gradnorm[:ALPHA[:LEARNING_RATE[:LAYER]]]",
    "pcgrad[:SEED]",
    "mgda[:ITERATIONS]",
    "aligned_mtl",
    "none",
)


class Weighting(NamedTuple):
    """What a balancer returns for one step.

    Attributes:
        weights: [T] float32 multipliers of the terms (of their gradients, for gradient-based
            balancers), in the order of the term names.
        updates: (variable, new value) pairs: the balancer's new state, assigned by the Trainer
            only when the step's update is applied (every term and the gradient finite).
        mixing: None, or a [T, T] matrix C whose row i gives term i's modified gradient as a
            combination of the weighted gradients, ``g_i' = sum_k C_ik w_k g_k``; the update
            is then ``sum_i g_i'``. Only gradient-based balancers return one.
    """

    weights: tf.Tensor
    updates: tuple = ()
    mixing: tf.Tensor | None = None


class Balancer(tf.Module):
    """Base class: state as variables, built once the term names are known.

    Subclasses set `needs_gradients`, create their state in `_build(count)` with
    `self._state(...)`, and implement `_weights(values, step, gram) -> Weighting`.

    Args:
        layer: for gradient-based balancers, the name of the layer whose variables the Gramian
            is taken over (GradNorm's "last shared layer"); None: all of the phase's variables.
    """

    needs_gradients: bool = False

    def __init__(self, *, layer: str | None = None, name: str | None = None):
        super().__init__(name=name)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(f"`layer` ({layer!r}) must be a layer name or None.")
        if layer is not None and not self.needs_gradients:
            raise ValueError(
                f"`layer` ({layer!r}): {type(self).__name__} uses no gradients; only "
                "gradient-based balancers take a target layer."
            )
        self.layer = layer
        self._term_names: tuple[str, ...] | None = None

    @property
    def built(self) -> bool:
        return self._term_names is not None

    @property
    def term_names(self) -> tuple[str, ...] | None:
        """The names of the terms this balancer weighs, in order (None before `build`)."""
        return self._term_names

    @property
    def spec(self) -> str:
        """The `parse` string of this balancer (recorded in the hparams)."""
        return type(self).__name__

    def build(self, term_names: Sequence[str]) -> None:
        """Creates the state for these terms (once; call it in the strategy's scope).

        Raises:
            ValueError: if it was built for other terms (one balancer per phase).
        """
        names = tuple(term_names)
        if self._term_names is not None:
            if names != self._term_names:
                raise ValueError(
                    f"{type(self).__name__} was built for the terms {list(self._term_names)}, "
                    f"not {list(names)}: use one balancer per phase."
                )
            return
        if not names:
            raise ValueError(f"{type(self).__name__} needs at least one term.")
        self._build(len(names))
        self._term_names = names

    def weights(
        self, values: tf.Tensor, step: tf.Tensor, gram: tf.Tensor | None = None
    ) -> Weighting:
        """This step's weights and new state.

        Args:
            values: [T] the terms' global values (no gradient flows through them).
            step: the global step before this update (int64 scalar).
            gram: [T, T] Gramian of the per-term gradients (gradient-based balancers only).
        """
        if self._term_names is None:
            raise ValueError(f"{type(self).__name__} is not built; call build(term_names).")
        values = tf.stop_gradient(tf.cast(values, tf.float32))
        if self.needs_gradients and gram is None:
            raise ValueError(f"{type(self).__name__} needs the Gramian of per-term gradients.")
        return self._weights(values, step, gram)

    def _build(self, count: int) -> None:
        del count

    def _weights(self, values, step, gram) -> Weighting:
        raise NotImplementedError

    def _state(self, name: str, initial) -> tf.Variable:
        """A non-trainable state variable, the same on every replica."""
        return tf.Variable(
            initial,
            trainable=False,
            name=name,
            dtype=tf.float32,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
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


class GradNorm(Balancer):
    """GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, 2018).

    With ``n_i = |g_i|`` over the target layer (``G_ii``), ``L_i(0)`` the first applied step's
    values, the relative inverse training rate ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``
    and the learned weights ``w_i``::

        L_grad = sum_i | w_i n_i - Gbar r_i^alpha |,   Gbar = mean_j(w_j n_j)  (held constant)
        w_i   <- w_i - learning_rate * sign(w_i n_i - Gbar r_i^alpha) n_i / Gbar,
                 then renormalised so that sum_i w_i = T (and w_i >= 1e-4)

    A term that trains slower than the others (large ``r_i``) gains weight. The update uses this
    step's ``w``; the new ``w`` serves the next step. The paper updates ``w`` with the network's
    optimizer; here each applied step takes a plain gradient step of `learning_rate` on
    ``L_grad / Gbar``, which makes the step independent of the gradients' scale.

    Args:
        alpha: strength of the pull toward equal training rates (the paper uses 0.12 to 3).
        learning_rate: step size of the weights' update.
        layer: the last shared layer's name (None: all of the phase's variables).
    """

    needs_gradients = True

    def __init__(self, alpha: float = 1.5, learning_rate: float = 0.025, layer: str | None = None):
        super().__init__(layer=layer)
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
        norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
        initial = tf.where(self.started > 0.0, self.initial, values)
        ratios = tf.math.divide_no_nan(values, initial)
        rates = tf.math.divide_no_nan(ratios, tf.reduce_mean(ratios))
        weighted_norms = weights * norms
        target = tf.reduce_mean(weighted_norms) * tf.pow(rates, self.alpha)  # a constant
        mean_norm = tf.reduce_mean(weighted_norms)
        step_size = tf.math.divide_no_nan(self.learning_rate * norms, mean_norm)
        new = weights - step_size * tf.sign(weighted_norms - target)
        new = tf.maximum(new, 1e-4)
        new = new * (float(len(self.term_names)) / tf.reduce_sum(new))
        updates = ((self.task_weights, new), (self.initial, initial), (self.started, 1.0))
        return Weighting(weights, updates)


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


class MGDA(Balancer):
    """Multiple-gradient descent, MGDA (Sener and Koltun, 2018), by Frank-Wolfe on the Gramian.

    The weights are the min-norm point of the convex hull of the gradients::

        min_{w in simplex} |sum_i w_i g_i|^2 = w' G w

    solved by `iterations` Frank-Wolfe steps from the uniform ``w`` (Sener and Koltun's
    Algorithm 2): pick ``t = argmin_r (G w)_r``, then the exact line search
    ``gamma = clip((w'Gw - (Gw)_t) / (w'Gw + G_tt - 2 (Gw)_t), 0, 1)``,
    ``w <- (1 - gamma) w + gamma e_t``. The weights sum to 1, so the update is about 1/T of the
    plain sum's size; raise the learning rate to compare with unbalanced runs.

    Args:
        iterations: Frank-Wolfe steps (unrolled in the compiled step).
        layer: take the Gramian over this layer's variables only (Sener and Koltun's MGDA-UB
            takes it over the shared representation; None: the phase's variables).
    """

    needs_gradients = True

    def __init__(self, iterations: int = 20, layer: str | None = None):
        super().__init__(layer=layer)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
            raise ValueError(f"`iterations` ({iterations!r}) must be a positive integer.")
        self.iterations = iterations

    @property
    def spec(self) -> str:
        return f"mgda:{self.iterations}"

    def _weights(self, values, step, gram):
        del values, step
        count = len(self.term_names)
        weights = tf.fill([count], 1.0 / count)
        for _ in range(self.iterations):
            product = tf.linalg.matvec(gram, weights)
            t = tf.argmin(product)
            v1v1 = tf.tensordot(weights, product, 1)
            v1v2 = tf.gather(product, t)
            v2v2 = tf.gather(tf.linalg.diag_part(gram), t)
            gamma = tf.math.divide_no_nan(v1v1 - v1v2, v1v1 + v2v2 - 2.0 * v1v2)
            gamma = tf.clip_by_value(gamma, 0.0, 1.0)
            weights = (1.0 - gamma) * weights + gamma * tf.one_hot(t, count)
        return Weighting(weights)


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


def _numbers(fields: Sequence[str], kinds: Sequence[type]) -> list:
    out = []
    for field, kind in zip(fields, kinds, strict=False):
        try:
            out.append(kind(field))
        except ValueError:
            raise ValueError(f"field {field!r} is not a {kind.__name__}") from None
    return out


def parse(spec: str | Balancer | None) -> Balancer | None:
    """Builds a balancer from its string form (a `--balancer` flag value).

    Accepted forms (`FORMS`): ``ema[:DECAY]``, ``uncertainty[:LEARNING_RATE]``,
    ``dwa[:WINDOW[:TEMPERATURE]]``, ``gradnorm[:ALPHA[:LEARNING_RATE[:LAYER]]]``,
    ``pcgrad[:SEED]``, ``mgda[:ITERATIONS]``, ``aligned_mtl`` and ``none`` (or an empty string,
    or None: no balancer). A `Balancer` is returned as it is.

    Raises:
        ValueError: naming the string and listing the accepted forms.
    """
    if spec is None or isinstance(spec, Balancer):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"A balancer must be a string such as 'pcgrad', got {spec!r}.")
    help_text = "accepted forms: " + ", ".join(FORMS)
    name, *fields = spec.strip().split(":")
    name = name.lower().replace("-", "_")
    most = {
        "ema": 1,
        "uncertainty": 1,
        "dwa": 2,
        "gradnorm": 3,
        "pcgrad": 1,
        "mgda": 1,
        "aligned_mtl": 0,
        "alignedmtl": 0,
        "none": 0,
        "": 0,
    }
    try:
        if name not in most:
            raise ValueError(f"unknown balancer {name!r}")
        if len(fields) > most[name]:
            raise ValueError(f"{name} takes at most {most[name]} fields, got {len(fields)}")
        if name in ("none", ""):
            return None
        if name == "ema":
            return EMANormalize(*_numbers(fields, [float]))
        if name == "uncertainty":
            return UncertaintyWeighting(*_numbers(fields, [float]))
        if name == "dwa":
            return DWA(*_numbers(fields, [int, float]))
        if name == "gradnorm":
            numbers = _numbers(fields[:2], [float, float])
            layer = fields[2] if len(fields) == 3 and fields[2] else None
            return GradNorm(*numbers, layer=layer)
        if name == "pcgrad":
            return PCGrad(*_numbers(fields, [int]))
        if name == "mgda":
            return MGDA(*_numbers(fields, [int]))
        return AlignedMTL()
    except ValueError as error:
        raise ValueError(f"Balancer {spec!r}: {error}; {help_text}.") from None
