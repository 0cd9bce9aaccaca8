"""The Fréchet distance against closed forms and SciPy, and the FID classifier's cache."""

import json

import keras
import numpy as np
import pytest
import scipy.linalg

from termwise.models import data, fid


def random_covariance(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def closed_form_2d(mean_1, cov_1, mean_2, cov_2):
    """For 2 x 2 covariances: a 2 x 2 matrix M with eigenvalues l1, l2 >= 0 has
    Tr M^(1/2) = sqrt(l1) + sqrt(l2) = sqrt(Tr M + 2 sqrt(det M)); here M = cov_1 cov_2."""
    trace_sqrt = np.sqrt(
        np.trace(cov_1 @ cov_2) + 2 * np.sqrt(np.linalg.det(cov_1) * np.linalg.det(cov_2))
    )
    return np.sum((mean_1 - mean_2) ** 2) + np.trace(cov_1) + np.trace(cov_2) - 2 * trace_sqrt


def scipy_distance(features_1, features_2):
    """An independent float64 route: np.cov and scipy.linalg.sqrtm of the product."""
    mean_1, mean_2 = features_1.mean(0), features_2.mean(0)
    cov_1, cov_2 = np.cov(features_1.T), np.cov(features_2.T)
    root = scipy.linalg.sqrtm(cov_1 @ cov_2)  # may carry a round-off imaginary part
    return np.sum((mean_1 - mean_2) ** 2) + np.trace(cov_1 + cov_2) - 2 * np.trace(root).real


@pytest.mark.parametrize("seed", range(5))
def test_exact_moments_match_the_closed_form_for_non_commuting_2d_gaussians(seed):
    rng = np.random.default_rng(seed)
    mean_1, mean_2 = rng.normal(size=2), rng.normal(size=2)
    cov_1, cov_2 = random_covariance(rng, 2), random_covariance(rng, 2)
    assert not np.allclose(cov_1 @ cov_2, cov_2 @ cov_1)  # the general case
    expected = closed_form_2d(mean_1, cov_1, mean_2, cov_2)
    assert fid.frechet_distance(mean_1, cov_1, mean_2, cov_2) == pytest.approx(expected, rel=1e-10)


def test_exact_moments_match_the_closed_form_for_commuting_covariances():
    """cov_i = R diag(s_i) R^T share eigenvectors: d^2 = |dmu|^2 + sum (sqrt s1 - sqrt s2)^2."""
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    s_1, s_2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    s_2[0] = 0.0  # a singular covariance is fine
    mean_1, mean_2 = rng.normal(size=6), rng.normal(size=6)
    cov_1, cov_2 = rotation @ np.diag(s_1) @ rotation.T, rotation @ np.diag(s_2) @ rotation.T
    expected = np.sum((mean_1 - mean_2) ** 2) + np.sum((np.sqrt(s_1) - np.sqrt(s_2)) ** 2)
    # sqrt of a zero eigenvalue turns a round-off of 1e-16 into 1e-8: an absolute tolerance.
    assert fid.frechet_distance(mean_1, cov_1, mean_2, cov_2) == pytest.approx(expected, abs=1e-7)
    assert fid.frechet_distance(mean_1, cov_1, mean_1, cov_1) == pytest.approx(0.0, abs=1e-7)


def test_samples_from_two_gaussians_approach_the_closed_form():
    rng = np.random.default_rng(2)
    mean_1, mean_2 = np.array([0.0, 1.0]), np.array([2.0, -1.0])
    cov_1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    cov_2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    expected = closed_form_2d(mean_1, cov_1, mean_2, cov_2)  # 9.57
    n = 200_000
    x_1 = rng.multivariate_normal(mean_1, cov_1, size=n)
    x_2 = rng.multivariate_normal(mean_2, cov_2, size=n)
    # The estimate's standard error is about 2 |dmu| sqrt(Tr cov / n) ~ 0.03 here.
    assert fid.feature_frechet_distance(x_1, x_2) == pytest.approx(expected, abs=0.1)
    mean, cov = fid.moments(x_1)
    np.testing.assert_allclose(mean, mean_1, atol=0.02)
    np.testing.assert_allclose(cov, cov_1, atol=0.03)


def test_random_features_match_an_independent_scipy_computation():
    rng = np.random.default_rng(3)
    x_1 = rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20))
    x_2 = rng.normal(size=(400, 20)) @ rng.normal(size=(20, 20)) + 0.5
    expected = scipy_distance(x_1, x_2)
    assert fid.feature_frechet_distance(x_1, x_2) == pytest.approx(expected, rel=1e-8)
    assert fid.feature_frechet_distance(x_2, x_1) == pytest.approx(expected, rel=1e-8)
    # float32 features are computed in float64 all the same.
    assert fid.feature_frechet_distance(x_1.astype(np.float32), x_2) == pytest.approx(
        scipy_distance(x_1.astype(np.float32).astype(np.float64), x_2), rel=1e-8
    )


