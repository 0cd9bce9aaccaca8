"""The LSTM forecaster: the Mackey-Glass data, CSV series, its terms against numpy, its job."""

import keras
import numpy as np
import pytest

from termwise.models import data, lstm
from termwise.models.config import ConfigError, RunConfig
from termwise.trainer.summaries import read_events


def _euler_mackey_glass(t_end, dt=1e-3, tau=17.0, initial=1.2):
    """An independent, slow reference: forward Euler at a small step, sampled every time unit."""
    delay, per_unit = round(tau / dt), round(1 / dt)
    x = np.full(delay + round(t_end / dt) + 1, initial)
    for n in range(delay, len(x) - 1):
        lagged = x[n - delay]
        x[n + 1] = x[n] + dt * (0.2 * lagged / (1 + lagged**10) - 0.1 * x[n])
    return x[delay::per_unit]


def test_mackey_glass_matches_a_fine_euler_integration():
    series = data.mackey_glass(81, discard=0.0)
    reference = _euler_mackey_glass(80)
    np.testing.assert_allclose(series, reference, atol=2e-3)
    assert series[0] == 1.2 and not np.allclose(series[:20], 1.2)


def test_mackey_glass_is_bounded_and_chaotic_at_tau_17():
    def divergence(tau):  # how far two histories 1e-6 apart end up, early and late
        a = data.mackey_glass(3000, tau=tau)
        b = data.mackey_glass(3000, tau=tau, initial=1.2 + 1e-6)
        return np.abs(a - b)[:100].max(), np.abs(a - b)[-500:].max()

    chaotic = data.mackey_glass(3000)
    assert 0.3 < chaotic.min() and chaotic.max() < 1.4
    early, late = divergence(17.0)
    assert early < 1e-3 and late > 0.2  # sensitive dependence on initial conditions
    early, late = divergence(8.0)
    assert late < 1e-5  # tau = 8: a stable limit cycle, the perturbation does not grow
    np.testing.assert_array_equal(chaotic, data.mackey_glass(3000))  # deterministic


def test_windows_and_chronological_split():
    x, y = data.windows(np.arange(10.0), window=3, horizon=2)
    assert x.shape == (6, 3, 1) and y.shape == (6, 1)
    np.testing.assert_array_equal(x[0, :, 0], [0, 1, 2])
    np.testing.assert_array_equal(y[:, 0], [4, 5, 6, 7, 8, 9])
    split = data.load_forecast(window=5, horizon=3, length=500, test_fraction=0.2)
    raw = data.mackey_glass(500)
    assert split.mean == pytest.approx(raw[:400].mean()) and split.std == pytest.approx(
        raw[:400].std()
    )
    # The test windows are the end of the series, normalised with the training statistics.
    np.testing.assert_allclose(
        split.x_test[-1, :, 0] * split.std + split.mean, raw[-8:-3], rtol=1e-5
    )
    np.testing.assert_allclose(split.y_test[-1, 0] * split.std + split.mean, raw[-1], rtol=1e-5)
    assert len(split.x_train) == 400 - 5 - 3 + 1 and split.horizon == 3


def test_csv_series(tmp_path):
    values = np.sin(np.arange(300) / 7.0)
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(f"{v:.6f}" for v in values) + "\n")
    np.testing.assert_allclose(data.load_csv_series(str(plain)), values, atol=1e-6)
    named = tmp_path / "named.csv"
    named.write_text("time,load\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(values)))
    np.testing.assert_allclose(data.load_csv_series(str(named), "load"), values, atol=1e-6)
    np.testing.assert_array_equal(data.load_csv_series(str(named)), np.arange(300.0))
    split = data.load_forecast(str(named), window=8, horizon=2, column="load")
    assert split.x_train.shape[1:] == (8, 1)


@pytest.mark.parametrize(
    "content, column, message",
    [
        (None, None, "does not exist"),
        ("x\n1\n2\nabc\n", None, "row 4 of column 1: expected a finite number, got 'abc'"),
        ("1\n2\nnan\n", None, "row 3"),
        ("a,b\n1,2\n", "c", "a column named 'c'"),
        ("".join(f"{i}\n" for i in range(20)), None, "too short: 20 values"),
        ("", None, "the file is empty"),
    ],
)
def test_csv_errors_are_one_line_and_name_the_file(tmp_path, content, column, message):
    path = tmp_path / "series.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(data.DatasetError) as error:
        data.load_forecast(str(path), window=8, horizon=2, column=column)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def _history():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 10, 1)).astype("float32"), rng.normal(size=(16, 1)).astype(
        "float32"
    )


