"""The GAN's phases: their terms' names, the drift term over two calls, and who updates what."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from termwise.models import data, fid, gan
from termwise.trainer import summaries

IMAGES = np.random.default_rng(0).uniform(size=(16, 8, 8, 1)).astype("float32")


def make_trainer(d_lr=1e-3, g_lr=1e-3, drift=0.0, latent_dim=4, ema_momentum=None, **options):
    generator, discriminator = gan.build_gan((8, 8, 1), latent_dim, width=4, drift=drift, seed=1)
    optimizer = {
        "discriminator": keras.optimizers.Adam(d_lr),
        "generator": gan.gan_optimizer(g_lr, ema_momentum=ema_momentum)
        if ema_momentum
        else keras.optimizers.Adam(g_lr),
    }
    model = {"generator": generator, "discriminator": discriminator}
    return gan.GANTrainer(model, optimizer, progress=False, log_every=0, **options)


def batches(batch_size=8):
    return tf.data.Dataset.from_tensor_slices(IMAGES).batch(batch_size, drop_remainder=True)


def trainable(model):
    return [np.array(v) for v in model.trainable_variables]


@pytest.mark.parametrize(
    "options, discriminator, generator",
    [
        ({}, {"d_adversarial", "r1"}, {"g_adversarial", "feature_matching"}),
        (
            {"adversarial_loss": "wgan_gp", "r1_gamma": 0.0, "drift": 1e-3},
            {"d_adversarial", "gradient_penalty", "drift"},
            {"g_adversarial", "feature_matching"},
        ),
        ({"feature_matching": "none", "r1_gamma": 0.0}, {"d_adversarial"}, {"g_adversarial"}),
    ],
)
def test_each_phase_has_its_named_terms(options, discriminator, generator):
    names = make_trainer(**options).build(batches())
    assert list(names) == ["discriminator", "generator"]  # the run order
    assert set(names["discriminator"]) == discriminator
    assert set(names["generator"]) == generator


def test_drift_sums_the_real_and_the_fake_call():
    """D is called on real then fake data in one phase: `drift` keeps both calls' add_loss."""
    epsilon = 0.5
    t = make_trainer(d_lr=0.0, g_lr=0.0, drift=epsilon, r1_gamma=0.0, feature_matching="none")
    latents = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    t.generator.sample_latents = lambda batch_size: tf.constant(latents)  # known fakes
    real = IMAGES[:8]
    network = t.discriminator.get_layer("discriminator_network")

    def logits(x):
        return np.array(network(x)[0])[:, 0].astype("float64")

    fake = np.array(t.generator(latents, training=False))
    d_real, d_fake = logits(real), logits(fake)
    result = t.evaluate(tf.data.Dataset.from_tensors(real))
    both = np.mean(epsilon * (d_real**2 + d_fake**2))
    assert result["drift"] == pytest.approx(both, rel=1e-5)
    assert result["drift"] != pytest.approx(np.mean(epsilon * d_fake**2), rel=1e-3)
    softplus = lambda v: np.logaddexp(0.0, v)  # noqa: E731
    expected = np.mean(softplus(-d_real) + softplus(d_fake))
    assert result["d_adversarial"] == pytest.approx(expected, rel=1e-5)

    # After an update, in training mode.
    logs = t.fit(tf.data.Dataset.from_tensors(real), steps=1).last
    fake = np.array(t.generator(latents, training=True))
    both = np.mean(epsilon * (d_real**2 + logits(fake) ** 2))
    assert logs["loss/drift"] == pytest.approx(both, rel=1e-5)
    assert "loss/drift" in logs and "weight/drift" in logs


@pytest.mark.parametrize("phase", ["discriminator", "generator"])
def test_each_phase_updates_only_its_own_model(phase):
    t = make_trainer(
        d_lr=1e-2 if phase == "discriminator" else 0.0,
        g_lr=1e-2 if phase == "generator" else 0.0,
    )
    t.build(batches())
    g_before, d_before = trainable(t.generator), trainable(t.discriminator)
    t.fit(batches(), steps=2)
    g_after, d_after = trainable(t.generator), trainable(t.discriminator)
    g_changed = any(not np.array_equal(a, b) for a, b in zip(g_before, g_after, strict=True))
    d_changed = any(not np.array_equal(a, b) for a, b in zip(d_before, d_after, strict=True))
    assert (g_changed, d_changed) == (phase == "generator", phase == "discriminator")


