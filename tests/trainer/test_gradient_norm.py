"""GradNorm and DB-MTL against hand computations and a float64 transcription of LibMTL's DB_MTL."""

import numpy as np
import pytest
import tensorflow as tf
from test_solvers import CASE_IDS, CASES, assert_direction, train_two_terms

from termwise.trainer import balancers


def built(balancer, count, shapes=None):
    balancer.build([f"term{i}" for i in range(count)], shapes)
    return balancer


def run(balancer, values, step=0, gram=None):
    """One GradNorm step: returns (weights, valid) and applies the state updates."""
    gram = None if gram is None else tf.constant(gram, tf.float32)
    weighting = balancer.weights(tf.constant(values, tf.float32), tf.constant(step, tf.int64), gram)
    for variable, value in weighting.updates:
        variable.assign(tf.cast(value, variable.dtype))
    return weighting.weights.numpy(), weighting.valid.numpy()


def test_gradnorm_hand_computed_moves_toward_equal_training_rates():
    b = built(balancers.GradNorm(alpha=1.0, learning_rate=0.1), 2)
    gram = np.diag([1.0, 9.0])  # gradient norms 1 and 3
    weights, valid = run(b, [1.0, 1.0], gram=gram)  # first step: the initial losses
    np.testing.assert_allclose(weights, [1.0, 1.0])
    assert valid.all()
    # Weighted norms [1, 3], mean 2; equal rates: targets [2, 2]; sign [-1, +1].
    # w = [1 + 0.1 * 1 / 2, 1 - 0.1 * 3 / 2] = [1.05, 0.85], renormalised to sum 2.
    expected = np.array([1.05, 0.85]) * 2 / 1.9
    np.testing.assert_allclose(b.task_weights.numpy(), expected, rtol=1e-6)
    # Term 1 now trains slower (L/L0 = 0.9 vs 0.5): rates r = [0.5, 0.9] / 0.7.
    gram = np.diag([1.0, 1.0])
    weights, _ = run(b, [0.5, 0.9], gram=gram)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)  # this step uses the old weights
    norms = expected * 1.0
    targets = norms.mean() * np.array([0.5, 0.9]) / 0.7
    new = expected - 0.1 * np.sign(norms - targets) * 1.0 / norms.mean()
    new = new * 2 / new.sum()
    np.testing.assert_allclose(b.task_weights.numpy(), new, rtol=1e-6)
    assert new[1] > expected[1]  # the slower term gains weight
    np.testing.assert_allclose(b.initial.numpy(), [1.0, 1.0])
    assert b.task_weights.numpy().sum() == pytest.approx(2.0)  # they sum to T


def test_gradnorm_equalises_training_rates_on_a_toy_problem():
    # Two quadratics in separate coordinates: L_i = a_i x_i^2 / 2, gradients a_i x_i. With
    # plain weights the steep one (a = 1) trains far faster than the flat one (a = 0.01);
    # GradNorm raises the flat one's weight and keeps lowering the steep one's.
    a = np.array([1.0, 0.01])
    b = built(balancers.GradNorm(alpha=1.0, learning_rate=0.05), 2)
    x = np.ones(2)
    for step in range(60):
        values = 0.5 * a * x**2
        grads = np.diag(a * x)
        weights, _ = run(b, values, step, grads @ grads.T)
        x = x - 0.5 * weights * a * x
    assert weights[1] > 1.5 > 0.5 > weights[0]


def test_gradnorm_reports_a_term_that_starts_at_or_crosses_zero():
    # The old code kept a term that started at 0 at rate 0 forever, and a term that crossed
    # zero gave a negative ratio to the power alpha: NaN weights, committed to the state.
    b = built(balancers.GradNorm(), 2)
    assert b.precondition == "every term > 0"
    weights, valid = run(b, [1.0, 0.0], gram=np.eye(2))
    assert valid.tolist() == [True, False]
    np.testing.assert_array_equal(b.task_weights.numpy(), [1.0, 1.0])
    assert b.started.numpy() == 0.0  # L(0) is not taken from a step that breaks it
    run(b, [1.0, 2.0], gram=np.eye(2))
    np.testing.assert_array_equal(b.initial.numpy(), [1.0, 2.0])
    before = b.task_weights.numpy().copy()
    weights, valid = run(b, [1.0, -0.5], gram=np.diag([1.0, 4.0]))
    assert valid.tolist() == [True, False] and np.all(np.isfinite(weights))
    np.testing.assert_array_equal(b.task_weights.numpy(), before)
    np.testing.assert_array_equal(b.initial.numpy(), [1.0, 2.0])


def test_gradnorm_in_the_trainer():
    train_two_terms("gradnorm:1.5:0.05")


# --- DB-MTL ----------------------------------------------------------------------------------

SHAPES = [(2, 2), (3,)]  # 7 parameters in two variables