def test_more_dimensions_than_samples_give_a_finite_distance():
    """Rank-deficient covariances (d > n), where sqrtm of the product leaves complex residue."""
    rng = np.random.default_rng(4)
    x_1, x_2 = rng.normal(size=(30, 84)), rng.normal(size=(30, 84)) + 0.1
    value = fid.feature_frechet_distance(x_1, x_2)
    assert np.isfinite(value) and value > 0
    assert fid.feature_frechet_distance(x_1, x_1) == pytest.approx(0.0, abs=1e-8)
    assert value == pytest.approx(fid.feature_frechet_distance(x_2, x_1), rel=1e-8)


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), r"`mean_1`, `cov_1`, .* must be \[d\]"),
        ((np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan)), "`cov_2` holds values"),
    ],
)
def test_bad_moments_name_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        fid.frechet_distance(*args)


def test_moments_need_two_samples():
    with pytest.raises(ValueError, match=r"`features` \(shape \(1, 3\)\) must be \[n, d\]"):
        fid.moments(np.zeros((1, 3)))


# ------------------------------------------------------------------------------------------------
# The classifier and its cache.


def small_split(n_train=200, seed=0):
    split = data.load_images("digits", seed=seed)
    return data.Split(split.x_train[:n_train], split.y_train[:n_train], split.x_test, split.y_test)


def test_the_classifier_trains_bit_for_bit_and_leaves_the_global_random_state_alone():
    split = small_split()

    def trained():
        model = fid.build_classifier((8, 8, 1), 10, seed=0)
        fid.train_classifier(model, split.x_train, split.y_train, steps=20)
        return [np.asarray(v) for v in model.weights]

    keras.utils.set_random_seed(5)
    untouched = np.asarray(keras.random.normal((4,)))
    keras.utils.set_random_seed(5)
    first = trained()
    after = np.asarray(keras.random.normal((4,)))
    second = trained()
    assert np.array_equal(untouched, after)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    initial = [np.asarray(v) for v in fid.build_classifier((8, 8, 1), 10, seed=0).weights]
    assert not all(np.array_equal(a, b) for a, b in zip(first, initial, strict=True))


def test_the_default_scorer_is_cached_and_its_floor_is_the_training_split(tmp_path, monkeypatch):
    """The default recipe on the digits, once: accuracy, floor, then a rerun that loads it."""
    split = data.load_images("digits", seed=0)
    scorer = fid.fid_scorer(split, str(tmp_path))
    assert scorer.held_out_accuracy > 0.95
    assert scorer.num_samples == len(split.x_train) and scorer.num_reference == len(split.x_test)
    assert scorer.floor == pytest.approx(scorer.score(split.x_train[: scorer.num_samples]))
    assert scorer.score(split.x_test) == pytest.approx(0.0, abs=1e-6)
    # A Gaussian fitted to the pixels is far from the data, and the floor well below it.
    flat = split.x_train.reshape(len(split.x_train), -1).astype(np.float64)
    rng = np.random.default_rng(0)
    gaussian = rng.multivariate_normal(flat.mean(0), np.cov(flat.T), size=scorer.num_samples)
    assert scorer.score(np.clip(gaussian, 0, 1).reshape(-1, 8, 8, 1)) > 5 * scorer.floor
    info = json.loads((tmp_path / fid.CLASSIFIER_INFO_FILE).read_text())
    assert info["held_out_accuracy"] == scorer.held_out_accuracy
    assert (tmp_path / fid.CLASSIFIER_FILE).is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was retrained")

    monkeypatch.setattr(fid, "train_classifier", no_training)
    again = fid.fid_scorer(split, str(tmp_path))
    assert again.floor == scorer.floor and again.held_out_accuracy == scorer.held_out_accuracy


def test_other_data_or_a_damaged_cache_retrains(tmp_path, monkeypatch):
    calls = []
    train = fid.train_classifier

    def counted(*args, **kwargs):
        calls.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(fid, "train_classifier", counted)
    fid.fid_scorer(small_split(), str(tmp_path), steps=5)
    fid.fid_scorer(small_split(), str(tmp_path), steps=5)
    assert len(calls) == 1
    fid.fid_scorer(small_split(n_train=150), str(tmp_path), steps=5, write=False)  # other data
    assert len(calls) == 2
    (tmp_path / fid.CLASSIFIER_FILE).write_bytes(b"not a keras file")
    scorer = fid.fid_scorer(small_split(), str(tmp_path), steps=5)
    assert len(calls) == 3 and np.isfinite(scorer.floor)
    fid.fid_scorer(small_split(), str(tmp_path / "other"), steps=5, write=False)
    assert len(calls) == 4 and not (tmp_path / "other").exists()


def test_scorer_options_are_checked():
    split = small_split()
    with pytest.raises(ValueError, match=r"`num_samples` \(1\) must be in \[2, 200\]"):
        fid.fid_scorer(split, num_samples=1, steps=1)
    unlabelled = data.Split(split.x_train, None, split.x_test, None)
    with pytest.raises(ValueError, match="`split` has no labels"):
        fid.fid_scorer(unlabelled, steps=1)