def test_terms_are_mse_and_kl_with_a_gaussian_moments_kl():
    model = lstm.build_lstm(10, units=6, kl_target="gaussian:0.5")
    trainer = lstm.LSTMTrainer(model, keras.optimizers.Adam(1e-3), progress=False)
    x, y = _history()
    assert trainer.build((x, y)) == {"train": ("mse", "kl")}
    results = trainer.evaluate((x, y), batch_size=16)
    h = keras.Model(model.input, model.get_layer("lstm").output)(x).numpy().reshape(-1, 6)
    m, s2 = h.astype("float64").mean(0), h.astype("float64").var(0)
    # The closed form, with the documented epsilon = 1e-6 added to the variance in the log.
    expected = np.sum(np.log(0.5 / np.sqrt(s2 + 1e-6)) + (s2 + m**2) / (2 * 0.25) - 0.5)
    assert results["kl"] == pytest.approx(expected, rel=1e-4)
    assert results["mse"] == pytest.approx(np.mean((model(x).numpy() - y) ** 2), rel=1e-5)
    assert results["persistence_mse"] == pytest.approx(np.mean((x[:, -1] - y) ** 2), rel=1e-5)


def test_bernoulli_kl_target():
    model = lstm.build_lstm(10, units=6, kl_target="bernoulli:0.3")
    trainer = lstm.LSTMTrainer(model, keras.optimizers.Adam(1e-3), progress=False)
    x, y = _history()
    results = trainer.evaluate((x, y), batch_size=16)
    h = keras.Model(model.input, model.get_layer("lstm").output)(x).numpy().reshape(-1, 6)
    rho_hat = ((h.astype("float64") + 1) / 2).mean(0)
    expected = np.sum(0.3 * np.log(0.3 / rho_hat) + 0.7 * np.log(0.7 / (1 - rho_hat)))
    assert results["kl"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("spec", ["gaussian", "gaussian:-1", "bernoulli:1", "normal:1", "kl:x"])
def test_bad_kl_targets_name_the_flag(spec):
    with pytest.raises(ValueError, match=r"--kl_target"):
        lstm.parse_kl_target(spec)


def test_job_reports_the_ratio_to_persistence(tmp_path):
    config = RunConfig(
        steps=4,
        batch_size=32,
        log_dir=str(tmp_path),
        log_every=2,
        steps_per_execution=2,
        progress=False,
        dataset="mackey_glass",
        weights=["kl=0.01"],
    )
    results = lstm.train_and_evaluate(config, window=12, horizon=4, units=8)
    assert results["mse_ratio"] == pytest.approx(results["mse"] / results["persistence_mse"])
    events = read_events(tmp_path)
    tags = set(events.Tags()["tensors"])
    assert {"loss/mse", "loss/kl", "metric/persistence_mse", "eval/mse_ratio"} <= tags
    assert {"eval/persistence_mse", "weight/kl"} <= tags


def test_job_rejects_bad_options_before_training(tmp_path):
    config = RunConfig(steps=2, log_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError, match=r"--horizon \(0\)"):
        lstm.train_and_evaluate(config, horizon=0)
    with pytest.raises(ConfigError, match=r"--dataset='digits'"):
        lstm.train_and_evaluate(RunConfig(steps=2, log_dir=str(tmp_path), dataset="digits"))
    assert not (tmp_path / "checkpoints").exists()
