"""Nash-MTL, FairGrad and their solver against float64 references: closed forms and SciPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, weights_of
from scipy.optimize import minimize
from test_solvers import CASE_IDS, CASES, assert_direction, brute_min_norm

from termwise.trainer import Trainer, balancers
from termwise.trainer.balancers import solvers

ALPHAS = [1.0, 2.0, 0.5, 10.0]


def reference_weights(grads, alpha):
    """The w > 0 with G w = w^(-1/alpha), by SciPy: the convex objective's minimum.

    phi(w) = w'Gw / 2 - sum_i h(w_i), h' = w^(-1/alpha), is minimised by SciPy's exact trust
    region in u_i = log(|g_i| w_i) (a different method from the solver's, on the gradients
    themselves); zero gradients are left out (weight 0).
    """
    grads = np.asarray(grads, np.float64)
    p = 1.0 / alpha
    norms = np.linalg.norm(grads, axis=1)
    keep = norms > 1e-12 * norms.max() if norms.max() > 0 else norms > 0
    weights = np.zeros(len(grads))
    if not keep.any():
        return weights
    unit = grads[keep] / norms[keep, None]
    cosines = unit @ unit.T
    e = norms[keep] ** (p - 1.0)

    def value(u):
        b = np.exp(u)
        h = u if p == 1.0 else np.exp((1.0 - p) * u) / (1.0 - p)
        return 0.5 * b @ cosines @ b - e @ h

    def gradient(u):
        b = np.exp(u)
        return b * (cosines @ b) - e * np.exp((1.0 - p) * u)

    def hessian(u):
        b = np.exp(u)
        diagonal = b * (cosines @ b) - (1.0 - p) * e * np.exp((1.0 - p) * u)
        return b[:, None] * cosines * b[None, :] + np.diag(diagonal)

    result = minimize(
        value,
        np.zeros(int(keep.sum())),
        jac=gradient,
        hess=hessian,
        method="trust-exact",
        options={"gtol": 1e-12, "maxiter": 10000},
    )
    u = result.x
    for _ in range(3):  # polish: Newton steps from SciPy's answer
        u = u - np.linalg.solve(hessian(u), gradient(u))
    b = np.exp(u)
    scale = np.max(b * (np.abs(cosines) @ b) + e * np.exp((1.0 - p) * u))
    assert np.abs(gradient(u)).max() <= 1e-10 * scale
    weights[keep] = np.exp(u) / norms[keep]
    return weights


def pareto_stationary(grads):
    """Whether some convex combination of the nonzero unit gradients is zero (to 1e-10)."""
    norms = np.linalg.norm(grads, axis=1)
    keep = norms > 1e-12 * max(norms.max(), 1e-300)
    if not keep.any():
        return False
    unit = grads[keep] / norms[keep, None]
    return brute_min_norm(unit @ unit.T)[0] <= 1e-10


def solve(grads, alpha, dtype=tf.float64):
    gram = tf.cast(tf.constant(grads @ grads.T, tf.float64), dtype)
    gram, _ = solvers.float64_gramian(gram)
    return solvers.alpha_fair_weights(gram, alpha)


def run(balancer, grads, step=0, dtype=tf.float32):
    """One step of a balancer on the rows of `grads`: (weights, update), state assigned."""
    grads = np.asarray(grads, np.float64)
    if not balancer.built:
        balancer.build([f"term{i}" for i in range(len(grads))])
    gram = tf.constant(grads @ grads.T, dtype)
    weighting = balancer.weights(tf.ones([len(grads)]), tf.constant(step, tf.int64), gram)
    for variable, value in weighting.updates:
        variable.assign(tf.cast(value, variable.dtype))
    weights = weighting.weights.numpy().astype(np.float64)
    return weights, weights @ grads


# --- The solver on its own -------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_solver_matches_scipy_and_its_optimality_conditions(name, grads, alpha):
    solution = solve(grads, alpha)
    weights = solution.weights.numpy()
    assert bool(solution.converged) and np.all(np.isfinite(weights))
    if pareto_stationary(grads):
        assert bool(solution.stationary) and not np.any(weights)
        return
    assert not bool(solution.stationary)
    expected = reference_weights(grads, alpha)
    update, reference = weights @ grads, expected @ grads
    if not np.any(expected):  # all zero
        assert not np.any(weights)
        return
    assert_direction(update, reference, tol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(update), np.linalg.norm(reference), rtol=1e-6)
    norms = np.linalg.norm(grads, axis=1)
    zero = norms <= 1e-12 * norms.max()
    assert np.all(weights[zero] == 0.0) and np.all(weights[~zero] > 0.0)
    # The optimality conditions, w_i^(1/alpha) (G w)_i = 1, as closely as each term counts in d.
    gains = grads @ update
    share = weights * norms / np.abs(weights * norms).sum()
    conditions = weights[~zero] ** (1.0 / alpha) * gains[~zero]
    assert np.all(np.abs(conditions - 1.0) * share[~zero] <= 1e-7), (conditions, share)


def test_nash_two_terms_closed_form():
    # Two gradients: b_i (b_i + c b_j) = 1 in b_i = |g_i| w_i is solved by b = 1 / sqrt(1 + c).
    rng = np.random.default_rng(1)
    for cosine in (0.9, 0.3, 0.0, -0.5, -0.9, -0.99):
        a, b = np.linalg.qr(rng.normal(size=(6, 2)))[0].T
        grads = np.stack([3.0 * a, 1e-3 * (cosine * a + np.sqrt(1 - cosine**2) * b)])
        weights = solve(grads, 1.0).weights.numpy()
        expected = 1.0 / (np.linalg.norm(grads, axis=1) * np.sqrt(1.0 + cosine))
        np.testing.assert_allclose(weights, expected, rtol=1e-7)


def test_pareto_stationary_gradients_give_no_update():
    u, v = np.eye(3)[:2]
    cases = {
        "opposite": np.stack([u, -2.0 * u]),
        "three_at_120": np.stack([u, -0.5 * u + 0.75**0.5 * v, -0.5 * u - 0.75**0.5 * v]),
        "with_a_third": np.stack([u, -u, v]),
    }
    for name, grads in cases.items():
        assert pareto_stationary(grads), name
        for alpha in ALPHAS:
            solution = solve(grads, alpha)
            assert bool(solution.stationary), (name, alpha)
            assert not np.any(solution.weights.numpy()), (name, alpha)


def test_zero_gradients_take_no_part():
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(3, 5))
    with_zero = np.insert(grads, 1, 0.0, axis=0)
    for alpha in ALPHAS:
        weights = solve(grads, alpha).weights.numpy()
        padded = solve(with_zero, alpha).weights.numpy()
        assert padded[1] == 0.0
        np.testing.assert_allclose(np.delete(padded, 1), weights, rtol=1e-9)
    solution = solve(np.zeros((4, 5)), 2.0)
    assert bool(solution.converged) and not np.any(solution.weights.numpy())


def test_float32_gramian_and_bitwise_determinism():
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(4, 9)) * np.array([[1.0], [1e-3], [5.0], [0.2]])
    compiled = tf.function(lambda gram: solvers.alpha_fair_weights(gram, 2.0).weights)
    gram = solvers.float64_gramian(tf.constant(grads @ grads.T, tf.float32))[0]
    first, second = compiled(gram).numpy(), compiled(gram).numpy()
    assert np.array_equal(first, second)
    eager = solvers.alpha_fair_weights(gram, 2.0).weights.numpy()
    assert np.array_equal(eager, solvers.alpha_fair_weights(gram, 2.0).weights.numpy())
    np.testing.assert_allclose(eager, first, rtol=1e-9)
    assert_direction(first @ grads, reference_weights(grads, 2.0) @ grads, tol=1e-5)


def test_solver_rejects_a_non_positive_alpha():
    with pytest.raises(ValueError, match=r"`alpha` \(0.0\) must be positive"):
        solvers.alpha_fair_weights(tf.eye(2, dtype=tf.float64), 0.0)


# --- Nash-MTL --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_nash_mtl_update_and_clip(name, grads):
    weights, update = run(balancers.NashMTL(max_norm=0.0), grads)
    expected = reference_weights(grads, 1.0) @ grads
    if pareto_stationary(grads) or not np.any(expected):
        assert not np.any(weights)
        return
    assert_direction(update, expected, tol=1e-4)
    # |d|^2 = w'Gw = sum_i w_i (G w)_i = T' (the nonzero gradients) before the clip.
    nonzero = int(np.sum(np.linalg.norm(grads, axis=1) > 1e-12 * np.abs(grads).max()))
    np.testing.assert_allclose(np.linalg.norm(update), np.sqrt(nonzero), rtol=1e-4)
    _, clipped = run(balancers.NashMTL(max_norm=0.5), grads)
    assert_direction(clipped, expected, tol=1e-4)
    scale = min(1.0, 0.5 / (np.linalg.norm(expected) + 1e-6))
    np.testing.assert_allclose(np.linalg.norm(clipped), scale * np.linalg.norm(expected), rtol=1e-4)


def test_nash_mtl_is_invariant_to_one_gradient_scale():
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(3, 6))
    _, update = run(balancers.NashMTL(max_norm=0.0), grads)
    for scale in (1e-6, 1e3):
        rescaled = grads * np.array([[1.0], [scale], [1.0]])
        _, other = run(balancers.NashMTL(max_norm=0.0), rescaled)
        np.testing.assert_allclose(other, update, rtol=1e-4, atol=1e-6)


def test_nash_mtl_update_every_reuses_the_weights():
    rng = np.random.default_rng(5)
    first, second = rng.normal(size=(2, 3, 5))
    balancer = balancers.NashMTL(update_every=2, max_norm=0.0)
    w0, _ = run(balancer, first, step=0)
    w1, _ = run(balancer, second, step=1)  # not a multiple of 2: the step-0 weights
    np.testing.assert_array_equal(w1, w0)
    w2, _ = run(balancer, second, step=2)
    np.testing.assert_allclose(w2, reference_weights(second, 1.0), rtol=1e-5)
    # The clip still applies on every step, to this step's gradients.
    clipped = balancers.NashMTL(update_every=2, max_norm=0.1)
    run(clipped, first, step=0)
    w3, update = run(clipped, second, step=3)
    np.testing.assert_allclose(np.linalg.norm(update), 0.1, rtol=1e-4)
    assert_direction(update, w0 @ second, tol=1e-5)


def test_nash_mtl_non_finite_gramian_gives_nan():
    balancer = balancers.NashMTL()
    balancer.build(["a", "b"])
    gram = tf.constant([[1.0, np.nan], [np.nan, 1.0]], tf.float32)
    weighting = balancer.weights(tf.ones([2]), tf.constant(0, tf.int64), gram)
    assert np.all(np.isnan(weighting.weights.numpy()))


def test_nash_mtl_in_the_trainer_two_terms_closed_form():
    # y = w.x + b; "up" pulls one example's output up, "down" another's down: the per-term
    # gradients are hand-computed, and Nash-MTL's two-term solution is closed-form.
    x = np.array([[1.0, 2.0], [0.5, -1.0]], "float32")

    class UpDown(Trainer):
        def compute_terms(self, batch, training):
            pred = self.model(batch, training=training)[:, 0]
            return {"up": tf.square(pred[0] - 2.0), "down": tf.square(pred[1] + 1.0)}

    model = linear_model()
    t = UpDown(model, keras.optimizers.SGD(0.1), balancer="nash_mtl:1:0.5", progress=False)
    before = np.concatenate([w.reshape(-1) for w in weights_of(model)])
    logs = t.fit(tf.data.Dataset.from_tensors(x), steps=1).last
    after = np.concatenate([w.reshape(-1) for w in weights_of(model)])
    features = np.concatenate([x, np.ones((2, 1))], axis=1).astype(np.float64)
    pred = features @ before
    grads = np.stack([2 * (pred[0] - 2.0) * features[0], 2 * (pred[1] + 1.0) * features[1]])
    norms = np.linalg.norm(grads, axis=1)
    cosine = grads[0] @ grads[1] / (norms[0] * norms[1])
    weights = 1.0 / (norms * np.sqrt(1.0 + cosine))
    update = weights @ grads
    clip = min(1.0, 0.5 / (np.linalg.norm(update) + 1e-6))
    np.testing.assert_allclose(before - after, 0.1 * clip * update, rtol=1e-4)
    assert logs["weight/up"] == pytest.approx(clip * weights[0], rel=1e-4)
    assert logs["weight/down"] == pytest.approx(clip * weights[1], rel=1e-4)


# --- FairGrad --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [2.0])
@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_fairgrad_update(name, grads, alpha):
    weights, update = run(balancers.FairGrad(alpha), grads)
    expected = reference_weights(grads, alpha) @ grads
    if pareto_stationary(grads) or not np.any(expected):
        assert not np.any(weights)
        return
    assert_direction(update, expected, tol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(update), np.linalg.norm(expected), rtol=1e-4)


def test_fairgrad_one_is_nash_mtl_unclipped_and_favours_small_gradients():
    rng = np.random.default_rng(6)
    grads = rng.normal(size=(3, 6))
    _, fair = run(balancers.FairGrad(1.0), grads)
    _, nash = run(balancers.NashMTL(max_norm=0.0), grads)
    np.testing.assert_allclose(fair, nash, rtol=1e-5, atol=1e-7)
    # alpha = 2: the gains g_i . d = w_i^(-1/2) are largest where the weights are smallest.
    small = grads * np.array([[1.0], [1.0], [1e-2]])
    weights, update = run(balancers.FairGrad(2.0), small)
    gains = small @ update
    np.testing.assert_allclose(gains, weights**-0.5, rtol=1e-4)
    assert weights[2] > 100 * max(weights[0], weights[1])


def test_fairgrad_in_the_trainer():
    x = np.array([[1.0, 2.0], [0.5, -1.0]], "float32")

    class UpDown(Trainer):
        def compute_terms(self, batch, training):
            pred = self.model(batch, training=training)[:, 0]
            return {"up": tf.square(pred[0] - 2.0), "down": 0.1 * tf.square(pred[1] + 1.0)}

    model = linear_model()
    t = UpDown(model, keras.optimizers.SGD(0.01), balancer="fairgrad:2", progress=False)
    before = np.concatenate([w.reshape(-1) for w in weights_of(model)])
    logs = t.fit(tf.data.Dataset.from_tensors(x), steps=1).last
    after = np.concatenate([w.reshape(-1) for w in weights_of(model)])
    features = np.concatenate([x, np.ones((2, 1))], axis=1).astype(np.float64)
    pred = features @ before
    grads = np.stack([2 * (pred[0] - 2.0) * features[0], 0.2 * (pred[1] + 1.0) * features[1]])
    weights = reference_weights(grads, 2.0)
    np.testing.assert_allclose(before - after, 0.01 * weights @ grads, rtol=1e-4)
    assert logs["weight/up"] == pytest.approx(weights[0], rel=1e-4)
    assert logs["weight/down"] == pytest.approx(weights[1], rel=1e-4)


# --- Parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, kind, attributes",
    [
        ("nash_mtl", balancers.NashMTL, {"update_every": 1, "max_norm": 1.0}),
        ("nash-mtl:25", balancers.NashMTL, {"update_every": 25, "max_norm": 1.0}),
        ("NashMTL:5:0", balancers.NashMTL, {"update_every": 5, "max_norm": 0.0}),
        ("fairgrad", balancers.FairGrad, {"alpha": 1.0}),
        ("fairgrad:2", balancers.FairGrad, {"alpha": 2.0}),
    ],
)
def test_parse(spec, kind, attributes):
    balancer = balancers.parse(spec)
    assert isinstance(balancer, kind) and balancer.needs_gradients
    for key, value in attributes.items():
        assert getattr(balancer, key) == value
    again = balancers.parse(balancer.spec)
    assert isinstance(again, kind) and again.spec == balancer.spec


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nash_mtl:0", r"`update_every` \(0\) must be a positive integer"),
        ("nash_mtl:1.5", r"field '1.5' is not a int"),
        ("nash_mtl:1:-1", r"`max_norm` \(-1.0\) must be non-negative"),
        ("nash_mtl:1:1:1", r"at most 2 fields"),
        ("fairgrad:0", r"`alpha` \(0.0\) must be positive"),
        ("fairgrad:1:2", r"at most 1 fields"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        balancers.parse(spec)