def shapes_of(grads):
    """Two variables' shapes for the columns of `grads` (the first one 2-D if it can be)."""
    size = grads.shape[1]
    return SHAPES if size == 7 else [(size // 2,), (size - size // 2,)]


def db_mtl_reference(steps, beta):
    """LibMTL's DB_MTL.backward on flat float64 gradients, step by step: the updates."""
    buffer, out = None, []
    for grads, values in steps:
        log_grads = grads / (values[:, None] + 1e-8)  # d log(L + 1e-8) = g / (L + 1e-8)
        if buffer is None:
            buffer = np.zeros_like(log_grads)
        buffer = log_grads + beta * (buffer - log_grads)
        norms = np.linalg.norm(buffer, axis=1)
        alpha = norms.max() / (norms + 1e-8)
        out.append(alpha @ buffer)
    return out


def db_mtl_step(balancer, grads, values):
    first = int(balancer.averages[0].shape[1])
    stacks = [tf.constant(grads[:, :first], tf.float32), tf.constant(grads[:, first:], tf.float32)]
    weighting = balancer.weights(
        tf.constant(values, tf.float32), tf.constant(0, tf.int64), tf.eye(len(grads)), stacks
    )
    for variable, value in weighting.updates:
        variable.assign(value)
    update = np.concatenate([u.numpy() for u in weighting.update])
    return update, weighting


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_db_mtl_matches_libmtl(name, grads):
    rng = np.random.default_rng(7)
    count = len(grads)
    b = built(balancers.DBMTL(beta=0.8), count, shapes_of(grads))
    steps = []
    for k in range(3):
        moved = grads * (1.0 + 0.2 * k) + 0.1 * k * rng.normal(size=grads.shape) * (grads != 0)
        steps.append((moved, rng.uniform(0.5, 2.0, size=count)))
    for (g, values), expected in zip(steps, db_mtl_reference(steps, 0.8), strict=True):
        update, weighting = db_mtl_step(b, g, values)
        assert weighting.valid.numpy().all() and np.all(np.isfinite(update))
        scale = np.abs(g).max() / values.min() + 1e-30
        if np.linalg.norm(expected) <= 1e-12 * scale:
            assert np.linalg.norm(update) <= 1e-6 * scale
            continue
        assert_direction(update, expected, tol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(update), np.linalg.norm(expected), rtol=1e-4)
    # The logged weights are this step's gradients' coefficients in the update.
    buffer = [b.averages[0].numpy(), b.averages[1].numpy()]
    norms = np.sqrt(sum((a**2).sum(axis=1) for a in buffer))
    coefficients = 0.2 * (norms.max() / (norms + 1e-8)) / (values + 1e-8)
    np.testing.assert_allclose(weighting.weights.numpy(), coefficients, rtol=1e-5)


def test_db_mtl_every_term_moves_the_parameters_equally():
    rng = np.random.default_rng(8)
    grads = rng.normal(size=(3, 7)) * np.array([[1.0], [1e-6], [100.0]])
    values = np.array([1.0, 1e-3, 10.0])
    b = built(balancers.DBMTL(beta=0.0), 3, SHAPES)
    update, _ = db_mtl_step(b, grads, values)
    shares = grads / values[:, None]
    shares = shares / np.linalg.norm(shares, axis=1, keepdims=True)
    largest = np.linalg.norm(grads / values[:, None], axis=1).max()
    np.testing.assert_allclose(update, largest * shares.sum(axis=0), rtol=1e-4)


def test_db_mtl_reports_a_term_at_or_below_zero_and_keeps_its_averages():
    b = built(balancers.DBMTL(), 2, SHAPES)
    grads = np.arange(14.0).reshape(2, 7)
    db_mtl_step(b, grads, np.array([1.0, 2.0]))
    before = [a.numpy().copy() for a in b.averages]
    _, weighting = db_mtl_step(b, grads, np.array([0.0, 2.0]))
    assert weighting.valid.numpy().tolist() == [False, True]
    for a, saved in zip(b.averages, before, strict=True):
        np.testing.assert_array_equal(a.numpy(), saved)


def test_db_mtl_needs_shapes_and_stacks():
    b = balancers.DBMTL()
    assert b.needs_stacks and b.needs_gradients
    with pytest.raises(ValueError, match="needs the variables' shapes"):
        b.build(["a", "b"])
    b = built(balancers.DBMTL(), 2, SHAPES)
    with pytest.raises(ValueError, match="needs the per-term gradient stacks"):
        b.weights(tf.ones([2]), tf.constant(0, tf.int64), tf.eye(2))


@pytest.mark.parametrize(
    "spec, kind, attributes",
    [
        ("db_mtl", balancers.DBMTL, {"beta": 0.9}),
        ("DB-MTL:0.5", balancers.DBMTL, {"beta": 0.5}),
        ("dbmtl:0", balancers.DBMTL, {"beta": 0.0}),
        ("gradnorm:1.5", balancers.GradNorm, {"alpha": 1.5, "layer": None}),
        (
            "gradnorm:0.5:0.01:hidden",
            balancers.GradNorm,
            {"learning_rate": 0.01, "layer": "hidden"},
        ),
    ],
)
def test_parse(spec, kind, attributes):
    balancer = balancers.parse(spec)
    assert isinstance(balancer, kind)
    for key, value in attributes.items():
        assert getattr(balancer, key) == value
    assert balancers.parse(balancer.spec).spec == balancer.spec


def test_parse_errors():
    with pytest.raises(ValueError, match=r"`beta` \(1.0\) must be in \[0, 1\)"):
        balancers.parse("db_mtl:1")
    with pytest.raises(ValueError, match=r"at most 1 fields"):
        balancers.parse("db_mtl:0.5:2")
