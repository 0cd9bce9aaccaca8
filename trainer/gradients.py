"""Per-term gradients: one backward pass per term, their Gramian, and what it tells.

On a diagnostic step (and on every step of a phase whose balancer needs them) the Trainer takes
the gradient of each weighted term ``g_i = d(w_i L_i) / d theta`` over the phase's variables,
one `tape.gradient` call per term, and the update is their combination ``sum_i c_i g_i``: no
backward pass beyond one per term (the total's gradient is the sum, not an extra pass).

Everything the diagnostics need is a function of the T x T Gramian ``G_ij = g_i . g_j``, which
is summed variable by variable without concatenating the gradients::

    norm_i    = sqrt(G_ii)                       grad_norm/<term>
    total     = sum_i g_i,  |total|^2 = 1' G 1   (or the update sum_k u_k g_k, see `statistics`)
    cosine_i  = (G 1)_i / (norm_i |total|)       grad_cosine/<term>
    share_i   = (G 1)_i / |total|^2              grad_share/<term>: the shares sum to 1
    C_ij      = G_ij / (norm_i norm_j)           the pairwise cosine matrix (a heatmap image)
    conflict  = #{i < j : G_ij < 0} / #{i < j}   grad_conflict/<phase>

Under a `tf.distribute` strategy the Trainer all-reduces the per-term gradients (SUM) before
forming the Gramian or combining them, so every replica sees the global gradients.

`DominanceMonitor` runs on the host between compiled calls: it warns once per pair of terms
when one term's weighted gradient norm stays more than `ratio` times another's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tensorflow as tf
from absl import logging


def term_gradients(tape: tf.GradientTape, targets: Sequence[tf.Tensor], variables) -> list:
    """The gradient of each target over `variables`: one backward pass per target.

    Args:
        tape: a persistent tape that recorded the targets.
        targets: T scalar tensors (the weighted terms).
        variables: the V variables.

    Returns:
        T lists of V dense tensors (zeros where a term does not depend on a variable).
    """
    out = []
    for target in targets:
        grads = tape.gradient(target, variables)
        out.append(
            [
                tf.zeros_like(v, tf.float32) if g is None else tf.convert_to_tensor(g)
                for g, v in zip(grads, variables, strict=True)
            ]
        )
    return out


def all_finite(tensors: Sequence) -> tf.Tensor:
    """Whether every element of every tensor is finite, as one boolean scalar.

    ``sum_v sum(g_v * 0)`` is 0 when every element is finite and NaN otherwise (``inf * 0`` and
    ``nan * 0`` are NaN, and a sum with a NaN is NaN; zeros cannot overflow), so one `is_finite`
    of that scalar answers for all of them: two cheap ops per tensor, where `is_finite` and
    `reduce_all` per tensor cost about a third of a small model's step (scripts/benchmark.py).

    Args:
        tensors: tensors (or `tf.IndexedSlices`, or None, which are skipped).

    Returns:
        A boolean scalar tensor (True for no tensors).
    """
    sums = []
    for value in tensors:
        if value is None:
            continue
        value = tf.convert_to_tensor(value)
        if not value.dtype.is_floating:
            continue  # integers are finite
        sums.append(tf.cast(tf.reduce_sum(value * tf.zeros([], value.dtype)), tf.float32))
    if not sums:
        return tf.constant(True)
    return tf.math.is_finite(sums[0] if len(sums) == 1 else tf.add_n(sums))


def stack_by_variable(per_term: Sequence[Sequence[tf.Tensor]]) -> list[tf.Tensor]:
    """Turns T lists of V gradients into V matrices of shape [T, size of the variable]."""
    return [
        tf.stack([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads])
        for grads in zip(*per_term, strict=True)
    ]


def gramian(stacks: Sequence[tf.Tensor], indices: Sequence[int] | None = None) -> tf.Tensor:
    """The Gramian ``G_ij = g_i . g_j`` summed over the variables (all, or those `indices`).

    Args:
        stacks: V matrices [T, n_v] from `stack_by_variable`.
        indices: which variables to include (None: all).

    Returns:
        A [T, T] float32 tensor.
    """
    chosen = stacks if indices is None else [stacks[i] for i in indices]
    return tf.add_n([tf.matmul(s, s, transpose_b=True) for s in chosen])


def combine(stacks: Sequence[tf.Tensor], coefficients: tf.Tensor, variables) -> list[tf.Tensor]:
    """The update ``sum_i c_i g_i`` for each variable, shaped and typed like the variable."""
    out = []
    for stack, variable in zip(stacks, variables, strict=True):
        flat = tf.linalg.matvec(stack, coefficients, transpose_a=True)
        out.append(tf.cast(tf.reshape(flat, tf.shape(variable)), variable.dtype))
    return out


def statistics(
    gram: tf.Tensor,
    weights: tf.Tensor | None = None,
    update: tf.Tensor | None = None,
    *,
    products: tf.Tensor | None = None,
    update_norm2: tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """Norms, cosines, shares and conflicts of the weighted gradients ``w_i g_i``.

    With the update ``U = sum_k u_k g_k``::

        norm_i     = |w_i g_i|
        cosine_i   = (w_i g_i . U) / (|w_i g_i| |U|)
        share_i    = (u_i g_i . U) / |U|^2            term i's share of the update: sum_i = 1

    ``u_i g_i`` is term i's part of the update, so the shares add up to 1 whatever the method
    (for a plain or loss-weighted sum ``u = w``). A share is the length of that part's
    projection on U over |U|: it is negative when the part points against the update, and can
    exceed 1 when other parts cancel some of it.

    Args:
        gram: [T, T] Gramian of the per-term gradients g_i.
        weights: [T] multipliers ``w_i`` of the g_i (None: all 1).
        update: [T] coefficients ``u_k`` of the update (None: the weights; gradient surgery
            makes them differ).
        products: instead of `update`, for an update that is not a combination of the g_i:
            [T] the products ``g_i . U``; then `update_norm2` is ``|U|^2`` and the shares are
            ``w_i g_i . U / |U|^2`` (which need not sum to 1).
        update_norm2: ``|U|^2``, with `products`.

    Returns:
        `norms` [T], `cosines` [T], `shares` [T], `cosine_matrix` [T, T] (pairwise, of the
        weighted gradients) and `conflict` (scalar: the fraction of pairs with a negative
        cosine; 0 for one term). A zero gradient has cosine 0 with everything.
    """
    gram = tf.convert_to_tensor(gram, tf.float32)
    count = int(gram.shape[0])
    w = tf.ones([count]) if weights is None else tf.convert_to_tensor(weights, tf.float32)
    weighted = gram * w[:, None] * w[None, :]
    norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(weighted), 0.0))
    if products is None:
        u = w if update is None else tf.convert_to_tensor(update, tf.float32)
        products = tf.linalg.matvec(gram, u)  # g_i . U
        update_norm2 = tf.tensordot(u, products, 1)
        parts = u * products
    else:
        parts = w * products
    update_norm2 = tf.maximum(update_norm2, 0.0)
    to_total = w * products  # (w_i g_i) . U
    cosines = tf.math.divide_no_nan(to_total, norms * tf.sqrt(update_norm2))
    shares = tf.math.divide_no_nan(parts, update_norm2)
    matrix = tf.math.divide_no_nan(weighted, norms[:, None] * norms[None, :])
    pairs = count * (count - 1) // 2
    if pairs:
        upper = tf.linalg.band_part(tf.ones_like(gram), 0, -1) - tf.eye(count)
        negative = tf.reduce_sum(upper * tf.cast(weighted < 0.0, tf.float32))
        conflict = negative / float(pairs)
    else:
        conflict = tf.constant(0.0)
    return {
        "norms": norms,
        "cosines": cosines,
        "shares": shares,
        "cosine_matrix": matrix,
        "conflict": conflict,
    }


def layer_segments(variables, layer_of: Mapping[int, str]) -> tuple[list[str], tf.Tensor]:
    """The layers that own `variables`, and the [V, L] 0/1 matrix assigning each to its layer.

    Args:
        variables: the phase's variables, in order.
        layer_of: `id(variable)` to the name of the layer that owns it.

    Returns:
        (layer names in order of first appearance, the [V, L] float32 matrix).
    """
    names: list[str] = []
    for v in variables:
        name = layer_of.get(id(v), "other")
        if name not in names:
            names.append(name)
    rows = [[1.0 if layer_of.get(id(v), "other") == n else 0.0 for n in names] for v in variables]
    return names, tf.constant(rows, tf.float32)


def layer_norms(stacks: Sequence[tf.Tensor], segments: tf.Tensor) -> tf.Tensor:
    """[T, L] norms of each term's gradient restricted to each layer's variables.

    Args:
        stacks: V matrices [T, n_v] of per-term gradients (`stack_by_variable`).
        segments: the [V, L] matrix of `layer_segments`.
    """
    squares = tf.stack([tf.reduce_sum(tf.square(s), axis=1) for s in stacks], axis=1)  # [T, V]
    return tf.sqrt(tf.maximum(tf.matmul(squares, segments), 0.0))


class OutputTap:
    """Records what a layer outputs while active: the representation Z of MGDA-UB.

    The layer's `call` is wrapped on the instance for the duration, so the tensors recorded
    are the ones the tape saw (traced once, inside the compiled step).

    Example:
        ```python
        with tf.GradientTape(persistent=True) as tape, OutputTap(encoder) as outputs:
            losses = compute(batch)
        grads = [tape.gradient(loss, outputs) for loss in losses]   # dL_i / dZ
        ```
    """

    def __init__(self, layer):
        self.layer = layer
        self.outputs: list[tf.Tensor] = []

    def __enter__(self) -> list[tf.Tensor]:
        original = self.layer.call

        def call(*args, **kwargs):
            result = original(*args, **kwargs)
            self.outputs.extend(
                t for t in tf.nest.flatten(result) if tf.is_tensor(t) and t.dtype.is_floating
            )
            return result

        object.__setattr__(self.layer, "call", call)
        return self.outputs

    def __exit__(self, *exc_info) -> None:
        object.__delattr__(self.layer, "call")


class DominanceMonitor:
    """Warns when one term's weighted gradient norm dwarfs another's, once per pair.

    After `patience` consecutive diagnostic steps on which ``norm_a > ratio * norm_b``, one
    absl warning names both terms, the ratio and the weight that would balance them (the
    weighted gradient norm is proportional to the weight).

    Args:
        ratio: the norm ratio beyond which a term dominates (> 1).
        patience: how many consecutive diagnostic steps it must last.
    """

    def __init__(self, ratio: float = 100.0, patience: int = 3):
        self.ratio = float(ratio)
        self.patience = int(patience)
        self._streaks: dict[tuple[str, str], int] = {}
        self.warned: set[tuple[str, str]] = set()

    def update(
        self,
        phase: str,
        norms: Mapping[str, float],
        weights: Mapping[str, float],
        step: int,
    ) -> list[str]:
        """Records one diagnostic step's norms; returns (and logs) any new warnings."""
        messages = []
        names = list(norms)
        for big in names:
            for small in names:
                if big == small:
                    continue
                key = (big, small)
                n_big, n_small = float(norms[big]), float(norms[small])
                dominant = n_big > self.ratio * n_small and n_small > 0.0
                self._streaks[key] = self._streaks.get(key, 0) + 1 if dominant else 0
                if self._streaks[key] < self.patience or key in self.warned:
                    continue
                self.warned.add(key)
                ratio = n_big / n_small
                w_small = float(weights.get(small, 1.0))
                w_big = float(weights.get(big, 1.0))
                message = (
                    f"Term {big!r} dominates {small!r} in phase {phase!r}: its weighted gradient "
                    f"norm has been more than {self.ratio:g}x larger for {self.patience} "
                    f"diagnostic steps ({ratio:.3g}x at step {step}). A weight of "
                    f"{w_small * ratio:.4g} on {small!r} (now {w_small:.4g}), or "
                    f"{w_big / ratio:.4g} on {big!r} (now {w_big:.4g}), would balance them."
                )
                logging.warning(message)
                messages.append(message)
        return messages
