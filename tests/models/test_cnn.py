"""The sparsity CNN: its term names, its penalty and metrics against numpy, its job on tiny data."""

import keras
import numpy as np
import pytest

from termwise.models import cnn
from termwise.models.config import ConfigError, RunConfig
from termwise.trainer.summaries import read_events, scalar_series


def _data(n=12):
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 1)).astype("float32"), rng.integers(0, 10, n).astype("int64")


def test_terms_are_cross_entropy_and_named_penalties():
    classifier = cnn.build_cnn((8, 8, 1))
    model, names = cnn.add_penalties(classifier, ["conv1", "conv2"], "features")
    assert names == ["sparsity_conv1", "sparsity_conv2", "diversity_features"]
    trainer = cnn.CNNTrainer(
        model, keras.optimizers.Adam(1e-3), sparsity_layers=["conv1", "conv2"], progress=False
    )
    x, y = _data()
    assert trainer.build((x, y)) == {
        "train": ("cross_entropy", "sparsity_conv1", "sparsity_conv2", "diversity_features")
    }
    # The penalised model shares the classifier's weights: it IS the classifier, penalised.
    assert all(a is b for a, b in zip(model.weights, classifier.weights, strict=True))


def test_penalty_and_metrics_match_numpy_on_the_plain_classifier():
    classifier = cnn.build_cnn((8, 8, 1))
    model, _ = cnn.add_penalties(classifier, ["conv1"])
    trainer = cnn.CNNTrainer(
        model, keras.optimizers.Adam(1e-3), sparsity_layers=["conv1"], progress=False
    )
    x, y = _data()
    results = trainer.evaluate((x, y), batch_size=12)
    # Independent reference: the original, unpenalised classifier's own graph.
    conv1 = keras.Model(classifier.input, classifier.get_layer("conv1").output)(x).numpy()
    logits = classifier(x).numpy()
    assert results["sparsity_conv1"] == pytest.approx(np.abs(conv1).mean(), rel=1e-5)
    assert results["sparsity/conv1"] == pytest.approx(np.mean(np.abs(conv1) < 1e-3), rel=1e-5)
    assert results["sparsity/all"] == pytest.approx(results["sparsity/conv1"], rel=1e-6)
    assert results["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == y))
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -log_softmax[np.arange(len(y)), y].mean()
    assert results["cross_entropy"] == pytest.approx(expected, rel=1e-5)


def test_unknown_layers_are_errors_naming_the_flag():
    classifier = cnn.build_cnn((8, 8, 1))
    with pytest.raises(ValueError, match=r"--sparsity_layers: 'conv9' .* conv1, conv2"):
        cnn.add_penalties(classifier, ["conv9"])
    with pytest.raises(ValueError, match=r"--diversity_layer: 'dense'"):
        cnn.add_penalties(classifier, ["conv1"], "dense")


def test_job_logs_sparsity_and_accuracy(tmp_path):
    config = RunConfig(
        steps=4,
        batch_size=32,
        log_dir=str(tmp_path),
        log_every=2,
        steps_per_execution=2,
        progress=False,
        weights=["sparsity_conv2=0.5"],
    )
    results = cnn.train_and_evaluate(
        config, sparsity_layers=["conv2"], diversity_layer="features", sparsity_weight="0.2"
    )
    assert {"accuracy", "cross_entropy", "sparsity_conv2", "diversity_features"} <= set(results)
    assert 0.0 <= results["sparsity/conv2"] <= 1.0
    events = read_events(tmp_path)
    tags = set(events.Tags()["tensors"])
    assert {
        "metric/sparsity/conv2",
        "metric/accuracy",
        "eval/accuracy",
        "eval/sparsity/conv2",
    } <= tags
    assert {"loss/sparsity_conv2", "loss/diversity_features"} <= tags
    # --weights names a term: it beats the --sparsity_weight default; diversity keeps its own.
    weight = [v for _, v in scalar_series(events, "weight/sparsity_conv2")]
    assert weight[-1] == pytest.approx(0.5)
    weight = [v for _, v in scalar_series(events, "weight/diversity_features")]
    assert weight[-1] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sparsity_layers": ["nosuch"]}, "--sparsity_layers: 'nosuch'"),
        ({"sparsity_weight": "linear:0:1"}, "--sparsity_weight ('linear:0:1')"),
        ({"diversity_layer": "conv1"}, "--diversity_layer ('conv1') is also"),
    ],
)
def test_job_rejects_bad_options_before_training(tmp_path, options, message):
    config = RunConfig(steps=2, log_dir=str(tmp_path), progress=False)
    with pytest.raises(ConfigError) as error:
        cnn.train_and_evaluate(config, **options)
    assert message in str(error.value)
    assert not (tmp_path / "checkpoints").exists()