def test_resuming_draws_the_same_noise(tmp_path):
    """The noise position is checkpointed: 2 + 2 steps give the weights of 4 steps."""

    def run(directory, chunks):
        keras.utils.set_random_seed(0)
        t = make_trainer(checkpoint_dir=str(directory), adversarial_loss="wgan_gp")
        for until in chunks:
            t.fit(batches(), until_step=until)
        return t

    straight = run(tmp_path / "a", [4])
    run(tmp_path / "b", [2])
    resumed = run(tmp_path / "b", [4])
    assert resumed.step == 4
    for model in ("generator", "discriminator"):
        pairs = zip(trainable(straight.model[model]), trainable(resumed.model[model]), strict=True)
        for a, b in pairs:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"adversarial_loss": "hinge"}, r"`adversarial_loss` \('hinge'\) must be one of"),
        ({"feature_matching": "l3"}, r"`feature_matching` \('l3'\) must be one of l2, l1, none"),
        ({"r1_gamma": -1.0}, r"`r1_gamma` \(-1.0\) must be >= 0"),
    ],
)
def test_bad_options_name_the_argument(options, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(**options)


def test_samples_are_images_in_the_unit_interval(tmp_path):
    t = make_trainer(log_dir=str(tmp_path))
    path = gan.write_samples(t, gan.fixed_latents(4, seed=0, count=10), str(tmp_path), step=0)
    from PIL import Image

    width = Image.open(path).size[0]
    assert width == (8 * 9 + 1) * 4  # 8 columns of 8x8 images, 1-pixel gaps, scaled x4


def test_the_generator_average_is_checkpointed(tmp_path):
    """The moving average of G's weights lives in its optimizer, so a restore brings it back."""
    t = make_trainer(checkpoint_dir=str(tmp_path), ema_momentum=0.5)
    t.build(batches())
    initial = trainable(t.generator)
    t.fit(batches(), steps=2)
    optimizer = t.phases["generator"].optimizer
    assert optimizer.use_ema and optimizer.ema_momentum == 0.5
    averages = [np.array(v) for v in optimizer._model_variables_moving_average]
    assert len(averages) == len(initial)
    assert not any(np.array_equal(a, b) for a, b in zip(averages, initial, strict=True))

    restored = make_trainer(checkpoint_dir=str(tmp_path), ema_momentum=0.5)
    restored.build(batches())
    assert restored.step == 2
    again = restored.phases["generator"].optimizer._model_variables_moving_average
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(averages, again, strict=True))


def test_after_fit_the_generator_shows_its_average_and_training_resumes_from_the_raw_weights():
    """With use_ema, fit leaves avg_k = m avg_(k-1) + (1 - m) w_k (avg_1 = w_1) in G, computed
    here from a twin without an average, and the next fit continues from the raw w_k."""
    momentum = 0.5

    def twin(ema_momentum):
        keras.utils.set_random_seed(0)
        generator, discriminator = gan.build_gan((8, 8, 1), 4, width=4, seed=1)
        optimizer = {
            "discriminator": keras.optimizers.Adam(1e-2),
            "generator": gan.gan_optimizer(1e-2, ema_momentum=ema_momentum),
        }
        model = {"generator": generator, "discriminator": discriminator}
        return gan.GANTrainer(model, optimizer, progress=False, log_every=0), batches()

    plain, data = twin(None)
    raw = []
    for _ in range(3):
        plain.fit(data, steps=1)
        raw.append(trainable(plain.generator))
    averages = [raw[0]]
    for weights in raw[1:]:
        pairs = zip(averages[-1], weights, strict=True)
        averages.append([momentum * a + (1 - momentum) * w for a, w in pairs])

    averaged, data = twin(momentum)
    averaged.fit(data, steps=2)
    for got, want in zip(trainable(averaged.generator), averages[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(averages[1], raw[1], strict=True))
    averaged.fit(data, steps=1)
    for got, want in zip(trainable(averaged.generator), averages[2], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_generate_in_batches_is_one_call():
    t = make_trainer()
    latents = gan.fixed_latents(4, seed=0, count=10)
    expected = np.array(t.generator(latents, training=False))
    np.testing.assert_allclose(
        gan.generate(t.generator, latents, batch_size=3), expected, atol=1e-6
    )


def test_write_fid_logs_the_score_and_its_floor(tmp_path):
    split = data.load_images("digits", seed=0)
    split = data.Split(split.x_train[:100], split.y_train[:100], split.x_test, split.y_test)
    scorer = fid.fid_scorer(split, steps=3)  # a barely trained classifier: features all the same
    t = make_trainer(log_dir=str(tmp_path))
    latents = gan.fixed_latents(4, seed=1, count=scorer.num_samples)
    score = gan.write_fid(t, scorer, latents, step=7)
    samples = np.array(t.generator(latents, training=False))
    expected = fid.feature_frechet_distance(scorer.features(samples), scorer.features(split.x_test))
    assert score == pytest.approx(expected, rel=1e-9)
    events = summaries.read_events(str(tmp_path))
    assert summaries.scalar_series(events, "eval/fid") == [(7, pytest.approx(score, rel=1e-6))]
    floor = summaries.scalar_series(events, "eval/fid_floor")
    assert floor == [(7, pytest.approx(scorer.floor, rel=1e-6))]


@pytest.mark.parametrize("training", [False, True])
def test_a_pixel_normalized_sample_does_not_depend_on_its_batch(training):
    latents = gan.fixed_latents(4, seed=0, count=8)
    pixel = gan.Generator((8, 8, 1), 4, width=4, seed=0, norm="pixel")
    alone = np.array(pixel(latents[:1], training=training))
    np.testing.assert_allclose(np.array(pixel(latents, training=training))[:1], alone, atol=1e-6)
    batch = gan.Generator((8, 8, 1), 4, width=4, seed=0, norm="batch")
    if training:  # batch norm normalizes with the batch's statistics
        together = np.array(batch(latents, training=True))[:1]
        assert not np.allclose(together, np.array(batch(latents[:2], training=True))[:1])


def test_an_unknown_generator_norm_is_refused():
    with pytest.raises(ValueError, match=r"`norm` \('layer'\) must be one of pixel, batch"):
        gan.Generator((8, 8, 1), 4, norm="layer")
