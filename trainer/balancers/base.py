"""The balancer protocol: what a balancer returns for one step, and the base class.

A balancer is built once with its phase's term names (creating its state as variables, which
the Trainer checkpoints), then called once per step inside the compiled step::

    weighting = balancer.weights(values, step, gram)   # values: [T] global term values
    weighting.weights   # [T] multipliers; weight/<term> = schedule weight x this
    weighting.mixing    # None, or [T, T]: gradient surgery (PCGrad, Aligned-MTL)
    weighting.updates   # (variable, new value) pairs, assigned only if the step is applied
    weighting.valid     # None, or [T] bool: False where a term breaks `balancer.precondition`
    weighting.update    # None, or the phase's update itself, one flat tensor per variable

A balancer whose update is not a combination of this step's gradients (DB-MTL averages past
gradients) sets `needs_stacks`: it is built with the phase's variable shapes and also receives
the per-term gradients, stacked by variable, to keep such state.

`Form` and `numbers` are what each family's module uses to declare its `parse` strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import tensorflow as tf


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
        valid: None, or a [T] bool tensor: False where term i breaks the balancer's
            documented `precondition` this step (a term <= 0 under a balancer that takes its
            logarithm). The Trainer treats such a step as it treats a non-finite term: with
            `on_nonfinite="raise"` it stops before applying it, with an error that names the
            balancer, the precondition, the term and the step; with "skip" it drops the step.
            Either way the balancer's state is not updated from it.
        update: None, or the update to apply, one flat [n_v] float32 tensor per variable of
            the phase (the sum convention: what a plain sum of the gradients would be). Only
            balancers with `needs_stacks` return one; `weights` then says how the logged
            `weight/<term>` reads.
    """

    weights: tf.Tensor
    updates: tuple = ()
    mixing: tf.Tensor | None = None
    valid: tf.Tensor | None = None
    update: list | None = None


