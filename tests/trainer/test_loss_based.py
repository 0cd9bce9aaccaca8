"""Loss-based balancers (EMA, uncertainty, DWA, FAMO) against hand and float64 computations."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model

from termwise.trainer import Trainer, balancers


def built(balancer, count):
    balancer.build([f"term{i}" for i in range(count)])
    return balancer


def run(balancer, values, step=0):
    """One step: returns the Weighting (as NumPy) and applies the state updates."""
    weighting = balancer.weights(tf.constant(values, tf.float32), tf.constant(step, tf.int64))
    for variable, value in weighting.updates:
        variable.assign(tf.cast(value, variable.dtype))
    valid = None if weighting.valid is None else weighting.valid.numpy()
    return weighting.weights.numpy(), valid


def state(balancer):
    return [v.numpy().copy() for v in balancer.variables]


def assert_state_equal(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ema_normalize_hand_computed():
    b = built(balancers.EMANormalize(decay=0.5, epsilon=0.0), 2)
    # m = 0.5 * 0 + 0.5 * |[2, -4]| = [1, 2]; bias-corrected / (1 - 0.5) = [2, 4].
    np.testing.assert_allclose(run(b, [2.0, -4.0])[0], [1 / 2, 1 / 4], rtol=1e-6)
    # m = 0.5 * [1, 2] + 0.5 * [4, 8] = [2.5, 5]; / (1 - 0.25) = [10/3, 20/3].
    np.testing.assert_allclose(run(b, [4.0, 8.0])[0], [0.3, 0.15], rtol=1e-6)


def test_uncertainty_weighting_hand_computed_and_fixed_point():
    b = built(balancers.UncertaintyWeighting(learning_rate=0.1), 2)
    weights, valid = run(b, [2.0, 0.5])
    np.testing.assert_allclose(weights, [1.0, 1.0])
    assert valid.tolist() == [True, True]
    # s <- s - 0.1 * (1 - exp(-s) L) = [0.1, -0.05]; the weights are exp(-s).
    np.testing.assert_allclose(b.log_variance.numpy(), [0.1, -0.05], rtol=1e-6)
    np.testing.assert_allclose(run(b, [2.0, 0.5])[0], np.exp([-0.1, 0.05]), rtol=1e-6)
    for _ in range(300):
        weights, _ = run(b, [2.0, 0.5])
    np.testing.assert_allclose(weights, [0.5, 2.0], rtol=1e-3)  # 1 / L at the fixed point


def test_uncertainty_weighting_reports_a_term_at_or_below_zero_and_keeps_its_state():
    # The old code drove the log-variance of a term at 0 to -10 in 1,000 steps (weight 2.2e4).
    b = built(balancers.UncertaintyWeighting(), 2)
    assert b.precondition == "every term > 0"
    for _ in range(1000):
        weights, valid = run(b, [1.0, 0.0])
        assert valid.tolist() == [True, False]
    np.testing.assert_array_equal(weights, [1.0, 1.0])
    np.testing.assert_array_equal(b.log_variance.numpy(), [0.0, 0.0])
    _, valid = run(b, [-1.0, 2.0])
    assert valid.tolist() == [False, True]
    np.testing.assert_array_equal(b.log_variance.numpy(), [0.0, 0.0])


def test_dwa_over_windows_hand_computed():
    b = built(balancers.DWA(window=2, temperature=2.0), 2)
    seen = [run(b, v) for v in ([4.0, 2.0], [2.0, 2.0], [1.0, 2.0], [2.0, 1.0])]
    for weights, valid in seen:  # two windows are needed before the first rates
        np.testing.assert_allclose(weights, [1.0, 1.0])
        assert valid.all()
    # Window means: [3, 2] then [1.5, 1.5]; rates [0.5, 0.75]; weights 2 softmax(rates / 2).
    rates = np.array([1.5 / 3, 1.5 / 2])
    expected = 2 * np.exp(rates / 2) / np.exp(rates / 2).sum()
    np.testing.assert_allclose(run(b, [9.0, 9.0])[0], expected, rtol=1e-6)


def test_dwa_reports_a_zero_mean_window_and_a_negative_term():
    # The old code closed a window whose mean was 0 and gave that term a rate of 0.
    b = built(balancers.DWA(window=2), 2)
    _, valid = run(b, [1.0, 0.0])
    assert valid.tolist() == [True, True]  # 0 is allowed; the window is not closed yet
    before = state(b)
    _, valid = run(b, [3.0, 0.0])  # closes the window: term1's mean is 0
    assert valid.tolist() == [True, False]
    assert_state_equal(before, state(b))
    _, valid = run(b, [3.0, 1.0])  # the same window closes with a mean of 0.5
    assert valid.tolist() == [True, True]
    np.testing.assert_allclose(b.last.numpy(), [2.0, 0.5])
    before = state(b)
    _, valid = run(b, [-1.0, 1.0])
    assert valid.tolist() == [False, True]
    assert_state_equal(before, state(b))


def famo_reference(sequence, learning_rate=0.025, decay=0.01):
    """The weights FAMO gives each step, in float64, by the authors' formulas.

    The weights are the gradient of the authors' loss ``sum_i z_i log(L_i + 1e-8) / c`` (c
    held constant) with respect to the losses, by autodiff; the logits' gradient is
    ``d softmax(xi) / d xi`` applied to delta, by autodiff; then PyTorch's Adam with
    ``weight_decay`` (step ``lr / (1 - 0.9^t)``, denominator ``sqrt(v) / sqrt(1 - 0.999^t) +
    1e-8``).
    """
    count = len(sequence[0])
    logits = np.zeros(count)
    m, v, t = np.zeros(count), np.zeros(count), 0
    previous, out = None, []
    for values in sequence:
        losses = tf.constant(values, tf.float64)
        if previous is not None:
            delta = np.log(previous + 1e-8) - np.log(np.asarray(values) + 1e-8)
            xi = tf.Variable(logits)
            with tf.GradientTape() as tape:
                z = tf.nn.softmax(xi)
            grad = tape.gradient(z, xi, output_gradients=tf.constant(delta)).numpy()
            grad = grad + decay * logits
            t += 1
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad**2
            denominator = np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8
            logits = logits - learning_rate / (1 - 0.9**t) * m / denominator
        z = tf.nn.softmax(tf.constant(logits))
        with tf.GradientTape() as tape:
            tape.watch(losses)
            shifted = losses + 1e-8
            c = tf.stop_gradient(tf.reduce_sum(z / shifted))
            loss = tf.reduce_sum(tf.math.log(shifted) * z / c)
        out.append(tape.gradient(loss, losses).numpy())
        previous = np.asarray(values, np.float64)
    return out


def test_famo_matches_the_authors_formulas():
    rng = np.random.default_rng(0)
    # Term 0 falls fast, term 1 slowly, term 2 not at all: FAMO moves weight to 1 and 2.
    steps = np.arange(40)[:, None]
    sequence = np.array([2.0, 1.0, 0.5]) * np.exp(-np.array([0.1, 0.01, 0.0]) * steps)
    sequence *= np.exp(0.01 * rng.normal(size=sequence.shape))
    b = built(balancers.FAMO(), 3)
    expected = famo_reference(sequence)
    for values, reference in zip(sequence, expected, strict=True):
        weights, valid = run(b, values)
        assert valid.all()
        np.testing.assert_allclose(weights, reference, rtol=2e-5)
        assert weights.sum() == pytest.approx(1.0, rel=1e-6)
    # The first step: uniform z, weights proportional to 1 / L.
    np.testing.assert_allclose(expected[0], (1 / sequence[0]) / (1 / sequence[0]).sum())
    logits = b.logits.numpy()
    assert logits[0] < logits[1] < logits[2]


def test_famo_reports_a_term_at_or_below_zero_and_keeps_its_state():
    b = built(balancers.FAMO(), 2)
    run(b, [1.0, 2.0])
    run(b, [0.5, 2.0])
    before = state(b)
    for values in ([0.0, 1.0], [1.0, -1.0]):
        _, valid = run(b, values)
        assert valid.tolist() == [v > 0 for v in values]
        assert_state_equal(before, state(b))


def test_famo_in_the_trainer_weighs_by_its_reference():
    # Two terms of a linear model: the logged weights follow FAMO computed from the logged
    # losses, step by step, and the state (the logits) follows them.
    x = np.array([[1.0, 2.0], [0.5, -1.0]], "float32")

    class Two(Trainer):
        def compute_terms(self, batch, training):
            pred = self.model(batch, training=training)[:, 0]
            return {"up": tf.square(pred[0] - 2.0), "down": 0.1 + tf.square(pred[1] + 1.0)}

    t = Two(linear_model(), keras.optimizers.SGD(0.05), balancer="famo:0.1", progress=False)
    data = tf.data.Dataset.from_tensors(x).repeat()
    seen, weights = [], []
    for _ in range(4):
        logs = t.fit(data, steps=1).last
        seen.append([logs["loss/up"], logs["loss/down"]])
        weights.append([logs["weight/up"], logs["weight/down"]])
    expected = famo_reference(np.array(seen, np.float64), learning_rate=0.1)
    np.testing.assert_allclose(weights, expected, rtol=1e-4)
    assert t.balancers["train"].spec == "famo:0.1:0.01"


@pytest.mark.parametrize(
    "spec, kind, attributes",
    [
        ("famo", balancers.FAMO, {"learning_rate": 0.025, "decay": 0.01}),
        ("FAMO:0.01:0.001", balancers.FAMO, {"learning_rate": 0.01, "decay": 0.001}),
        ("uncertainty:0.05", balancers.UncertaintyWeighting, {"learning_rate": 0.05}),
        ("dwa:50:3", balancers.DWA, {"window": 50, "temperature": 3.0}),
    ],
)
def test_parse(spec, kind, attributes):
    balancer = balancers.parse(spec)
    assert isinstance(balancer, kind) and not balancer.needs_gradients
    for key, value in attributes.items():
        assert getattr(balancer, key) == value
    assert balancers.parse(balancer.spec).spec == balancer.spec


def test_parse_errors():
    with pytest.raises(ValueError, match=r"`learning_rate` \(0.0\) must be positive"):
        balancers.parse("famo:0")
    with pytest.raises(ValueError, match=r"`decay` \(-1.0\) must be non-negative"):
        balancers.parse("famo:0.1:-1")
    with pytest.raises(ValueError, match=r"at most 2 fields"):
        balancers.parse("famo:1:2:3")
