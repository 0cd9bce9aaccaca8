"""PCGrad and Aligned-MTL against their algorithms run on the gradients themselves, in float64."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, weights_of
from test_solvers import (
    CASE_IDS,
    CASES,
    assert_close,
    assert_direction,
    balancer_update,
    train_two_terms,
)

from termwise.trainer import NonFiniteLossError, Trainer, balancers


def pcgrad_reference(grads, orders):
    """Yu et al.'s Algorithm 1 on the vectors: term i visits the others in orders[i]."""
    projected = np.array(grads, np.float64)
    for i in range(len(grads)):
        for j in orders[i]:
            dot = projected[i] @ grads[j]
            if j != i and dot < 0:
                projected[i] -= dot / (grads[j] @ grads[j]) * grads[j]
    return projected.sum(axis=0)


def test_pcgrad_hand_computed_and_never_conflicting():
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])  # dot -1
    # g1' = g1 - (-1 / 2) g2 = [0.5, 0.5]; g2' = g2 - (-1 / 1) g1 = [0, 1]; sum [0.5, 1.5].
    update, weighting = balancer_update(balancers.PCGrad(), [g1, g2])
    np.testing.assert_allclose(update, [0.5, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(weighting.weights.numpy(), 1.0)
    rng = np.random.default_rng(0)
    checked = 0
    for step in range(50):
        g = rng.normal(size=(2, 5))
        if g[0] @ g[1] >= 0:
            continue
        update, _ = balancer_update(balancers.PCGrad(), g, step)
        assert update @ g[0] >= -1e-5 and update @ g[1] >= -1e-5
        checked += 1
    assert checked > 10
    g = np.array([[1.0, 0.2, 0.0], [0.5, 1.0, 0.0], [0.0, 0.1, 1.0]])  # no conflict: the sum
    np.testing.assert_allclose(balancer_update(balancers.PCGrad(), g)[0], g.sum(0), rtol=1e-6)


def test_pcgrad_draws_one_order_per_term_and_step():
    balancer = balancers.PCGrad(seed=3)
    balancer.build([f"term{i}" for i in range(6)])
    orders = balancer.orders(tf.constant(7, tf.int64)).numpy()
    for row in orders:
        np.testing.assert_array_equal(np.sort(row), np.arange(6))  # a permutation
    assert len({tuple(row) for row in orders}) > 1  # not one order shared by every term
    np.testing.assert_array_equal(orders, balancer.orders(tf.constant(7, tf.int64)).numpy())
    assert not np.array_equal(orders, balancer.orders(tf.constant(8, tf.int64)).numpy())
    other = balancers.PCGrad(seed=4)
    other.build([f"term{i}" for i in range(6)])
    assert not np.array_equal(orders, other.orders(tf.constant(7, tf.int64)).numpy())


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_pcgrad_matches_the_algorithm_on_the_vectors(name, grads):
    for step in (0, 1, 2):
        balancer = balancers.PCGrad(seed=1)
        update, weighting = balancer_update(balancer, grads, step)
        assert np.all(np.isfinite(weighting.mixing.numpy()))
        orders = balancer.orders(tf.constant(step, tf.int64)).numpy()
        expected = pcgrad_reference(grads, orders)
        scale = np.abs(grads).max() + 1e-300
        assert_direction(update, expected, scale=scale)
        assert_close(update, expected, scale=scale)


def test_pcgrad_in_the_trainer_never_conflicts():
    # Two terms pulling the outputs of two examples up and down: their gradients conflict.
    # The applied update has a non-negative cosine with each (logged), and equals PCGrad done
    # by hand.
    x = np.array([[1.0, 2.0], [0.5, -1.0]], "float32")

    class UpDown(Trainer):
        def compute_terms(self, batch, training):
            pred = self.model(batch, training=training)[:, 0]
            return {"up": tf.square(pred[0] - 2.0), "down": tf.square(pred[1] + 1.0)}

    model = linear_model()
    t = UpDown(model, keras.optimizers.SGD(0.1), balancer="pcgrad", grad_log_every=1)
    t.progress = False
    before = weights_of(model)
    logs = t.fit(tf.data.Dataset.from_tensors(x), steps=1).last
    pred = x.sum(1)  # w = [1, 1], b = 0
    features = np.concatenate([x, np.ones((2, 1))], axis=1)  # d pred / d [w1, w2, b]
    g_up = 2 * (pred[0] - 2.0) * features[0]
    g_down = 2 * (pred[1] + 1.0) * features[1]
    assert g_up @ g_down < 0
    p_up = g_up - (g_up @ g_down) / (g_down @ g_down) * g_down
    p_down = g_down - (g_down @ g_up) / (g_up @ g_up) * g_up
    update = p_up + p_down
    assert update @ g_up >= 0 and update @ g_down >= 0
    assert logs["grad_cosine/up"] >= 0 and logs["grad_cosine/down"] >= 0
    assert logs["grad_conflict/train"] == 1.0
    kernel, bias = weights_of(model)
    np.testing.assert_allclose(kernel[:, 0], before[0][:, 0] - 0.1 * update[:2], rtol=1e-5)
    np.testing.assert_allclose(bias, before[1] - 0.1 * update[2:], rtol=1e-5)
    assert logs["weight/up"] == 1.0 and logs["weight/down"] == 1.0


def aligned_reference(grads):
    """Senushkin et al.'s Algorithm 1 in float64 numpy (the authors' rank tolerance)."""
    gram = grads @ grads.T
    eigenvalues, vectors = np.linalg.eigh(gram)
    kept = eigenvalues > eigenvalues.max() * len(gram) * np.finfo(np.float32).eps
    if not kept.any():
        return np.zeros(grads.shape[1])
    lam, v = eigenvalues[kept], vectors[:, kept]
    b = np.sqrt(lam.min()) * (v / np.sqrt(lam)) @ v.T
    return b.sum(axis=0) @ grads


def test_aligned_mtl_orthogonalises_with_equal_norms():
    rng = np.random.default_rng(5)
    g = rng.normal(size=(3, 6))
    _, weighting = balancer_update(balancers.AlignedMTL(), g)
    np.testing.assert_allclose(weighting.weights.numpy(), 1.0)
    mixing = weighting.mixing.numpy()
    aligned = mixing @ g
    eigenvalues, vectors = np.linalg.eigh(g @ g.T)
    np.testing.assert_allclose(aligned @ aligned.T, eigenvalues.min() * np.eye(3), atol=1e-4)
    b = np.sqrt(eigenvalues.min()) * vectors @ np.diag(eigenvalues**-0.5) @ vectors.T
    np.testing.assert_allclose(mixing.sum(0) @ g, b.sum(0) @ g, rtol=1e-4)
    # Two equal gradients: rank 1, no NaN; the update is along the gradient.
    g = np.array([[1.0, 2.0], [1.0, 2.0]])
    update, _ = balancer_update(balancers.AlignedMTL(), g)
    assert np.all(np.isfinite(update))
    assert update @ g[0] / (np.linalg.norm(update) * np.linalg.norm(g[0])) == pytest.approx(1.0)


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_aligned_mtl_matches_the_algorithm(name, grads):
    update, weighting = balancer_update(balancers.AlignedMTL(), grads)
    assert np.all(np.isfinite(weighting.mixing.numpy()))
    expected = aligned_reference(grads)
    scale = np.abs(grads).max() + 1e-300
    assert_direction(update, expected, scale=scale)
    assert_close(update, expected, scale=scale)


def test_aligned_mtl_is_accurate_on_graded_gradients():
    # Gradient norms 1, 3e-2, 1e-3 and 1: a float32 eigendecomposition of the (float32)
    # Gramian was 1e-4 off the direction; float64 algebra on it is 1e-7 off.
    rng = np.random.default_rng(0)
    for _ in range(20):
        grads = rng.normal(size=(4, 6)) * np.array([[1.0], [3e-2], [1e-3], [1.0]])
        update, _ = balancer_update(balancers.AlignedMTL(), grads)
        assert_direction(update, aligned_reference(grads), tol=1e-6)


def test_aligned_mtl_turns_a_non_finite_gramian_into_nan():
    balancer = balancers.AlignedMTL()
    balancer.build(["a", "b"])
    gram = tf.constant([[1.0, np.nan], [np.nan, 4.0]])
    weighting = balancer.weights(tf.ones([2]), tf.constant(0, tf.int64), gram)  # no raise
    assert np.all(np.isnan(weighting.mixing.numpy()))


class SometimesNaN(Trainer):
    """y = w.x + b with two terms; the second batch has a NaN input, so NaN gradients."""

    def compute_terms(self, batch, training):
        x, y = batch
        pred = self.model(x, training=training)[:, 0]
        return {"fit": tf.reduce_mean(tf.square(pred - y)), "shrink": tf.square(pred)}


def nan_batches():
    x = np.array([[[1.0, 2.0], [0.5, -1.0]]] * 3, "float32")
    x[1, 0, 0] = np.nan
    y = np.array([[3.0, -2.0]] * 3, "float32")
    return tf.data.Dataset.from_tensor_slices((x, y))


def test_aligned_mtl_leaves_a_non_finite_step_to_the_trainer():
    # The NaN Gramian used to make tf.linalg.eigh raise inside the step, past on_nonfinite.
    t = SometimesNaN(linear_model(), keras.optimizers.SGD(0.01), balancer="aligned_mtl")
    t.progress = False
    with pytest.raises(NonFiniteLossError, match="fit"):
        t.fit(nan_batches(), steps=3)
    t = SometimesNaN(
        linear_model(), keras.optimizers.SGD(0.01), balancer="aligned_mtl", on_nonfinite="skip"
    )
    t.progress = False
    logs = t.fit(nan_batches(), steps=3).last
    assert t.skipped_steps == 1 and np.isfinite(logs["total/train"])
    assert all(np.all(np.isfinite(w)) for w in weights_of(t.model))


@pytest.mark.parametrize(
    "spec, kind, attributes",
    [
        ("PCGrad", balancers.PCGrad, {"seed": 0}),
        ("pcgrad:3", balancers.PCGrad, {"seed": 3}),
        ("aligned-mtl", balancers.AlignedMTL, {}),
        ("alignedmtl", balancers.AlignedMTL, {}),
        ("aligned_mtl", balancers.AlignedMTL, {}),
    ],
)
def test_parse(spec, kind, attributes):
    balancer = balancers.parse(spec)
    assert isinstance(balancer, kind)
    for key, value in attributes.items():
        assert getattr(balancer, key) == value
    assert balancers.parse(balancer.spec).spec == balancer.spec


@pytest.mark.parametrize("spec", ["pcgrad", "aligned_mtl"])
def test_in_the_trainer(spec):
    train_two_terms(spec)