class Balancer(tf.Module):
    """Base class: state as variables, built once the term names are known.

    Subclasses set `needs_gradients`, create their state in `_build(count)` with
    `self._state(...)`, and implement `_weights(values, step, gram) -> Weighting`.

    Args:
        layer: for gradient-based balancers, the name of the layer whose variables the Gramian
            is taken over (GradNorm's "last shared layer"); None: all of the phase's variables.
            The per-term gradients are still taken over all of them (T backward passes).
        representation: for gradient-based balancers, the name of a layer whose output is the
            shared representation Z: the Gramian is that of the per-term gradients with respect
            to Z, summed over the batch, ``G_ij = sum_n dL_i/dZ_n . dL_j/dZ_n`` (Sener and
            Koltun 2018's MGDA-UB; Z is the input of every task's head). Each step then takes T
            backward passes through the heads only, down to Z, and one full backward pass of
            the weighted total ``sum_k u_k L_k``, instead of T full ones: for a large shared
            encoder close to the cost of a plain step. The weights are those the method gives
            for the gradients at Z, an upper bound's minimiser (MGDA-UB) or an approximation,
            not those of the parameter gradients; gradient surgery becomes the same
            combination of the terms (`1'C`), applied through that one backward pass.
    """

    needs_gradients: bool = False
    # What the terms must satisfy, in words, for a balancer that returns `Weighting.valid`
    # (for example "every term > 0"); the Trainer's error message quotes it.
    precondition: str | None = None
    # Also receives the per-term gradients stacked by variable (`weights(..., stacks=...)`) and is
    # built with the variables' shapes (`_build_stacks`); implies `needs_gradients`.
    needs_stacks: bool = False

    def __init__(
        self,
        *,
        layer: str | None = None,
        representation: str | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.layer = self.representation = None
        self._term_names: tuple[str, ...] | None = None
        self.target(layer=layer, representation=representation)

    def target(self, *, layer: str | None = None, representation: str | None = None) -> Balancer:
        """Sets what the Gramian is taken over (see the class's Args); returns the balancer.

        Raises:
            ValueError: for a name that is not a non-empty string, both options at once, or a
                balancer that takes no gradients or keeps them (`needs_stacks`).
        """
        for option, value in (("layer", layer), ("representation", representation)):
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{option}` ({value!r}) must be a layer name or None.")
            if not self.needs_gradients:
                raise ValueError(
                    f"`{option}` ({value!r}): {type(self).__name__} uses no gradients; only "
                    "gradient-based balancers take a target layer."
                )
        if layer is not None and representation is not None:
            raise ValueError(
                f"Give `layer` ({layer!r}) or `representation` ({representation!r}), not both."
            )
        for option, value in (("layer", layer), ("representation", representation)):
            if value is not None and self.needs_stacks:
                # Its update is made of the full per-term gradients, not of the Gramian: a
                # target would change nothing (db_mtl@layer=X trained exactly as db_mtl).
                raise ValueError(
                    f"`{option}` ({value!r}): {type(self).__name__} averages the parameters' "
                    "gradients and needs them all."
                )
        self.layer, self.representation = layer, representation
        return self

    @property
    def target_spec(self) -> str:
        """The `parse` suffix of the target, e.g. "@representation=encoder" ("" for none)."""
        if self.representation is not None:
            return f"@representation={self.representation}"
        if self.layer is not None and self.layer not in self.spec:
            return f"@layer={self.layer}"
        return ""

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

    def build(self, term_names: Sequence[str], shapes: Sequence | None = None) -> None:
        """Creates the state for these terms (once; call it in the strategy's scope).

        Args:
            term_names: the phase's term names, in order.
            shapes: the shapes of the phase's (or the target layer's) variables, for a balancer
                with `needs_stacks`; ignored by the others.

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
        if self.needs_stacks:
            if shapes is None:
                raise ValueError(f"{type(self).__name__} needs the variables' shapes to build.")
            self._build_stacks(len(names), [tf.TensorShape(s) for s in shapes])
        self._term_names = names

    def weights(
        self,
        values: tf.Tensor,
        step: tf.Tensor,
        gram: tf.Tensor | None = None,
        stacks: Sequence[tf.Tensor] | None = None,
    ) -> Weighting:
        """This step's weights and new state.

        Args:
            values: [T] the terms' global values (no gradient flows through them).
            step: the global step before this update (int64 scalar).
            gram: [T, T] Gramian of the per-term gradients (gradient-based balancers only).
            stacks: for balancers with `needs_stacks`: one [T, n_v] float32 tensor per
                variable, row i the (schedule-weighted) gradient of term i.
        """
        if self._term_names is None:
            raise ValueError(f"{type(self).__name__} is not built; call build(term_names).")
        values = tf.stop_gradient(tf.cast(values, tf.float32))
        if self.needs_gradients and gram is None:
            raise ValueError(f"{type(self).__name__} needs the Gramian of per-term gradients.")
        if self.needs_stacks:
            if stacks is None:
                raise ValueError(f"{type(self).__name__} needs the per-term gradient stacks.")
            return self._weights(values, step, gram, stacks)
        return self._weights(values, step, gram)

    def _build(self, count: int) -> None:
        del count

    def _build_stacks(self, count: int, shapes: list[tf.TensorShape]) -> None:
        """Creates state shaped like the variables (balancers with `needs_stacks`)."""
        del count, shapes

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


class Form(NamedTuple):
    """One accepted `parse` string: its usage text and the builder of its fields.

    Attributes:
        usage: the form as the help lists it, e.g. ``"gradnorm[:ALPHA[:LEARNING_RATE[:LAYER]]]"``.
        build: turns the fields after the name (strings) into a balancer; raises `ValueError`
            naming the bad field.
    """

    usage: str
    build: Callable[[list[str]], Balancer]


def numbers(fields: Sequence[str], kinds: Sequence[type]) -> list:
    """Converts `parse` fields to numbers of `kinds`, in order.

    Raises:
        ValueError: for more fields than kinds, or a field that is not a number of its kind.
    """
    if len(fields) > len(kinds):
        raise ValueError(f"takes at most {len(kinds)} fields, got {len(fields)}")
    out = []
    for field, kind in zip(fields, kinds, strict=False):
        try:
            out.append(kind(field))
        except ValueError:
            raise ValueError(f"field {field!r} is not a {kind.__name__}") from None
    return out
