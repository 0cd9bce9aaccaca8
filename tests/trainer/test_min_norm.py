"""MGDA and CAGrad against exact float64 solutions: the simplex's faces, enumerated."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from test_solvers import (
    CASE_IDS,
    CASES,
    assert_close,
    assert_direction,
    balancer_update,
    brute_min_norm,
    train_two_terms,
)

from termwise.trainer import balancers


def test_mgda_hand_computed():
    g = np.array([[2.0, 0.0], [0.0, 1.0]])
    # Two gradients: alpha_1 = (g2 - g1).g2 / |g1 - g2|^2 = 1 / 5.
    update, weighting = balancer_update(balancers.MGDA(), g)
    np.testing.assert_allclose(weighting.weights.numpy(), [0.2, 0.8], rtol=1e-6)
    np.testing.assert_allclose(update, [0.4, 0.8], rtol=1e-6)


def test_mgda_never_conflicts_on_random_five_term_problems():
    # The old 20 Frank-Wolfe steps left a negative inner product in 39 of these 100 cases.
    rng = np.random.default_rng(0)
    balancer = balancers.MGDA()
    balancer.build([f"term{i}" for i in range(5)])
    compiled = tf.function(lambda gram: balancer.weights(tf.ones([5]), tf.constant(0), gram))
    for _ in range(100):
        grads = rng.normal(size=(5, 8))
        weights = compiled(tf.constant(grads @ grads.T, tf.float32)).weights.numpy()
        update = weights.astype(np.float64) @ grads
        assert weights.min() >= 0.0 and weights.sum() == pytest.approx(1.0, abs=1e-6)
        norms = np.linalg.norm(grads, axis=1)
        # Non-negative to float32 rounding, relative to each gradient and the update's size.
        assert np.all(grads @ update >= -1e-5 * norms * np.linalg.norm(update))
        _, expected = brute_min_norm(grads @ grads.T)
        assert_direction(update, expected @ grads)


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_mgda_matches_the_exact_min_norm_point(name, grads):
    update, weighting = balancer_update(balancers.MGDA(), grads)
    weights = weighting.weights.numpy()
    assert np.all(np.isfinite(weights)) and weights.min() >= 0.0
    assert weights.sum() == pytest.approx(1.0, abs=1e-6)
    if name == "all_zero":
        np.testing.assert_allclose(weights, 1.0 / 3.0)
        return
    gram = grads @ grads.T
    value, expected = brute_min_norm(gram)
    # The KKT conditions of the reference: (G w)_i >= w'Gw.
    assert np.all(gram @ expected >= value - 1e-12 * gram.diagonal().max())
    scale = np.sqrt(gram.diagonal().max())
    assert_direction(update, expected @ grads, scale=scale)
    norms = np.linalg.norm(grads, axis=1)  # non-negative, or zero (the "wide" case)
    assert np.all(grads @ update >= -1e-6 * norms * scale)


def cagrad_reference(grads, c):
    """CAGrad's update, from the KKT conditions of ``min_w g_w.g0 + rho |g_w|`` on each face.

    On a face S with G_SS invertible, stationarity ``a + (rho / r) G w = mu 1`` gives
    ``w = (r / rho) G_SS^-1 (mu 1 - a)``; ``|g_w| = r`` makes mu a root of a quadratic, and
    ``1'w = 1`` gives r. The best feasible point over all faces is the minimum. Zero gradients
    are left out of the faces (they cap min_i g_i.d at 0 for every d).
    """
    count = len(grads)
    gram = grads @ grads.T
    mean = np.full(count, 1.0 / count)
    g0 = mean @ grads
    rho = c * np.linalg.norm(g0)
    if rho == 0.0:
        return g0
    a = gram @ mean
    nonzero = [i for i in range(count) if np.linalg.norm(grads[i]) > 0]
    best = (np.inf, None)
    for k in range(1, len(nonzero) + 1):
        for face in itertools.combinations(nonzero, k):
            face = list(face)
            block = gram[np.ix_(face, face)]
            if np.linalg.matrix_rank(block) < k:
                continue
            inverse = np.linalg.inv(block)
            one = np.ones(k)
            quadratic = [one @ inverse @ one, -2 * one @ inverse @ a[face]]
            quadratic.append(a[face] @ inverse @ a[face] - rho**2)
            for mu in np.roots(quadratic):
                if abs(mu.imag) > 1e-12:
                    continue
                mu = mu.real
                denominator = one @ inverse @ (mu * one - a[face])
                if denominator <= 0:
                    continue
                r = rho / denominator
                w = np.zeros(count)
                w[face] = (r / rho) * inverse @ (mu * one - a[face])
                if w.min() < -1e-12:
                    continue
                value = w @ a + rho * np.sqrt(w @ gram @ w)
                if value < best[0]:
                    best = (value, w)
    value, w = best
    gw = w @ grads
    # Strong duality certifies it: d in the ball, with min_i g_i.d equal to the dual value.
    d = g0 + rho * gw / np.linalg.norm(gw)
    worst = min(grads[i] @ d for i in nonzero)
    assert worst == pytest.approx(value, rel=1e-9, abs=1e-12 * np.abs(gram).max())
    return d


# Every case at the default c; a wider ball (c = 0.9) on the ones where it changes the face.
CAGRAD_CASES = [(name, g, 0.4) for name, g in CASES] + [
    (name, g, 0.9) for name, g in CASES if name in ("random3", "conflicting", "opposite", "wide")
]


@pytest.mark.parametrize(
    "name, grads, c", CAGRAD_CASES, ids=[f"{name}-{c}" for name, _, c in CAGRAD_CASES]
)
def test_cagrad_matches_the_exact_solution(name, grads, c):
    update, weighting = balancer_update(balancers.CAGrad(c), grads)
    assert np.all(np.isfinite(weighting.weights.numpy()))
    expected = cagrad_reference(grads, c) / (1.0 + c**2)
    scale = np.abs(grads).max() + 1e-300
    assert_direction(update, expected, scale=scale)
    if name != "all_zero":
        assert_close(update, expected, scale=scale)
        # Inside the ball around the mean: |d - g0| <= rho.
        g0 = grads.mean(axis=0)
        distance = np.linalg.norm(update * (1.0 + c**2) - g0)
        assert distance <= c * np.linalg.norm(g0) * (1.0 + 1e-5) + 1e-7 * scale


def test_cagrad_special_cases():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(3, 5))
    update, _ = balancer_update(balancers.CAGrad(0.0), g)
    np.testing.assert_allclose(update, g.mean(axis=0), rtol=1e-5)  # c = 0: the mean
    update, weighting = balancer_update(balancers.CAGrad(0.5), g[:1])
    np.testing.assert_allclose(weighting.weights.numpy(), [1.5 / 1.25], rtol=1e-6)  # T = 1
    # 0 is in the hull and nothing does better: every maximiser lies in the dual cone; the
    # projection of g0 onto it (here g0 itself) is returned, not 0 (not in the ball for c < 1).
    g = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    update, _ = balancer_update(balancers.CAGrad(0.4), g)
    np.testing.assert_allclose(update * 1.16, g.mean(axis=0), atol=1e-6)


@pytest.mark.parametrize(
    "spec, kind, attributes",
    [
        ("mgda", balancers.MGDA, {"layer": None}),
        ("MGDA", balancers.MGDA, {}),
        ("cagrad", balancers.CAGrad, {"c": 0.4}),
        ("cagrad:0.5", balancers.CAGrad, {"c": 0.5}),
    ],
)
def test_parse(spec, kind, attributes):
    balancer = balancers.parse(spec)
    assert isinstance(balancer, kind)
    for key, value in attributes.items():
        assert getattr(balancer, key) == value
    assert balancers.parse(balancer.spec).spec == balancer.spec


def test_parse_errors():
    with pytest.raises(ValueError, match=r"'mgda:20'.*solved exactly.*ITERATIONS.*write 'mgda'"):
        balancers.parse("mgda:20")
    with pytest.raises(ValueError, match=r"'cagrad:-1'.*`c` \(-1.0\) must be a non-negative"):
        balancers.parse("cagrad:-1")
    with pytest.raises(ValueError, match=r"'cagrad:x'.*not a float"):
        balancers.parse("cagrad:x")
    with pytest.raises(TypeError):
        balancers.MGDA(20)  # the old positional ITERATIONS
    assert balancers.MGDA(layer="hidden").layer == "hidden"
    assert balancers.CAGrad(0.5, layer="hidden").layer == "hidden"


@pytest.mark.parametrize("spec", ["mgda", "cagrad"])
def test_in_the_trainer(spec):
    logs, _ = train_two_terms(spec)
    if spec == "mgda":
        assert logs["weight/fit"] + logs["weight/shrink"] == pytest.approx(1.0, abs=1e-5)
